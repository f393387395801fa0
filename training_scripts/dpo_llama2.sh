#!/usr/bin/env bash
# make dpo-llama2: DeepSpeed-Chat DPO (step2_dpo_finetuning) through rlhf_overlay.dschat_dpo.
# Make variables arrive as environment variables; empty ones mean "the recipe's default":
#   MODEL (SFT model; empty: embedded tiny LLaMA on CPU), DATA, OUTPUT (empty: runs/dpo-llama2-<time>), OVERWRITE=1,
#   ZERO_STAGE, LORA_DIM, NUM_GPUS, HOSTFILE. More flags after the script name go to the entry module, e.g.
#   bash training_scripts/dpo_llama2.sh --beta 0.2 -- --label_smoothing 0.1
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" || ! -x "$python" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python="python3"; fi
fi
args=()
[[ -n "${MODEL:-}" ]] && args+=(--model "$MODEL")
[[ -n "${DATA:-}" ]] && args+=(--data "$DATA")
[[ -n "${OUTPUT:-}" ]] && args+=(--output "$OUTPUT")
[[ "${OVERWRITE:-0}" == "1" ]] && args+=(--overwrite)
[[ -n "${ZERO_STAGE:-}" ]] && args+=(--zero-stage "$ZERO_STAGE")
[[ -n "${LORA_DIM:-}" ]] && args+=(--lora-dim "$LORA_DIM")
[[ -n "${NUM_GPUS:-}" ]] && args+=(--num-gpus "$NUM_GPUS")
[[ -n "${HOSTFILE:-}" ]] && args+=(--hostfile "$HOSTFILE")
cd "$root"
exec "$python" -m rlhf_overlay.dschat_dpo "${args[@]}" "$@"
