"""Megatron <-> HuggingFace checkpoint conversion for the LLaMA family (LLaMA2, Llama 3/3.1, Qwen2) and BLOOM;
needs only torch and safetensors.

Megatron -> HF (format, names and TP/PP are read from the checkpoint: legacy or Megatron-Core rank files, or
Megatron-Core torch_dist; SOURCE is the root, an iter_*/ folder or release/):

    python -m toolkits.megatron_hf.convert mg2hf --model llama2 --source /ckpt/llama2-7b-sft \\
        --target /models/llama2-7b-sft-hf --model-name llama2-7b --tokenizer /models/Llama-2-7b-hf
    python -m toolkits.megatron_hf.convert mg2hf --model bloom --source /ckpt/bloom-sft --target /models/bloom-hf

HF -> Megatron (e.g. the RLHF policy back into Megatron for more training); LLaMA family default: Megatron-Core
torch_dist, as Megatron-LM writes today (--tp only sets the vocabulary padding); --format torch / legacy for rank files:

    python -m toolkits.megatron_hf.convert hf2mg --model llama2 --source /models/Meta-Llama-3.1-8B \\
        --target /ckpt/llama31-8b-dist --tp 4
    python -m toolkits.megatron_hf.convert hf2mg --model llama2 --source /models/Llama-2-13b-hf \\
        --target /ckpt/llama2-13b-tp2-pp2 --tp 2 --pp 2 --format legacy
    python -m toolkits.megatron_hf.convert hf2mg --model bloom --source /models/bloom-7b1 --target /ckpt/b --tp 4

Seed-compatible wrappers: toolkits/model_checkpoints_convertor/{llama2/model_convertor.sh,
bloom/model_convertor_huggingface_megatron.sh}; make targets: `make convert-llama2-mg2hf SOURCE=... TARGET=...`.
Nothing is written under TARGET until the conversion succeeded; a non-empty TARGET needs --overwrite.
Exit status: 0 done, 2 bad input (the message says what and what to do).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from toolkits.megatron_hf.errors import ArgumentParser, ConversionError

FAMILIES = ("llama2", "bloom")
ALIASES = {"llama": "llama2", "llama3": "llama2", "qwen2": "llama2"}  # one LLaMA-family converter
DTYPES = ("fp32", "fp16", "bf16")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m toolkits.megatron_hf.convert", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="direction", required=True, metavar="{mg2hf,hf2mg}")

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--model", choices=FAMILIES + tuple(ALIASES), required=True,
                         help="model family: llama2 (= llama, llama3, qwen2: the LLaMA family) or bloom")
        sub.add_argument("--source", type=Path, required=True, help="folder to convert")
        sub.add_argument("--target", type=Path, required=True, help="folder to create (must be empty or absent)")
        sub.add_argument("--model-name", help="size preset, e.g. llama2-7b, llama2-70b, bloom-7b1; fills only what "
                                              "the source lacks")
        sub.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: keep the source dtype)")
        sub.add_argument("--overwrite", action="store_true", help="replace a non-empty TARGET")
        sub.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    mg2hf = commands.add_parser("mg2hf", help="Megatron checkpoint -> HF folder (safetensors shards + index)")
    common(mg2hf)
    mg2hf.add_argument("--extra-vocab-size", type=int, default=None,
                       help="trained rows after the real vocabulary to keep (EXTRA_VOCAB_SIZE; default: the "
                            "checkpoint args' extra_vocab_size, else 0)")
    mg2hf.add_argument("--vocab-size", type=int, help="real vocabulary size before EXTRA_VOCAB_SIZE (default: from "
                                                      "the tokenizer, the checkpoint args, then --model-name)")
    mg2hf.add_argument("--tokenizer", type=Path, help="tokenizer folder to copy into TARGET (default: tokenizer "
                                                      "files found in the checkpoint root)")
    mg2hf.add_argument("--iteration", help="`release` or an iteration number (default: the tracker file)")
    mg2hf.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default: 5GB)")

    hf2mg = commands.add_parser("hf2mg", help="HF folder -> Megatron checkpoint (release/, TP x PP rank files)")
    common(hf2mg)
    hf2mg.add_argument("--tp", type=int, default=1, help="target tensor-parallel size (default: 1)")
    hf2mg.add_argument("--pp", type=int, default=1, help="target pipeline-parallel size (default: 1)")
    hf2mg.add_argument("--extra-vocab-size", type=int, default=0,
                       help="rows to add after the HF vocabulary for new tokens, initialised to the mean "
                            "embedding (EXTRA_VOCAB_SIZE; default: 0)")
    hf2mg.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                       help="pad the vocabulary to a multiple of this x TP, as Megatron-LM does (default: 128)")
    hf2mg.add_argument("--padded-vocab-size", type=int,
                       help="exact padded vocabulary, e.g. to match an existing run's args.padded_vocab_size")
    hf2mg.add_argument("--norm-names", choices=("layernorm", "norm"), default="layernorm",
                       help="layernorm: input_layernorm/final_layernorm (Pai-Megatron-Patch, Megatron-LM <= 23.08); "
                            "norm: input_norm/final_norm (Megatron-LM >= 23.09)")
    hf2mg.add_argument("--format", choices=("torch_dist", "torch", "legacy"),
                       help="what to write: torch_dist (Megatron-Core distributed checkpoint, Megatron-LM's default "
                            "format; not split by TP/PP), torch (Megatron-Core rank files, TP x PP) or legacy "
                            "(language_model.encoder... rank files). Default: torch_dist for the LLaMA family, "
                            "legacy for BLOOM")
    hf2mg.add_argument("--layer-spec", choices=("te", "local"), default="te",
                       help="--format torch: Transformer-Engine layer names (te, Megatron-LM's default) or the "
                            "local spec's (--transformer-impl local)")
    hf2mg.add_argument("--decoder-first-pipeline-num-layers", type=int,
                       help="layers on the first stage for an uneven pipeline split")
    hf2mg.add_argument("--decoder-last-pipeline-num-layers", type=int,
                       help="layers on the last stage for an uneven pipeline split")
    return parser


def release_freed_memory_promptly() -> None:
    """Have glibc serve allocations of 1 MiB and more with their own mappings, returned to the OS on free.

    Why: a conversion streams tensors of tens of MB through memory one after another. By default glibc raises
    its mmap threshold after the first such free and from then on keeps freed chunks in the heap, so the
    resident footprint creeps up by several layers' worth even though only one layer is alive. A fixed
    threshold (which also turns the adaptive one off) keeps the footprint at what is live. No-op off glibc.
    """
    import ctypes
    m_mmap_threshold = -3  # from <malloc.h>
    try:
        ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 1 << 20)
    except (OSError, AttributeError):
        pass


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except ConversionError as exc:   # a bad command line: one line, like any other bad input
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch  # heavy imports here so that --help is instant

    from toolkits.megatron_hf import bloom, llama2
    from toolkits.megatron_hf.hf_format import DTYPE_NAMES, parse_size

    family = ALIASES.get(args.model, args.model)
    spec = {"llama2": llama2, "bloom": bloom}[family]
    dtype = DTYPE_NAMES[args.dtype] if args.dtype else None
    # Conversion never needs autograd. Restored in `finally`, so callers that run main() in-process (tests,
    # notebooks) keep their own grad mode.
    grad_was_enabled = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    try:
        if args.direction == "mg2hf":
            from toolkits.megatron_hf.megatron_to_hf import MegatronToHFOptions, megatron_to_hf
            megatron_to_hf(spec, MegatronToHFOptions(
                source=args.source, target=args.target, model_name=args.model_name, vocab_size=args.vocab_size,
                extra_vocab_size=args.extra_vocab_size, tokenizer=args.tokenizer, iteration=args.iteration,
                dtype=dtype, max_shard_bytes=parse_size(args.max_shard_size), overwrite=args.overwrite,
                progress=args.progress))
        else:
            from toolkits.megatron_hf.hf_to_megatron import HFToMegatronOptions, hf_to_megatron
            hf_to_megatron(spec, HFToMegatronOptions(
                source=args.source, target=args.target, tp=args.tp, pp=args.pp, model_name=args.model_name,
                extra_vocab_size=args.extra_vocab_size,
                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                padded_vocab_size=args.padded_vocab_size, norm_names=args.norm_names,
                first_stage_layers=args.decoder_first_pipeline_num_layers,
                last_stage_layers=args.decoder_last_pipeline_num_layers, dtype=dtype,
                format=args.format or ("torch_dist" if family == "llama2" else "legacy"), layer_spec=args.layer_spec,
                overwrite=args.overwrite,
                progress=args.progress))
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_grad_enabled(grad_was_enabled)
    return 0


if __name__ == "__main__":
    release_freed_memory_promptly()  # process-wide, so only for a process of our own (not for importers)
    raise SystemExit(main())
