#!/usr/bin/env bash
# make rm-gptj [MODEL=...] [DATA=...] [OUTPUT=...] [OVERWRITE=1] [NUM_GPUS=N] [HOSTFILE=...] [ZERO_STAGE=...]
# Value-head reward model on GPTJ (embedded tiny GPTJ by default): python -m rlhf_overlay.trlx_reward_model --help
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$root/.venv/bin/python"; [[ -x "$py" ]] || py=python3
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
# make variables (exported by the Makefile) -> flags; empty ones keep the default (embedded tiny model/data, new run folder)
args=()
[[ -n "${MODEL:-}" ]]        && args+=(--model "$MODEL")
[[ -n "${DATA:-}" ]]         && args+=(--data "$DATA")
[[ -n "${OUTPUT:-}" ]]       && args+=(--output "$OUTPUT")
[[ "${OVERWRITE:-0}" == 1 ]] && args+=(--overwrite)
[[ -n "${NUM_GPUS:-}" ]]     && args+=(--num-processes "$NUM_GPUS")
[[ -n "${HOSTFILE:-}" ]]     && args+=(--hostfile "$HOSTFILE")
[[ -n "${ZERO_STAGE:-}" ]]   && args+=(--zero-stage "$ZERO_STAGE")
exec "$py" -m rlhf_overlay.trlx_reward_model --arch gptj "${args[@]}" "$@"
