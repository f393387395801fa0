#!/usr/bin/env bash
# make pipeline-llama2 [MEGATRON_SFT=ckpt] [TOKENIZER=dir] [DATA=...] [OUTPUT=...] [RESUME=folder] [NUM_GPUS=N]
# Megatron SFT -> HF -> DeepSpeed-Chat reward model -> DeepSpeed-Chat PPO -> Megatron (the input's TP/PP), checked by
# logits; empty MEGATRON_SFT = the pre-trained tiny LLaMA as a TP=2 PP=2 Megatron checkpoint:
# python -m rlhf_overlay.tools.pipeline --help
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
run_pipeline llama2 "$@"
