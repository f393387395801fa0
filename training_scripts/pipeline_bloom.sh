#!/usr/bin/env bash
# make pipeline-bloom [MEGATRON_SFT=ckpt] [TOKENIZER=dir] [DATA=...] [OUTPUT=...] [RESUME=folder] [NUM_GPUS=N]
# Megatron SFT -> HF -> trlx value-head reward model -> trlx PPO -> Megatron (the input's TP/PP), checked by
# logits; empty MEGATRON_SFT = the pre-trained tiny BLOOM as a TP=2 Megatron checkpoint:
# python -m rlhf_overlay.tools.pipeline --help
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
run_pipeline bloom "$@"
