#!/usr/bin/env bash
# make rm-bloom [MODEL=...] [DATA=...] [OUTPUT=...] [OVERWRITE=1] [NUM_GPUS=N] [HOSTFILE=...] [ZERO_STAGE=...]
# Value-head reward model on BLOOM (embedded tiny BLOOM by default): python -m rlhf_overlay.trlx_jobs.reward_model --help
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
resumable=1   # RESUME, CHECKPOINT_EVERY, CHECKPOINT_MINUTES, KEEP_CHECKPOINTS (README: Long runs)
common_flags --num-processes
[[ -n "${ON_UNHEALTHY:-}" ]] && args+=(--on-unhealthy "$ON_UNHEALTHY")   # health guard: stop | warn
exec "$py" -m rlhf_overlay.trlx_jobs.reward_model --arch bloom "${args[@]}" "$@"
