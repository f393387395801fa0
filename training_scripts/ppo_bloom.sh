#!/usr/bin/env bash
# make ppo-bloom [MODEL=...] [RM=...] [DATA=...] [OUTPUT=...] [OVERWRITE=1] [NUM_GPUS=N] [HOSTFILE=...] [ZERO_STAGE=...]
# trlx PPO on BLOOM (embedded tiny BLOOM by default; without RM a tiny reward model is trained first):
# python -m rlhf_overlay.trlx_jobs.ppo --help
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
resumable=1   # RESUME, CHECKPOINT_EVERY, CHECKPOINT_MINUTES, KEEP_CHECKPOINTS (README: Long runs)
common_flags --num-processes
[[ -n "${ON_UNHEALTHY:-}" ]] && args+=(--on-unhealthy "$ON_UNHEALTHY")   # health guards: stop | warn
[[ -n "${RM:-}" ]] && args+=(--rm "$RM")
exec "$py" -m rlhf_overlay.trlx_jobs.ppo --arch bloom "${args[@]}" "$@"
