#!/usr/bin/env bash
# make pipeline-bloom [MEGATRON_SFT=ckpt] [TOKENIZER=dir] [DATA=...] [OUTPUT=...] [RESUME=folder] [NUM_GPUS=N]
# Megatron SFT -> HF -> trlx value-head reward model -> trlx PPO -> Megatron (the input's TP/PP), checked by
# logits; empty MEGATRON_SFT = the pre-trained tiny BLOOM as a TP=2 Megatron checkpoint:
# python -m rlhf_overlay.tools.pipeline --help
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
args=(--family bloom)
[[ -n "${MEGATRON_SFT:-}" ]] && args+=(--megatron-sft "$MEGATRON_SFT")
[[ -n "${TOKENIZER:-}" ]]    && args+=(--tokenizer "$TOKENIZER")
[[ -n "${DATA:-}" ]]         && args+=(--data "$DATA")
[[ -n "${OUTPUT:-}" ]]       && args+=(--output "$OUTPUT")
[[ -n "${RESUME:-}" ]]       && args+=(--resume "$RESUME")
[[ -n "${NUM_GPUS:-}" ]]     && args+=(--num-gpus "$NUM_GPUS")
exec "$py" -m rlhf_overlay.tools.pipeline run "${args[@]}" "$@"
