#!/usr/bin/env bash
# make rm-llama2: DeepSpeed-Chat step 2 (LLaMA2 reward model) through rlhf_overlay.dschat_jobs.reward_model.
# Make variables arrive as environment variables; empty ones mean "the recipe's default":
#   MODEL (empty: embedded tiny LLaMA on CPU), DATA, OUTPUT (empty: runs/rm-llama2-<time>), OVERWRITE=1,
#   ZERO_STAGE, LORA_DIM, NUM_GPUS, HOSTFILE. More flags after the script name go to the entry module, e.g.
#   bash training_scripts/rm_llama2.sh --dtype fp32 -- --eval_interval 5
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
run_dschat reward_model "$@"
