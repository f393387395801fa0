# rlhf-overlay: adds the seed's examples/summarize_rlhf/reward_model/train_reward_model_bloom.py (pairwise value-head
# reward model on BLOOM). The seed hard-coded the bloom-1b1 tokenizer, ./ranking_data/ and the misspelt `choosen`
# key; this file only forwards to rlhf_overlay.trlx_jobs.reward_model (same as `make rm-bloom`), through
# rlhf_overlay.tools.seed_launch so that the seed's command works as typed.
"""BLOOM reward model (the seed's train_reward_model_bloom.py), = `make rm-bloom`. Every option: `--help`.

    deepspeed train_reward_model_bloom.py                     # the seed's command: ds_config_bloom.json, tiny BLOOM
    python train_reward_model_bloom.py                        # embedded tiny BLOOM + data, CPU, no DeepSpeed
    MODEL=./sft/bloom7b1_sft DATA=./ranking_data deepspeed train_reward_model_bloom.py   # train.jsonl, eval.jsonl
Under `deepspeed` each process is one rank and ds_config_bloom.json (next to this file) is the DeepSpeed config;
with python it starts its own launcher (NUM_GPUS / --num-processes, --hostfile, --deepspeed FILE).
"""
import sys
from pathlib import Path

try:
    import rlhf_overlay  # noqa: F401
except ImportError:  # run from upstream/trlx/examples/summarize_rlhf/reward_model inside the rlhf-overlay checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[5]))

from rlhf_overlay.tools.seed_launch import seed_main

if __name__ == "__main__":
    sys.exit(seed_main("rm-bloom", __file__))
