#!/usr/bin/env bash
# Shared by the training_scripts/*.sh entry points and the toolkits/ converter wrappers (sourced, not run): where
# the project and its python are, and how make variables become flags of an entry module. Empty variables keep the
# entry module's default (embedded tiny model and data, a new run folder under runs/).
#   py                      the interpreter that runs our modules: PYTHON (the Makefile exports the venv's python,
#                           or the user's PYTHON=) when executable, else .venv/bin/python, else python3; absolute
#   args                    the entry module's flags, filled by the functions below (a script adds its own first)
#   opt VAR FLAG            append FLAG "$VAR" to `args` when VAR is set
#   switch VAR FLAG         append FLAG when VAR is 1
#   common_flags NUM_FLAG   add to `args` from MODEL DATA OUTPUT OVERWRITE ZERO_STAGE NUM_GPUS HOSTFILE ALLOW_ARCH
#                           RESUME CHECKPOINT_EVERY CHECKPOINT_MINUTES KEEP_CHECKPOINTS; NUM_FLAG is how the module
#                           calls ranks per node (--num-gpus or --num-processes)
#   run_dschat MODULE [FLAG...]      exec rlhf_overlay.dschat_jobs.MODULE (rm-llama2, ppo-llama2, dpo-llama2)
#   run_trlx MODULE [FLAG...]        exec rlhf_overlay.trlx_jobs.MODULE, resumable (rm-*, ppo-*, ppo-smoke-test)
#   run_pipeline FAMILY [FLAG...]    exec rlhf_overlay.tools.pipeline run --family FAMILY (pipeline-*)
# FLAGs (e.g. the script's arguments) go after the ones made from the variables.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-}"
if [[ -z "$py" || ! -x "$py" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"; else py="python3"; fi
fi
[[ "$py" == */* && "$py" != /* ]] && py="$PWD/$py"   # absolute: some scripts change folder before running it
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
args=()

opt() {
    if [[ -n "${!1:-}" ]]; then args+=("$2" "${!1}"); fi
}

switch() {
    if [[ "${!1:-0}" == 1 ]]; then args+=("$2"); fi
}

common_flags() {
    opt MODEL --model
    opt DATA --data
    opt OUTPUT --output
    switch OVERWRITE --overwrite
    opt ZERO_STAGE --zero-stage
    opt NUM_GPUS "$1"
    opt HOSTFILE --hostfile
    switch ALLOW_ARCH --allow-arch
    opt RESUME --resume   # every training target writes resumable checkpoints (README: Long runs)
    opt CHECKPOINT_EVERY --checkpoint-every
    opt CHECKPOINT_MINUTES --checkpoint-minutes
    opt KEEP_CHECKPOINTS --keep-checkpoints
}

run_dschat() {
    local module=$1; shift
    common_flags --num-gpus
    opt LORA_DIM --lora-dim
    switch RECIPE_AT_TINY_SCALE --recipe-at-tiny-scale
    opt ON_UNHEALTHY --on-unhealthy   # health guards: stop | warn (default auto: warn tiny, stop own model)
    cd "$root" || exit 2
    exec "$py" -m "rlhf_overlay.dschat_jobs.$module" "${args[@]}" "$@"
}

run_trlx() {
    local module=$1; shift
    common_flags --num-processes
    opt ON_UNHEALTHY --on-unhealthy   # health guards: stop | warn
    exec "$py" -m "rlhf_overlay.trlx_jobs.$module" "${args[@]}" "$@"
}

run_pipeline() {
    local family=$1; shift
    args+=(--family "$family")
    opt MEGATRON_SFT --megatron-sft
    opt TOKENIZER --tokenizer
    opt DATA --data
    opt OUTPUT --output
    opt RESUME --resume
    opt NUM_GPUS --num-gpus
    exec "$py" -m rlhf_overlay.tools.pipeline run "${args[@]}" "$@"
}
