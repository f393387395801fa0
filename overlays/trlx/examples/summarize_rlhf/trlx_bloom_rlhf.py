# rlhf-overlay: adds the seed's examples/summarize_rlhf/trlx_bloom_rlhf.py (PPO on a BLOOM SFT model with a trained
# value-head reward model). The seed hard-coded hub names, `cuda:1` for the reward model and paths inside this
# folder; this file only forwards to the parameterised rlhf_overlay.trlx_jobs.ppo (same as `make ppo-bloom`), through
# rlhf_overlay.tools.seed_launch so that the seed's command works as typed.
"""PPO on BLOOM (the seed's trlx_bloom_rlhf.py), = `make ppo-bloom`. Every option: `python trlx_bloom_rlhf.py --help`.

    accelerate launch --config_file configs/default_accelerate_config.yaml trlx_bloom_rlhf.py   # the seed's command
    python trlx_bloom_rlhf.py                                   # embedded tiny BLOOM on CPU (a tiny RM is trained first)
    MODEL=./sft/bloom7b1_sft RM=<rm run>/reward_model DATA=./rl_data accelerate launch ... trlx_bloom_rlhf.py
Under a launcher each process is one rank (the accelerate config and its DeepSpeed JSON decide); with python it
starts accelerate itself (NUM_GPUS/--num-processes, --hostfile, --accelerate-config).
"""
import sys
from pathlib import Path

try:
    import rlhf_overlay  # noqa: F401
except ImportError:  # run from upstream/trlx/examples/summarize_rlhf inside the rlhf-overlay checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[4]))

from rlhf_overlay.tools.seed_launch import seed_main

if __name__ == "__main__":
    sys.exit(seed_main("ppo-bloom", __file__))
