#!/usr/bin/env bash
# make rm-gptj [MODEL=...] [DATA=...] [OUTPUT=...] [OVERWRITE=1] [NUM_GPUS=N] [HOSTFILE=...] [ZERO_STAGE=...]
# Value-head reward model on GPT-J (embedded tiny GPT-J by default): python -m rlhf_overlay.trlx_jobs.reward_model --help
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
run_trlx reward_model --arch gptj "$@"
