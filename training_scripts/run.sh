#!/usr/bin/env bash
# Dispatcher used by the Makefile: `run.sh NAME` runs training_scripts/NAME.sh, or says the target is not built yet.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
name="${1:?usage: run.sh NAME}"
shift
script="$here/$name.sh"
if [[ ! -f "$script" ]]; then
    echo "make ${name//_/-}: not yet implemented (no $script)" >&2
    exit 1
fi
exec bash "$script" "$@"
