#!/usr/bin/env bash
# make dpo-llama2: DeepSpeed-Chat DPO (step2_dpo_finetuning) through rlhf_overlay.dschat_jobs.dpo.
# Make variables arrive as environment variables; empty ones mean "the recipe's default":
#   MODEL (SFT model; empty: embedded tiny LLaMA on CPU), DATA, OUTPUT (empty: runs/dpo-llama2-<time>), OVERWRITE=1,
#   ZERO_STAGE, LORA_DIM, NUM_GPUS, HOSTFILE. More flags after the script name go to the entry module, e.g.
#   bash training_scripts/dpo_llama2.sh --beta 0.2 -- --label_smoothing 0.1
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
run_dschat dpo "$@"
