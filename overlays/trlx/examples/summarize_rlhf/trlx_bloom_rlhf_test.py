# rlhf-overlay: adds the seed's examples/summarize_rlhf/trlx_bloom_rlhf_test.py (PPO alone, no SFT and no RM
# training). The seed hard-coded bigscience/bloom-7b1, the bloom-1b1 tokenizer and `cuda:1`; this file only forwards
# to rlhf_overlay.trlx_jobs.smoke_test (same as `make ppo-smoke-test`), through rlhf_overlay.tools.seed_launch so that the seed's
# command works as typed.
"""The PPO smoke test (the seed's trlx_bloom_rlhf_test.py), = `make ppo-smoke-test`. Every option: `--help`.

    accelerate launch --config_file configs/default_accelerate_config.yaml trlx_bloom_rlhf_test.py   # the seed's
    python trlx_bloom_rlhf_test.py                               # tiny BLOOM, learnable rule reward, CPU, ~30 s
    MODEL=bigscience/bloom-7b1 REWARD=model DATA=./rl_data accelerate launch ... trlx_bloom_rlhf_test.py
"""
import sys
from pathlib import Path

try:
    import rlhf_overlay  # noqa: F401
except ImportError:  # run from upstream/trlx/examples/summarize_rlhf inside the rlhf-overlay checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[4]))

from rlhf_overlay.tools.seed_launch import seed_main

if __name__ == "__main__":
    sys.exit(seed_main("ppo-smoke-test", __file__))
