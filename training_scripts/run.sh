#!/usr/bin/env bash
# Dispatcher used by the Makefile: `run.sh NAME` runs training_scripts/NAME.sh, then writes report.png and
# summary.md (python -m rlhf_overlay.tools.report) into every run folder the job created.
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
if [[ $rc -eq 0 && -s "$RLHF_OVERLAY_RUN_DIRS_FILE" ]]; then
    # One report per top-level run folder (a folder inside another one is part of that report).
    mapfile -t dirs < <(sort -u "$RLHF_OVERLAY_RUN_DIRS_FILE")
    for d in "${dirs[@]}"; do
        nested=0
        for other in "${dirs[@]}"; do
            [[ "$d" != "$other" && "$d" == "$other"/* ]] && nested=1
        done
        [[ $nested -eq 1 || ! -d "$d" ]] && continue
        if find "$d" -name 'events.out.tfevents.*' -print -quit 2>/dev/null | grep -q .; then
            "$py" -m rlhf_overlay.tools.report "$d" \
                || echo "warning: the run succeeded but its report could not be written (see above)" >&2
        fi
    done
fi
exit $rc
