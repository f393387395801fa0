#!/usr/bin/env bash
# Megatron <-> HuggingFace conversion for LLaMA / LLaMA2, with the seed's positional arguments:
#
#   model_convertor.sh MEGATRON_PATH SOURCE TARGET TP PP MODEL_NAME EXTRA_VOCAB_SIZE MG2HF [convert flags...]
#
#   bash model_convertor.sh /path/to/Megatron-LM /ckpt/llama2-7b-sft /models/llama2-7b-sft-hf 1 1 llama2-7b 0 true
#   bash model_convertor.sh "" /models/Llama-2-13b-hf /ckpt/llama2-13b-tp2-pp2 2 2 llama2-13b 0 false --dtype bf16
#
# MEGATRON_PATH is ignored (Megatron-LM is not needed). MG2HF=true: Megatron -> HF, TP/PP read from the
# checkpoint; false: HF -> Megatron at TP x PP. MODEL_NAME (llama2-7b, llama2-13b, llama2-70b, llama-7b, ...)
# only fills what the checkpoint lacks. Further flags go to `python -m toolkits.megatron_hf.convert`, e.g.
# --overwrite, --tokenizer DIR, --dtype bf16 (see its --help).
set -euo pipefail
if [[ $# -lt 8 ]]; then
    echo "error: $0 needs at least 8 arguments (MEGATRON_PATH SOURCE TARGET TP PP MODEL_NAME EXTRA_VOCAB_SIZE MG2HF [convert flags...]), got $#; see the comment at its top" >&2
    exit 2
fi
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_convert llama2 "$1" "$2" "$3" "$4" "$5" "$8" --model-name "$6" --extra-vocab-size "$7" "${@:9}"
