#!/usr/bin/env bash
# make ppo-smoke-test [MODEL=...] [REWARD=rule|model] [DATA=...] [OUTPUT=...] [OVERWRITE=1] [NUM_GPUS=N] [HOSTFILE=...]
# PPO alone on the embedded tiny BLOOM with a learnable rule reward (CPU, no download); ends with
# `mean reward: <first> -> <last>` and fails if it did not rise: python -m rlhf_overlay.trlx_jobs.smoke_test --help
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
resumable=1   # RESUME, CHECKPOINT_EVERY, CHECKPOINT_MINUTES, KEEP_CHECKPOINTS (README: Long runs)
common_flags --num-processes
[[ -n "${ON_UNHEALTHY:-}" ]] && args+=(--on-unhealthy "$ON_UNHEALTHY")   # health guards: stop | warn
[[ -n "${REWARD:-}" ]] && args+=(--reward "$REWARD")
[[ -n "${RM:-}" ]] && args+=(--rm "$RM")
exec "$py" -m rlhf_overlay.trlx_jobs.smoke_test "${args[@]}" "$@"
