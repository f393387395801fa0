# Sourced by the model_convertor wrappers: finds the repo's python and turns the seed's positional arguments
# into flags for `python -m toolkits.megatron_hf.convert`. Not meant to be run on its own.

# The repo root relative to this file, so the wrappers work from any folder.
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ -x "$repo_root/.venv/bin/python" ]]; then
    python="$repo_root/.venv/bin/python"
else
    python="python3"
fi
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"

# convert_command FAMILY MEGATRON_PATH TP PP MG2HF -> sets the array `direction_flags`
convert_command() {
    local family=$1 megatron_path=$2 tp=$3 pp=$4 mg2hf=$5
    if [[ -n "$megatron_path" ]]; then
        echo "note: MEGATRON_PATH ($megatron_path) is ignored: this converter needs only torch and safetensors" >&2
    fi
    case "$mg2hf" in
        true)
            echo "note: Megatron -> HF reads TP/PP from the checkpoint (TP=$tp PP=$pp given, not used)" >&2
            direction_flags=(mg2hf --model "$family") ;;
        false)
            direction_flags=(hf2mg --model "$family" --tp "$tp" --pp "$pp") ;;
        *)
            echo "error: MG2HF must be true or false, got '$mg2hf'" >&2
            return 2 ;;
    esac
}
