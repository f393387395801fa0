#!/usr/bin/env bash
# make ppo-bloom [MODEL=...] [RM=...] [DATA=...] [OUTPUT=...] [OVERWRITE=1] [NUM_GPUS=N] [HOSTFILE=...] [ZERO_STAGE=...]
# trlx PPO on BLOOM (embedded tiny BLOOM by default; without RM a tiny reward model is trained first):
# python -m rlhf_overlay.trlx_jobs.ppo --help
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
opt RM --rm
run_trlx ppo --arch bloom "$@"
