#!/usr/bin/env bash
# make ppo-smoke-test [MODEL=...] [REWARD=rule|model] [DATA=...] [OUTPUT=...] [OVERWRITE=1] [NUM_GPUS=N] [HOSTFILE=...]
# PPO alone on the embedded tiny BLOOM with a learnable rule reward (CPU, no download); ends with
# `mean reward: <first> -> <last>` and fails if it did not rise: python -m rlhf_overlay.ppo_smoke_test --help
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
[[ -n "${REWARD:-}" ]] && args+=(--reward "$REWARD")
[[ -n "${RM:-}" ]] && args+=(--rm "$RM")
exec "$py" -m rlhf_overlay.ppo_smoke_test "${args[@]}" "$@"
