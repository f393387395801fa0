#!/usr/bin/env bash
# Dispatcher used by the Makefile: `run.sh NAME` runs training_scripts/NAME.sh, then writes report.png and
# summary.md (python -m rlhf_overlay.tools.report --after-job) into every run folder the job created whose training
# completed, also when the job then failed (a PPO verdict); the job's exit code is kept.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
name="${1:?usage: run.sh NAME}"
shift
script="$root/training_scripts/$name.sh"
if [[ ! -f "$script" ]]; then
    echo "error: make ${name//_/-}: not yet implemented (no $script)" >&2
    exit 2
fi
RLHF_OVERLAY_RUN_DIRS_FILE="$(mktemp)"
export RLHF_OVERLAY_RUN_DIRS_FILE
trap 'rm -f "$RLHF_OVERLAY_RUN_DIRS_FILE"' EXIT
rc=0
bash "$script" "$@" || rc=$?
if [[ -s "$RLHF_OVERLAY_RUN_DIRS_FILE" ]]; then
    # also after a failed job, for each run folder whose training completed (e.g. a PPO verdict failure, exit 1)
    "$py" -m rlhf_overlay.tools.report --after-job "$RLHF_OVERLAY_RUN_DIRS_FILE" --job-exit-code "$rc" \
        || echo "warning: the reports of the job's run folders could not be written (see above)" >&2
fi
exit $rc
