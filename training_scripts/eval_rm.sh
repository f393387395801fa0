#!/usr/bin/env bash
# make eval-rm RM=<reward model folder> [DATA=<preference file>] [OUTPUT=<folder>]: accuracy, margin, histogram.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
args=(--rm "${RM:-}")   # empty: the module says what to pass
opt DATA --data
opt OUTPUT --output
switch OVERWRITE --overwrite
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$py" -m rlhf_overlay.tools.eval_rm "${args[@]}"
