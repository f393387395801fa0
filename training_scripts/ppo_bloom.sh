#!/usr/bin/env bash
# make ppo-bloom [MODEL=...] [RM=...] [DATA=...] [OUTPUT=...] [OVERWRITE=1] [NUM_GPUS=N] [HOSTFILE=...] [ZERO_STAGE=...]
# trlx PPO on BLOOM (embedded tiny BLOOM by default; without RM a tiny reward model is trained first):
# python -m rlhf_overlay.trlx_ppo --help
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
[[ -n "${RM:-}" ]] && args+=(--rm "$RM")
exec "$py" -m rlhf_overlay.trlx_ppo --arch bloom "${args[@]}" "$@"
