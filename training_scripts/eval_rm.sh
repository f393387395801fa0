#!/usr/bin/env bash
# make eval-rm RM=<reward model folder> [DATA=<preference file>] [OUTPUT=<folder>]: accuracy, margin, histogram.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
args=(--rm "${RM:-}")
[[ -n "${DATA:-}" ]] && args+=(--data "$DATA")
[[ -n "${OUTPUT:-}" ]] && args+=(--output "$OUTPUT")
[[ "${OVERWRITE:-0}" == 1 ]] && args+=(--overwrite)
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$py" -m rlhf_overlay.tools.eval_rm "${args[@]}"
