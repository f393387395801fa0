#!/usr/bin/env bash
# make ppo-smoke-test [MODEL=...] [REWARD=rule|model] [DATA=...] [OUTPUT=...] [OVERWRITE=1] [NUM_GPUS=N] [HOSTFILE=...]
# PPO alone on the embedded tiny BLOOM with a learnable rule reward (CPU, no download); ends with
# `mean reward: <first> -> <last>` and fails if it did not rise: python -m rlhf_overlay.trlx_jobs.smoke_test --help
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
opt REWARD --reward
opt RM --rm
run_trlx smoke_test "$@"
