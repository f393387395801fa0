# rlhf-overlay: adds the seed's examples/summarize_rlhf/trlx_bloom_rlhf.py (PPO on a BLOOM SFT model with a trained
# value-head reward model). The seed hard-coded hub names, `cuda:1` for the reward model and paths inside this
# folder; this file only forwards to the parameterised rlhf_overlay.trlx_ppo (same as `make ppo-bloom`).
"""PPO on BLOOM (the seed's trlx_bloom_rlhf.py). Every option: `python trlx_bloom_rlhf.py --help`.

    python trlx_bloom_rlhf.py                                   # embedded tiny BLOOM on CPU (a tiny RM is trained first)
    python trlx_bloom_rlhf.py --model ./sft/bloom7b1_sft --rm <rm run>/reward_model --data ./rl_data
It starts `accelerate launch` itself (NUM_GPUS/--num-processes, --hostfile, --accelerate-config): run it with python.
"""
import sys
from pathlib import Path

try:
    import rlhf_overlay  # noqa: F401
except ImportError:  # run from upstream/trlx/examples/summarize_rlhf inside the rlhf-overlay checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[4]))

from rlhf_overlay.trlx_ppo import main

if __name__ == "__main__":
    sys.exit(main(["--arch", "bloom", *sys.argv[1:]]))
