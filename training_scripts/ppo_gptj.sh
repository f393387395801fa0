#!/usr/bin/env bash
# make ppo-gptj [MODEL=...] [RM=...] [DATA=...] [OUTPUT=...] [OVERWRITE=1] [NUM_GPUS=N] [HOSTFILE=...] [ZERO_STAGE=...]
# trlx PPO on GPT-J (embedded tiny GPT-J by default; without RM a tiny reward model is trained first):
# python -m rlhf_overlay.trlx_jobs.ppo --help
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
opt RM --rm
run_trlx ppo --arch gptj "$@"
