#!/usr/bin/env bash
# make ppo-llama2: DeepSpeed-Chat step 3 (LLaMA2 PPO with LoRA) through rlhf_overlay.dschat_ppo.
# Make variables arrive as environment variables; empty ones mean "the recipe's default":
#   ACTOR (empty: embedded tiny LLaMA on CPU), CRITIC (empty with no ACTOR: trains the tiny reward model first),
#   DATA (prompts), OUTPUT (empty: runs/ppo-llama2-<time>), OVERWRITE=1, ZERO_STAGE, LORA_DIM, NUM_GPUS, HOSTFILE.
#   More flags after the script name go to the entry module, e.g.
#   bash training_scripts/ppo_llama2.sh --max-steps 20 -- --print_answers
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" || ! -x "$python" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python="python3"; fi
fi
args=()
[[ -n "${ACTOR:-}" ]] && args+=(--actor "$ACTOR")
[[ -n "${CRITIC:-}" ]] && args+=(--critic "$CRITIC")
[[ -n "${DATA:-}" ]] && args+=(--data "$DATA")
[[ -n "${OUTPUT:-}" ]] && args+=(--output "$OUTPUT")
[[ "${OVERWRITE:-0}" == "1" ]] && args+=(--overwrite)
[[ -n "${ZERO_STAGE:-}" ]] && args+=(--zero-stage "$ZERO_STAGE")
[[ -n "${LORA_DIM:-}" ]] && args+=(--lora-dim "$LORA_DIM")
[[ -n "${NUM_GPUS:-}" ]] && args+=(--num-gpus "$NUM_GPUS")
[[ -n "${HOSTFILE:-}" ]] && args+=(--hostfile "$HOSTFILE")
cd "$root"
exec "$python" -m rlhf_overlay.dschat_ppo "${args[@]}" "$@"
