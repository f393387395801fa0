#!/usr/bin/env bash
# Sourced by the model_convertor wrappers: the project's python (`py`, from training_scripts/lib.sh: PYTHON, else
# the venv's, else python3; the project on PYTHONPATH, so the wrappers work from any folder) and the seed's
# positional arguments turned into flags for `python -m toolkits.megatron_hf.convert`. Not meant to be run on its own.
# shellcheck source=../../training_scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../training_scripts/lib.sh"

# run_convert FAMILY MEGATRON_PATH SOURCE TARGET TP PP MG2HF [convert flags...]: runs the converter (exec)
run_convert() {
    local family=$1 megatron_path=$2 source=$3 target=$4 tp=$5 pp=$6 mg2hf=$7 direction
    shift 7
    if [[ -n "$megatron_path" ]]; then
        echo "note: MEGATRON_PATH ($megatron_path) is ignored: this converter needs only torch and safetensors" >&2
    fi
    case "$mg2hf" in
        true)
            echo "note: Megatron -> HF reads TP/PP from the checkpoint (TP=$tp PP=$pp given, not used)" >&2
            direction=(mg2hf --model "$family") ;;
        false)
            direction=(hf2mg --model "$family" --tp "$tp" --pp "$pp") ;;
        *)
            echo "error: MG2HF must be true or false, got '$mg2hf'" >&2
            exit 2 ;;
    esac
    exec "$py" -m toolkits.megatron_hf.convert "${direction[@]}" --source "$source" --target "$target" "$@"
}
