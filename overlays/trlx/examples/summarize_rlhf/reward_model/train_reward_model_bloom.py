# rlhf-overlay: adds the seed's examples/summarize_rlhf/reward_model/train_reward_model_bloom.py (pairwise value-head
# reward model on BLOOM). The seed hard-coded the bloom-1b1 tokenizer, ./ranking_data/ and the misspelt `choosen`
# key; this file only forwards to rlhf_overlay.trlx_reward_model (same as `make rm-bloom`).
"""BLOOM reward model (the seed's train_reward_model_bloom.py). Every option: `--help`.

    python train_reward_model_bloom.py                                        # embedded tiny BLOOM + data, CPU
    python train_reward_model_bloom.py --model ./sft/bloom7b1_sft --data ./ranking_data   # train.jsonl, eval.jsonl
    python train_reward_model_bloom.py --model ... --data ... --deepspeed ds_config_bloom.json --num-processes 8
It starts its own launcher (torchrun / deepspeed): run it with python, not `deepspeed train_reward_model_bloom.py`.
"""
import sys
from pathlib import Path

try:
    import rlhf_overlay  # noqa: F401
except ImportError:  # run from upstream/trlx/examples/summarize_rlhf/reward_model inside the rlhf-overlay checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[5]))

from rlhf_overlay.trlx_reward_model import main

if __name__ == "__main__":
    sys.exit(main(["--arch", "bloom", *sys.argv[1:]]))
