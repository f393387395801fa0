#!/usr/bin/env bash
# make ppo-llama2: DeepSpeed-Chat step 3 (LLaMA2 PPO with LoRA) through rlhf_overlay.dschat_jobs.ppo.
# Make variables arrive as environment variables; empty ones mean "the recipe's default":
#   ACTOR (empty: embedded tiny LLaMA on CPU), CRITIC (empty with no ACTOR: trains the tiny reward model first),
#   DATA (prompts), OUTPUT (empty: runs/ppo-llama2-<time>), OVERWRITE=1, ZERO_STAGE, LORA_DIM, NUM_GPUS, HOSTFILE,
#   RESUME=<run folder>, CHECKPOINT_EVERY, CHECKPOINT_MINUTES, KEEP_CHECKPOINTS.
#   More flags after the script name go to the entry module, e.g.
#   bash training_scripts/ppo_llama2.sh --max-steps 20 -- --print_answers
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[[ -z "${MODEL:-}" ]] || { echo "error: make ppo-llama2: the models are ACTOR=<SFT model> and CRITIC=<make rm-llama2" \
                                 "output>, not MODEL=${MODEL} — pass ACTOR= and CRITIC= instead" >&2; exit 2; }
opt ACTOR --actor
opt CRITIC --critic
run_dschat ppo "$@"
