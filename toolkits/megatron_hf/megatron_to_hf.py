"""Megatron checkpoint -> HuggingFace folder (config.json, safetensors shards + index, tokenizer files).

Order of work: open every rank file with mmap (nothing is read yet), infer the architecture from shapes and
args, check every rank's every tensor against it (all mismatches reported at once), then merge layer by layer
and stream each HF tensor into its shard. Memory stays at about one layer plus the embedding.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from toolkits.megatron_hf.errors import ConversionError, note, raise_if_problems
from toolkits.megatron_hf.hf_format import (TOKENIZER_FILES, PlannedTensor, SafetensorsShardWriter, check_target,
                                            copy_tokenizer_files, staged_output_folder, tokenizer_facts,
                                            tokenizer_files)
from toolkits.megatron_hf.mcore_format import materialize
from toolkits.megatron_hf.megatron_format import LAYER_PREFIX, MegatronCheckpoint, RankState, arg
from toolkits.megatron_hf.tensor_parallel import REPLICATED, LayoutError, ModelDims, Param


@dataclass
class MegatronToHFOptions:
    source: Path
    target: Path
    model_name: str | None = None         # preset filling what the checkpoint args lack
    vocab_size: int | None = None         # real vocabulary before EXTRA_VOCAB_SIZE (default: tokenizer/args/preset)
    extra_vocab_size: int | None = None   # rows after the vocabulary that hold trained extra tokens
    tokenizer: Path | None = None         # tokenizer folder to copy (default: tokenizer files in the checkpoint root)
    iteration: str | None = None          # default: latest_checkpointed_iteration.txt
    dtype: torch.dtype | None = None      # default: keep the checkpoint's
    max_shard_bytes: int = 5 * 10**9
    overwrite: bool = False
    progress: bool = True


def resolve_preset(spec: ModuleType, model_name: str | None) -> dict:
    if not model_name:
        return {}
    if model_name not in spec.PRESETS:
        raise ConversionError(f"MODEL_NAME {model_name!r} is not a known {spec.FAMILY} size; use one of "
                              f"{', '.join(spec.PRESETS)}")
    return spec.PRESETS[model_name]


def layer_params_present(spec: ModuleType, names: set[str]) -> list[Param]:
    """The family's layer table, with a read-only alias wherever the canonical tensors are absent."""
    params = []
    for param in spec.LAYER_PARAMS:
        alias = spec.LAYER_ALIASES.get(param.megatron)
        if alias is not None and not set(param.megatron) <= names and set(alias.megatron) <= names:
            param = alias
        params.append(param)
    return params + [p for p in spec.OPTIONAL_LAYER_PARAMS if set(p.megatron) <= names]


def _expected_rank_shapes(params: list[Param], hf_shapes: dict, dims: ModelDims, tp: int, prefix: str = "") -> dict:
    expected = {}
    for param in params:
        shapes = param.layout.rank_shapes([hf_shapes[prefix + n] for n in param.hf], dims, tp)
        expected.update(zip(param.megatron, shapes))
    return expected


def _compare(where: Path, expected: dict, found: dict, label: str = "") -> list[str]:
    problems = []
    for name in sorted(expected.keys() - found.keys()):
        problems.append(f"{where}: missing {label}{name} (expected shape {tuple(expected[name])})")
    for name in sorted(found.keys() - expected.keys()):
        problems.append(f"{where}: unexpected tensor {label}{name} {tuple(found[name].shape)}; "
                        f"refusing to drop weights silently")
    for name in sorted(expected.keys() & found.keys()):
        if tuple(found[name].shape) != tuple(expected[name]):
            problems.append(f"{where}: {label}{name} has shape {tuple(found[name].shape)}, expected "
                            f"{tuple(expected[name])}")
    return problems


def _resolve_vocab(opts: MegatronToHFOptions, args, preset: dict, tokenizer: dict | None, padded: int) -> int:
    """HF rows = real vocabulary + EXTRA_VOCAB_SIZE; everything after is Megatron's padding and is dropped."""
    extra = opts.extra_vocab_size
    if extra is None:
        extra = arg(args, "extra_vocab_size", default=0)
    elif arg(args, "extra_vocab_size") not in (None, extra):
        note(f"EXTRA_VOCAB_SIZE={extra} given; the checkpoint args say {arg(args, 'extra_vocab_size')}")
    sources = [(opts.vocab_size, "--vocab-size"),
               (tokenizer and tokenizer["vocab_size"], "the tokenizer"),
               (arg(args, "vocab_size", "orig_vocab_size"), "the checkpoint args"),
               (preset.get("vocab_size"), f"MODEL_NAME {opts.model_name}")]
    base, source = next(((v, s) for v, s in sources if v), (None, None))
    if base is None:
        note(f"no vocabulary size known (pass --vocab-size or --tokenizer); keeping all {padded} embedding rows")
        return padded
    rows = base + extra
    if rows > padded:
        raise ConversionError(f"vocabulary of {base} (from {source}) + {extra} extra rows = {rows} exceeds the "
                              f"{padded} rows of the Megatron embedding; check --vocab-size / EXTRA_VOCAB_SIZE")
    if rows < padded:
        note(f"vocabulary: {base} (from {source}) + {extra} extra = {rows} rows; dropping {padded - rows} "
             f"padding rows")
    return rows


def megatron_to_hf(spec: ModuleType, opts: MegatronToHFOptions) -> Path:
    check_target(opts.target, opts.overwrite, opts.source)
    checkpoint = MegatronCheckpoint.open(opts.source, opts.iteration)  # legacy, Megatron-Core torch or torch_dist
    if checkpoint.is_mcore and spec.FAMILY != "llama2":
        raise ConversionError(f"{checkpoint.iteration_dir} is a Megatron-Core checkpoint; Megatron-Core is supported "
                              f"for the LLaMA family (--model llama2), {spec.FAMILY} only in the legacy layout")
    offsets, num_layers = checkpoint.stage_layer_offsets()
    stages: list[list[RankState] | None] = [checkpoint.load_stage(p, offsets) for p in range(checkpoint.pp)]
    dims = _infer_dims(spec, checkpoint, stages, num_layers, opts)
    tokenizer_paths = _apply_tokenizer_and_vocab(spec, checkpoint, dims, opts)
    hf_global_shapes, hf_layer_shapes = spec.global_hf_shapes(dims), spec.layer_hf_shapes(dims)
    _check_every_rank(spec, checkpoint, stages, offsets, dims, hf_global_shapes, hf_layer_shapes)

    # Plan every HF tensor (name, shape, dtype, in write order) so the shard headers can be written first.
    tp, pp = checkpoint.tp, checkpoint.pp
    plan = []
    for p, ranks in enumerate(stages):
        for layer, params in _stage_sections(spec, dims, p, pp, ranks[0]):
            tensors = ranks[0].globals if layer is None else ranks[0].layers[layer]
            hf_prefix, hf_shapes = _hf_prefix_and_shapes(spec, layer, hf_global_shapes, hf_layer_shapes)
            for param in params:
                dtype = opts.dtype or tensors[param.megatron[0]].dtype
                plan += [PlannedTensor(hf_prefix + n, hf_shapes[n], dtype) for n in param.hf]

    from tqdm import tqdm
    with staged_output_folder(opts.target, opts.overwrite, opts.source) as staging, \
            tqdm(total=num_layers, desc=f"{spec.FAMILY} Megatron->HF", unit="layer", disable=not opts.progress) as bar:
        writer = SafetensorsShardWriter(staging, plan, opts.max_shard_bytes)
        for p in range(pp):
            ranks = stages[p]
            for layer, params in _stage_sections(spec, dims, p, pp, ranks[0]):
                rank_dicts = [r.globals if layer is None else r.layers[layer] for r in ranks]
                hf_prefix, _ = _hf_prefix_and_shapes(spec, layer, hf_global_shapes, hf_layer_shapes)
                for param in params:
                    per_rank = [[materialize(d[n]) for n in param.megatron] for d in rank_dicts]
                    if param.layout is REPLICATED:
                        _warn_if_ranks_differ(param, per_rank, ranks[0].path)
                    for hf_name, tensor in zip(param.hf, param.layout.merge(per_rank, dims)):
                        writer.write(hf_prefix + hf_name, tensor)
                if layer is not None:
                    bar.update(1)
            stages[p] = None  # drop this stage's mappings before the next stage is read
        writer.close()
        config = spec.hf_config(dims, plan[0].dtype)  # torch_dtype: the embedding's
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_tokenizer_files(tokenizer_paths, staging)
    print(f"read {checkpoint.format} checkpoint ({'Megatron-Core' if checkpoint.is_mcore else 'legacy'} names, "
          f"TP={tp}, PP={pp}); wrote {opts.target}: {len(plan)} tensors in {len(writer.shard_names)} shard(s), "
          f"{writer.total_bytes / 1e9:.2f} GB, {dims.num_layers} layers, vocab {dims.hf_vocab_size}")
    return Path(opts.target)


def _infer_dims(spec: ModuleType, checkpoint: MegatronCheckpoint, stages: list[list[RankState]], num_layers: int,
                opts: MegatronToHFOptions) -> ModelDims:
    """Architecture from the first stage's embedding, the last stage's head and the lowest layer (TP rank 0)."""
    first, last = stages[0][0], stages[-1][0]
    if spec.EMBEDDING not in first.globals:
        raise ConversionError(f"{first.path}: no {spec.EMBEDDING}; the first pipeline stage must hold the "
                              f"embedding (found: {', '.join(sorted(first.globals)) or 'no global tensors'})")
    if num_layers == 0:
        raise ConversionError(f"{checkpoint.iteration_dir}: no transformer layers found in any rank file")
    lowest = min(i for stage in stages for i in stage[0].layers)
    layer = next(stage[0].layers[lowest] for stage in stages if lowest in stage[0].layers)
    global_shapes = {n: tuple(t.shape) for n, t in {**first.globals, **last.globals}.items()}
    layer_shapes = {n: tuple(t.shape) for n, t in layer.items()}
    preset = resolve_preset(spec, opts.model_name)
    dims = spec.dims_from_megatron(checkpoint.args, global_shapes, layer_shapes, checkpoint.tp, num_layers, preset)
    if preset and preset.get("hidden_size") not in (None, dims.hidden_size):
        note(f"MODEL_NAME {opts.model_name} has hidden size {preset['hidden_size']} but the checkpoint has "
             f"{dims.hidden_size}; only fields missing from the checkpoint are taken from MODEL_NAME")
    return dims


def _apply_tokenizer_and_vocab(spec: ModuleType, checkpoint: MegatronCheckpoint, dims: ModelDims,
                               opts: MegatronToHFOptions) -> list[Path]:
    """Set the HF vocabulary size and special tokens; return the tokenizer files to copy."""
    tokenizer_dir = opts.tokenizer or (checkpoint.root if tokenizer_files(checkpoint.root) else None)
    tokenizer_paths = tokenizer_files(tokenizer_dir)
    if opts.tokenizer and not tokenizer_paths:
        raise ConversionError(f"--tokenizer {opts.tokenizer} holds none of {', '.join(TOKENIZER_FILES)}")
    tokenizer = None
    if tokenizer_paths:
        try:
            tokenizer = tokenizer_facts(tokenizer_dir)
        except ConversionError as exc:
            if opts.tokenizer:
                raise
            note(f"{exc}; copying the tokenizer files found in {tokenizer_dir} without taking the vocabulary "
                 f"size from them")
    preset = resolve_preset(spec, opts.model_name)
    dims.hf_vocab_size = _resolve_vocab(opts, checkpoint.args, preset, tokenizer, dims.megatron_vocab_size)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if tokenizer and tokenizer[key] is not None:
            setattr(dims, key, tokenizer[key])
    return tokenizer_paths


def _check_every_rank(spec: ModuleType, checkpoint: MegatronCheckpoint, stages: list[list[RankState]],
                      offsets: list[int], dims: ModelDims, hf_global_shapes: dict, hf_layer_shapes: dict) -> None:
    """Every tensor of every rank against the inferred architecture; all differences reported at once."""
    tp, pp = checkpoint.tp, checkpoint.pp
    try:
        first_expected = _expected_rank_shapes(spec.first_stage_params(dims), hf_global_shapes, dims, tp)
        last_expected = _expected_rank_shapes(spec.last_stage_params(dims, pp), hf_global_shapes, dims, tp)
    except LayoutError as exc:
        raise ConversionError(f"{checkpoint.iteration_dir}: {exc}") from exc
    problems, layer_params = [], {}
    for p, ranks in enumerate(stages):
        expected = {**(first_expected if p == 0 else {}), **(last_expected if p == pp - 1 else {})}
        for rank in ranks:
            problems += _compare(rank.path, expected, rank.globals)
            if sorted(rank.layers) != sorted(ranks[0].layers):
                problems.append(f"{rank.path}: holds layers {sorted(rank.layers)}, but TP rank 0 of this stage "
                                f"holds {sorted(ranks[0].layers)}")
            for i, tensors in rank.layers.items():
                params = layer_params.setdefault(i, layer_params_present(spec, set(tensors)))
                expected_layer = _expected_rank_shapes(params, hf_layer_shapes, dims, tp)
                problems += _compare(rank.path, expected_layer, tensors, label=f"{LAYER_PREFIX}{i - offsets[p]}.")
    if sorted(layer_params) != list(range(dims.num_layers)):
        problems.append(f"{checkpoint.iteration_dir}: layers found {sorted(layer_params)}, expected "
                        f"0..{dims.num_layers - 1}")
    raise_if_problems(f"{checkpoint.iteration_dir} does not match a {spec.FAMILY} model with {dims.num_layers} "
                      f"layers, hidden {dims.hidden_size}, {dims.num_attention_heads} heads, "
                      f"{dims.num_query_groups} query groups, FFN {dims.ffn_hidden_size}, TP={tp}, PP={pp}", problems)


def _stage_sections(spec: ModuleType, dims: ModelDims, p: int, pp: int, rank: RankState):
    """(layer index or None for embedding/final tensors, params) in HF order: embedding, layers, norm, head."""
    sections = []
    if p == 0:
        sections.append((None, spec.first_stage_params(dims)))
    sections += [(i, layer_params_present(spec, set(rank.layers[i]))) for i in sorted(rank.layers)]
    if p == pp - 1:
        sections.append((None, spec.last_stage_params(dims, pp)))
    return sections


def _hf_prefix_and_shapes(spec: ModuleType, layer: int | None, global_shapes: dict, layer_shapes: dict):
    return ("", global_shapes) if layer is None else (spec.HF_LAYER_PREFIX.format(layer), layer_shapes)


def _warn_if_ranks_differ(param: Param, per_rank: list, path: Path) -> None:
    reference = per_rank[0]
    for r, tensors in enumerate(per_rank[1:], start=1):
        if any(not torch.equal(a, b) for a, b in zip(reference, tensors)):
            note(f"{param.megatron[0]} (replicated) differs between TP rank 0 and {r} in {path.parent.parent}; "
                 f"using rank 0's copy")
