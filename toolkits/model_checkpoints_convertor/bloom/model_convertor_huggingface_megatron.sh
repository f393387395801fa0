#!/usr/bin/env bash
# Megatron <-> HuggingFace conversion for BLOOM, with the seed's positional arguments:
#
#   model_convertor_huggingface_megatron.sh MEGATRON_PATH SOURCE TARGET TP PP MG2HF [convert flags...]
#
#   bash model_convertor_huggingface_megatron.sh /path/to/Megatron-LM /ckpt/bloom-sft /models/bloom-sft-hf 1 1 true
#   bash model_convertor_huggingface_megatron.sh "" /models/bloom-7b1 /ckpt/bloom-7b1-tp4 4 1 false
#
# MEGATRON_PATH is ignored (Megatron-LM is not needed). MG2HF=true: Megatron -> HF, TP/PP read from the
# checkpoint; false: HF -> Megatron at TP x PP. Further flags go to `python -m toolkits.megatron_hf.convert`,
# e.g. --overwrite, --tokenizer DIR, --vocab-size N (see its --help).
set -euo pipefail
if [[ $# -lt 6 ]]; then
    echo "error: $0 needs at least 6 arguments (MEGATRON_PATH SOURCE TARGET TP PP MG2HF [convert flags...]), got $#; see the comment at its top" >&2
    exit 2
fi
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_convert bloom "$@"   # same order: MEGATRON_PATH SOURCE TARGET TP PP MG2HF [convert flags...]
