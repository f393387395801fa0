#!/usr/bin/env bash
# make chat MODEL=<actor folder> [PROMPT="..."]: chat with a trained policy (interactive, or once with PROMPT).
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[[ -n "${MODEL:-}" ]] || { echo "error: make chat needs a model — pass MODEL=<folder of a trained actor/policy in HF" \
                                 "format>, e.g. MODEL=runs/<ppo run>/actor" >&2; exit 2; }
opt MODEL --model
opt PROMPT --prompt
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$py" -m rlhf_overlay.tools.chat "${args[@]}"
