"""HuggingFace folder -> Megatron checkpoint (release/, args Megatron accepts) in one of three formats:
`torch_dist` (Megatron-Core, what Megatron-LM writes by default), `torch` (Megatron-Core rank files,
TP x PP) or `legacy` (language_model.encoder... rank files, TP x PP).

Order of work: read config.json and the tensor names/shapes (no weights yet), check them all, then per pipeline
stage: open every TP rank's file, and split each HF tensor as it is read straight into the rank files. Memory
stays at about one layer plus the embedding; see megatron_format.RankFileWriter.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from toolkits.megatron_hf.errors import ConversionError, note, raise_if_problems, warning
from toolkits.megatron_hf.hf_format import (HFCheckpoint, check_target, copy_tokenizer_files, staged_output_folder,
                                            tokenizer_files)
from toolkits.megatron_hf import mcore_format
from toolkits.megatron_hf.megatron_format import (CHECKPOINT_VERSION, LAYER_PREFIX, NORM_NAME_STYLES, TRACKER_FILE,
                                                  RankFileWriter, expected_stage_layer_counts, padded_vocab_size,
                                                  rank_file_path)
from toolkits.megatron_hf.megatron_to_hf import resolve_preset
from toolkits.megatron_hf.tensor_parallel import LayoutError, ModelDims


@dataclass
class HFToMegatronOptions:
    source: Path
    target: Path
    tp: int = 1
    pp: int = 1
    model_name: str | None = None              # only checked against the HF config (which has everything)
    extra_vocab_size: int = 0                  # rows appended after the HF vocabulary (EXTRA_VOCAB_SIZE)
    make_vocab_size_divisible_by: int = 128    # Megatron-LM's default; padded rows = multiple of this x TP
    padded_vocab_size: int | None = None       # exact padded size, e.g. to match an existing training run
    norm_names: str = "layernorm"              # "norm" for Megatron-LM >= 23.09 (input_norm, final_norm, ...)
    first_stage_layers: int | None = None      # uneven pipeline split (Megatron-LM's decoder_first_...)
    last_stage_layers: int | None = None
    dtype: torch.dtype | None = None           # default: keep the HF tensors' dtype
    format: str = "legacy"                     # "torch_dist" | "torch" (Megatron-Core) | "legacy"
    layer_spec: str = "te"                     # Megatron-Core rank files (format torch): "te" or "local" names
    overwrite: bool = False
    progress: bool = True


def _check_hf_tensors(spec: ModuleType, hf: HFCheckpoint, names: dict[str, str], shapes: dict,
                      dims: ModelDims) -> None:
    expected = dict(spec.global_hf_shapes(dims))
    for i in range(dims.num_layers):
        prefix = spec.HF_LAYER_PREFIX.format(i)
        expected.update({prefix + n: s for n, s in spec.layer_hf_shapes(dims).items()})
    problems = [f"missing {n} (expected shape {s})" for n, s in expected.items() if n not in names]
    problems += [f"unexpected tensor {names[n]}; refusing to drop weights silently"
                 for n in sorted(names.keys() - expected.keys())]
    for name in sorted(names.keys() & expected.keys()):
        if shapes[name] != tuple(expected[name]):
            problems.append(f"{names[name]} in {hf.weight_map[names[name]].name} has shape {shapes[name]}, expected "
                            f"{tuple(expected[name])}")
    raise_if_problems(f"{hf.folder} does not match its config.json ({spec.FAMILY}, {dims.num_layers} layers, hidden "
                      f"{dims.hidden_size}, {dims.num_attention_heads} heads, {dims.num_query_groups} KV heads)",
                      problems)


def _megatron_args(spec: ModuleType, dims: ModelDims, opts: HFToMegatronOptions,
                   dtype: torch.dtype) -> argparse.Namespace:
    """What Megatron-LM reads back (load_args_from_checkpoint / check_checkpoint_args), nothing Megatron-specific
    pickled, so any Megatron version (and this converter) loads it."""
    return argparse.Namespace(
        **spec.megatron_args(dims),
        tensor_model_parallel_size=opts.tp, pipeline_model_parallel_size=opts.pp,
        virtual_pipeline_model_parallel_size=None,
        decoder_first_pipeline_num_layers=opts.first_stage_layers,
        decoder_last_pipeline_num_layers=opts.last_stage_layers,
        padded_vocab_size=dims.megatron_vocab_size, vocab_size=dims.hf_vocab_size,
        extra_vocab_size=dims.new_token_rows, make_vocab_size_divisible_by=opts.make_vocab_size_divisible_by,
        params_dtype=dtype, fp16=dtype == torch.float16, bf16=dtype == torch.bfloat16,
        iteration=0, consumed_train_samples=0, consumed_valid_samples=0,
        **({"use_mcore_models": True, "use_legacy_models": False, "ckpt_format": opts.format,
            "transformer_impl": "transformer_engine" if opts.layer_spec == "te" else "local"}
           if opts.format != "legacy" else {}))


FORMATS = ("torch_dist", "torch", "legacy")


def _check_format(spec: ModuleType, dims: ModelDims, opts: HFToMegatronOptions) -> None:
    """What each format can hold; the legacy GQA split that legacy Megatron-LM cannot load gets a warning."""
    if opts.format not in FORMATS:
        raise ConversionError(f"--format {opts.format!r}: use one of {', '.join(FORMATS)}")
    if opts.layer_spec not in mcore_format.LAYER_SPECS:
        raise ConversionError(f"--layer-spec {opts.layer_spec!r}: use one of {', '.join(mcore_format.LAYER_SPECS)}")
    if opts.format != "legacy" and spec.FAMILY != "llama2":
        raise ConversionError(f"--format {opts.format}: Megatron-Core output is supported for the LLaMA family; "
                              f"write {spec.FAMILY} with --format legacy")
    if opts.format == "legacy" and (dims.qkv_bias or dims.rope_scaling):
        what = "bias on q/k/v (Qwen2)" if dims.qkv_bias else f"RoPE scaling {dims.rope_scaling}"
        raise ConversionError(f"{opts.source}: {what} has no legacy Megatron-LM equivalent here; write it as "
                              f"Megatron-Core with --format torch_dist (default) or --format torch")
    if opts.format == "torch_dist" and (opts.tp > 1 or opts.pp > 1):
        note(f"torch_dist is not split by rank: Megatron-Core loads it at any TP/PP; TP={opts.tp} sets the vocabulary "
             f"padding, TP/PP are recorded in the args (--format torch or legacy for TP x PP rank files)")
    groups = dims.num_query_groups
    if opts.format == "legacy" and groups != dims.num_attention_heads and groups // opts.tp > 1:
        warning(f"GQA with {groups} query groups at TP={opts.tp} puts {groups // opts.tp} groups on each TP rank; "
             f"legacy (non-Megatron-Core) Megatron-LM fails to run that ('view size is not compatible', "
             f"NVIDIA/Megatron-LM#875, open at r0.9): use TP={groups} or --format torch_dist / torch")


def hf_to_megatron(spec: ModuleType, opts: HFToMegatronOptions) -> Path:
    if opts.tp < 1 or opts.pp < 1:
        raise ConversionError(f"TP and PP must be >= 1 (got TP={opts.tp}, PP={opts.pp})")
    if opts.norm_names not in NORM_NAME_STYLES:
        raise ConversionError(f"--norm-names {opts.norm_names!r}: use one of {', '.join(NORM_NAME_STYLES)}")
    check_target(opts.target, opts.overwrite, opts.source)
    hf = HFCheckpoint(opts.source)
    names = {}  # canonical HF name -> name in the files
    for actual in hf.weight_map:
        canonical = spec.canonical_hf_name(actual)
        if canonical is not None:
            names[canonical] = actual
    shapes = {c: hf.shape_and_dtype(a)[0] for c, a in names.items()}  # header metadata only, no weights read
    dims = _dims_with_padded_vocab(spec, hf, shapes, opts)
    stage_counts = expected_stage_layer_counts(dims.num_layers, opts.pp, opts.first_stage_layers,
                                               opts.last_stage_layers)
    _check_hf_tensors(spec, hf, names, shapes, dims)
    _check_format(spec, dims, opts)
    dtype_of = {c: opts.dtype or hf.shape_and_dtype(a)[1] for c, a in names.items()}
    args = _megatron_args(spec, dims, opts, dtype_of[spec.first_stage_params(dims)[0].hf[0]])
    if opts.format == "torch_dist":
        return _write_torch_dist(spec, hf, names, dims, opts, args)

    from tqdm import tqdm
    with staged_output_folder(opts.target, opts.overwrite, opts.source) as staging, \
            tqdm(total=dims.num_layers, desc=f"{spec.FAMILY} HF->Megatron", unit="layer",
                 disable=not opts.progress) as bar:
        (staging / TRACKER_FILE).write_text("release")
        for p, count in enumerate(stage_counts):
            sections = _stage_sections(spec, dims, p, opts.pp, sum(stage_counts[:p]), count)
            specs = _stage_rank_specs(spec, dims, opts.tp, sections, dtype_of)
            model_state = None
            if opts.format == "torch":
                def model_state(flat, count=count, last=p == opts.pp - 1):
                    return mcore_format.mcore_model_state(flat, opts.layer_spec, count, last)
            writers = [RankFileWriter(rank_file_path(staging / "release", t, p, opts.pp), specs, args,
                                      opts.norm_names, model_state) for t in range(opts.tp)]
            for mg_prefix, hf_prefix, params in sections:
                for param in params:
                    hf_tensors = [hf.get(names[hf_prefix + n]) for n in param.hf]
                    for writer, tensors in zip(writers, param.layout.split(hf_tensors, dims, opts.tp)):
                        for name, tensor in zip(param.megatron, tensors):
                            writer.write(mg_prefix + name, tensor)
                if hf_prefix:
                    bar.update(1)
            for writer in writers:
                writer.close()
        copy_tokenizer_files(tokenizer_files(opts.source), staging)
    hf.close()
    names_written = "legacy" if opts.format == "legacy" else f"Megatron-Core ({opts.layer_spec} spec)"
    print(f"wrote {opts.target}: release/ with TP={opts.tp} x PP={opts.pp} rank files ({names_written} names), "
          f"checkpoint_version {CHECKPOINT_VERSION}, {dims.num_layers} layers, padded vocab {dims.megatron_vocab_size}")
    return Path(opts.target)


def _write_torch_dist(spec: ModuleType, hf: HFCheckpoint, names: dict[str, str], dims: ModelDims,
                      opts: HFToMegatronOptions, args: argparse.Namespace) -> Path:
    """Every tensor whole (the TP=1 layout), layers stacked, one layer at a time; see mcore_format."""
    from tqdm import tqdm
    with staged_output_folder(opts.target, opts.overwrite, opts.source) as staging, \
            tqdm(total=dims.num_layers, desc=f"{spec.FAMILY} HF->Megatron-Core", unit="layer",
                 disable=not opts.progress) as bar:
        (staging / TRACKER_FILE).write_text("release")
        writer = mcore_format.TorchDistWriter(staging / "release")
        for _, hf_prefix, params in _stage_sections(spec, dims, 0, 1, 0, dims.num_layers):
            layer = int(hf_prefix.split(".")[-2]) if hf_prefix else None
            for param in params:
                if param.megatron[0] == mcore_format.HEAD_COPY:
                    continue  # a tied head is the embedding itself in torch_dist
                hf_tensors = [hf.get(names[hf_prefix + n]) for n in param.hf]
                (tensors,) = param.layout.split(hf_tensors, dims, 1)
                for name, tensor in zip(param.megatron, tensors):
                    if layer is None:
                        writer.add_tensor(mcore_format.global_key(name), tensor.to(opts.dtype or tensor.dtype))
                    else:
                        writer.add_tensor(mcore_format.stacked_key(name), tensor.to(opts.dtype or tensor.dtype),
                                          layer, dims.num_layers)
            if layer is not None:  # Transformer Engine's set (a superset of the local spec's): loads with either
                for module in mcore_format.EXTRA_STATE_MODULES_TE:
                    writer.add_object(f"decoder.layers.{module}._extra_state/shard_{layer}_{dims.num_layers}",
                                      [None])
                bar.update(1)
        writer.close({"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0})
        copy_tokenizer_files(tokenizer_files(opts.source), staging)
    hf.close()
    print(f"wrote {opts.target}: release/ in torch_dist format (Megatron-Core; loads at any TP/PP whose padded "
          f"vocabulary is {dims.megatron_vocab_size}), checkpoint_version {CHECKPOINT_VERSION}, {dims.num_layers} "
          f"layers")
    return Path(opts.target)


def _dims_with_padded_vocab(spec: ModuleType, hf: HFCheckpoint, shapes: dict, opts: HFToMegatronOptions) -> ModelDims:
    try:
        dims = spec.dims_from_hf(hf.config, shapes)
    except KeyError as exc:
        raise ConversionError(f"{hf.folder}: config.json or the weights lack {exc}") from exc
    preset = resolve_preset(spec, opts.model_name)
    if preset and preset.get("hidden_size") != dims.hidden_size:
        note(f"MODEL_NAME {opts.model_name} has hidden size {preset['hidden_size']}, this model {dims.hidden_size}; "
             f"using the model's config.json")
    dims.new_token_rows = opts.extra_vocab_size
    rows = dims.hf_vocab_size + opts.extra_vocab_size
    dims.megatron_vocab_size = opts.padded_vocab_size or padded_vocab_size(rows, opts.tp,
                                                                           opts.make_vocab_size_divisible_by)
    if dims.megatron_vocab_size < rows or dims.megatron_vocab_size % opts.tp:
        raise ConversionError(f"--padded-vocab-size {dims.megatron_vocab_size} must be >= the {rows} vocabulary rows "
                              f"(HF {dims.hf_vocab_size} + {opts.extra_vocab_size} extra) and divisible by "
                              f"TP={opts.tp}")
    raise_if_problems(f"cannot split {hf.folder} over TP={opts.tp}", dims.tensor_parallel_problems(opts.tp))
    return dims


def _stage_sections(spec: ModuleType, dims: ModelDims, p: int, pp: int, first_layer: int, count: int) -> list:
    """(Megatron name prefix, HF name prefix, params) of pipeline stage p, in the order they are written."""
    sections = []
    if p == 0:
        sections.append(("", "", spec.first_stage_params(dims)))
    for i in range(first_layer, first_layer + count):
        sections.append((f"{LAYER_PREFIX}{i - first_layer}.", spec.HF_LAYER_PREFIX.format(i), spec.layer_params(dims)))
    if p == pp - 1:
        sections.append(("", "", spec.last_stage_params(dims, pp) + spec.write_only_last_stage_params(dims, pp)))
    return sections


def _stage_rank_specs(spec: ModuleType, dims: ModelDims, tp: int, sections: list, dtype_of: dict) -> dict:
    """Name -> (shape, dtype) of one rank's tensors (the same on every TP rank), in the order they are written."""
    specs = {}
    for mg_prefix, hf_prefix, params in sections:
        hf_shapes = spec.layer_hf_shapes(dims) if hf_prefix else spec.global_hf_shapes(dims)
        for param in params:
            try:
                shapes = param.layout.rank_shapes([hf_shapes[n] for n in param.hf], dims, tp)
            except LayoutError as exc:
                raise ConversionError(f"{hf_prefix}{param.hf[0]}: {exc}") from exc
            dtype = dtype_of[hf_prefix + param.hf[0]]
            specs.update({mg_prefix + name: (shape, dtype) for name, shape in zip(param.megatron, shapes)})
    return specs
