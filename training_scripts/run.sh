#!/usr/bin/env bash
# Dispatcher used by the Makefile: `run.sh NAME` runs training_scripts/NAME.sh, then writes report.png and
# summary.md (python -m rlhf_overlay.tools.report) into every run folder the job created.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
name="${1:?usage: run.sh NAME}"
shift
script="$here/$name.sh"
if [[ ! -f "$script" ]]; then
    echo "make ${name//_/-}: not yet implemented (no $script)" >&2
    exit 1
fi
py="$root/.venv/bin/python"; [[ -x "$py" ]] || py=python3
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
            PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$py" -m rlhf_overlay.tools.report "$d" \
                || echo "warning: the run succeeded but its report could not be written (see above)" >&2
        fi
    done
fi
exit $rc
