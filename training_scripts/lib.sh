#!/usr/bin/env bash
# Shared by the training_scripts/*.sh entry points (sourced, not run): where the project and its python are, and
# the make variables every training target takes, as flags of the entry module. Empty variables keep the entry
# module's default (embedded tiny model and data, a new run folder under runs/).
#   common_flags NUM_FLAG   fills the array `args` from MODEL DATA OUTPUT OVERWRITE ZERO_STAGE NUM_GPUS HOSTFILE
#                           ALLOW_ARCH;
#                           NUM_FLAG is how the module calls ranks per node (--num-gpus or --num-processes).
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# PYTHON (exported by the Makefile: the venv's python, or the user's PYTHON=) when it is executable; made absolute
# because some scripts change folder before running it.
py="${PYTHON:-}"
if [[ -z "$py" || ! -x "$py" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"; else py="python3"; fi
fi
[[ "$py" == */* && "$py" != /* ]] && py="$PWD/$py"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

common_flags() {
    args=()
    if [[ "${resumable:-0}" != 1 && -n "${RESUME:-}${CHECKPOINT_EVERY:-}${CHECKPOINT_MINUTES:-}${KEEP_CHECKPOINTS:-}" ]]; then
        local target; target="$(basename "$0" .sh)"
        echo "error: RESUME / CHECKPOINT_EVERY / CHECKPOINT_MINUTES / KEEP_CHECKPOINTS: make ${target//_/-} does not write" \
             "resumable checkpoints yet (ppo-smoke-test, ppo-bloom, ppo-gptj, rm-bloom and rm-gptj do); drop them" >&2
        exit 2
    fi
    [[ -n "${MODEL:-}" ]]        && args+=(--model "$MODEL")
    [[ -n "${DATA:-}" ]]         && args+=(--data "$DATA")
    [[ -n "${OUTPUT:-}" ]]       && args+=(--output "$OUTPUT")
    [[ "${OVERWRITE:-0}" == 1 ]] && args+=(--overwrite)
    [[ -n "${ZERO_STAGE:-}" ]]   && args+=(--zero-stage "$ZERO_STAGE")
    [[ -n "${NUM_GPUS:-}" ]]     && args+=("$1" "$NUM_GPUS")
    [[ -n "${HOSTFILE:-}" ]]     && args+=(--hostfile "$HOSTFILE")
    [[ "${ALLOW_ARCH:-0}" == 1 ]] && args+=(--allow-arch)
    if [[ "${resumable:-0}" == 1 ]]; then   # targets with resumable checkpoints (set resumable=1 before the call)
        [[ -n "${RESUME:-}" ]]             && args+=(--resume "$RESUME")
        [[ -n "${CHECKPOINT_EVERY:-}" ]]   && args+=(--checkpoint-every "$CHECKPOINT_EVERY")
        [[ -n "${CHECKPOINT_MINUTES:-}" ]] && args+=(--checkpoint-minutes "$CHECKPOINT_MINUTES")
        [[ -n "${KEEP_CHECKPOINTS:-}" ]]   && args+=(--keep-checkpoints "$KEEP_CHECKPOINTS")
    fi
    return 0
}
