"""Megatron-LM (legacy, Pai-Megatron-Patch style) checkpoints: find, load safely, name canonically, write.

Layout (Megatron-LM `megatron/checkpointing.py`):

    ROOT/latest_checkpointed_iteration.txt          "release" or an iteration number
    ROOT/release/ or ROOT/iter_0000100/
        mp_rank_00/model_optim_rng.pt                TP rank 0 when PP == 1
        mp_rank_01_003/model_optim_rng.pt            TP rank 1, PP stage 3
        (model_rng.pt instead, as distributed-optimizer runs of older Megatron-LM wrote)

Each file is a `torch.save` dict: `model` (or `model0..N`, one per virtual-pipeline chunk), `args` (the
argparse namespace of the run, pickled with Megatron classes in it), `checkpoint_version`, `iteration`, ...

`model` nests: language_model -> {embedding -> {word_embeddings -> {weight}}, encoder -> {"layers.0.x.weight":
...}, output_layer -> {weight}}; we flatten it to dotted names and map aliases to one canonical spelling
(`transformer` -> `encoder`, `input_norm` -> `input_layernorm`, ...), so the model tables see one name per tensor.
"""
from __future__ import annotations

import argparse
import mmap
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from toolkits.megatron_hf.errors import ConversionError

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RANK_FILE_NAMES = ("model_optim_rng.pt", "model_rng.pt")
CHECKPOINT_VERSION = 3.0
ENCODER = "language_model.encoder."
LAYER_PREFIX = ENCODER + "layers."

# ----------------------------------------------------------------------------- safe loading
#
# Why this way: torch >= 2.6 loads with weights_only=True, whose unpickler only builds tensors, containers
# and allow-listed globals, never calling anything else. Megatron's `args` holds Megatron enums (ModelType,
# AttnMaskType, ...), and `rng_state` holds numpy arrays, which it refuses. We list the globals a file needs
# *statically* (get_unsafe_globals_in_checkpoint disassembles the pickle without running it), refuse the file
# if any is outside the inert families below, and allow-list an inert stand-in class under each name. The
# stand-in only records its arguments, so loading runs no pickled code and needs no Megatron install; it also
# keeps torch's own unpickler (and mmap=True) instead of a hand-written one.
INERT_GLOBAL_PREFIXES = (
    "megatron.",            # Megatron-LM enums/dataclasses pickled into args
    "megatron_patch.",      # Pai-Megatron-Patch's own modules
    "numpy.",               # rng_state (np.random.get_state()); we never use it
    "apex.", "transformer_engine.",
    "_io.BytesIO", "io.BytesIO",  # Transformer Engine `_extra_state` blobs
)
REAL_SAFE_GLOBALS = [argparse.Namespace, types.SimpleNamespace]


class PickledStandIn:
    """Inert placeholder for a class pickled into a checkpoint (e.g. megatron.core.enums.ModelType).

    Keeps what the pickle passed, so `args.model_type` still prints something meaningful, and nothing else.
    """
    pickled_name = "?"

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        self.pickled_args = args

    def __setstate__(self, state):
        self.pickled_state = state

    def __repr__(self):
        return f"<stand-in for {self.pickled_name}{self.pickled_args!r}>"


def _stand_in_for(full_name: str) -> tuple[type, str]:
    cls = type(full_name.rsplit(".", 1)[-1], (PickledStandIn,), {"pickled_name": full_name})
    return cls, full_name


def safe_torch_load(path: Path) -> Any:
    """torch.load(path) with mmap (tensors stay in the page cache, not in our memory) and no code execution."""
    path = Path(path)
    with torch.serialization.safe_globals(REAL_SAFE_GLOBALS):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except ValueError:
            unsafe = None  # legacy (pre-1.6, non-zip) format: no static listing, no mmap
        except Exception as exc:  # noqa: BLE001 - a truncated/garbled file surfaces here first
            raise ConversionError(f"{path}: not a readable torch checkpoint ({exc}); is the file complete?") from exc
    refused = sorted(g for g in (unsafe or []) if not g.startswith(INERT_GLOBAL_PREFIXES))
    if refused:
        raise ConversionError(
            f"{path}: refusing to load: its pickle references {', '.join(refused)}, which is not a tensor, "
            f"container or Megatron/numpy class; loading it would run that code. If you trust this file, load "
            f"and re-save its `model` and `args` with plain torch.save, then convert again.")
    stand_ins = [_stand_in_for(name) for name in (unsafe or [])]
    with torch.serialization.safe_globals(REAL_SAFE_GLOBALS + stand_ins):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=unsafe is not None)
        except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError from the zip reader, ...
            raise ConversionError(f"{path}: could not be loaded safely: {exc}") from exc


# ----------------------------------------------------------------------------- layout on disk
def rank_folder_name(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def _checkpoint_root_and_iteration_dir(source: Path, iteration: str | None) -> tuple[Path | None, Path]:
    """SOURCE may be the root (with the tracker file), an iteration folder, or `release/`."""
    if not source.is_dir():
        raise ConversionError(f"Megatron checkpoint {source} does not exist or is not a folder")
    if re.fullmatch(r"mp_rank_\d{2}(_\d{3})*", source.name):
        raise ConversionError(f"{source} is a single rank folder; pass the checkpoint root or {source.parent} "
                              f"(all ranks are needed)")
    from toolkits.megatron_hf.mcore_format import is_torch_dist
    if any(source.glob("mp_rank_*")) or is_torch_dist(source):
        tracker_root = source.parent if (source.parent / TRACKER_FILE).exists() else None
        return tracker_root, source
    if iteration is not None:
        name = "release" if iteration == "release" else f"iter_{int(iteration):07d}"
        if not (source / name).is_dir():
            raise ConversionError(f"{source} has no {name}/ folder (from --iteration {iteration})")
        return source, source / name
    tracker = source / TRACKER_FILE
    if tracker.exists():
        text = tracker.read_text().strip()
        name = "release" if text == "release" else (f"iter_{int(text):07d}" if text.isdigit() else None)
        if name is None:
            raise ConversionError(f"{tracker}: expected `release` or an iteration number, found {text!r}")
        if not (source / name).is_dir():
            raise ConversionError(f"{tracker} points at {name}/, which does not exist in {source}")
        return source, source / name
    candidates = sorted(p for p in source.iterdir() if p.is_dir() and re.fullmatch(r"release|iter_\d{7}", p.name))
    if len(candidates) == 1:
        return source, candidates[0]
    if candidates:
        raise ConversionError(f"{source} holds several iterations ({', '.join(p.name for p in candidates)}) and "
                              f"no {TRACKER_FILE}; pass --iteration N or the iteration folder itself")
    raise ConversionError(f"no Megatron checkpoint in {source}: expected {TRACKER_FILE}, a release/ or "
                          f"iter_NNNNNNN/ folder, mp_rank_* folders or a torch_dist .metadata file")


def _discover_rank_files(iteration_dir: Path) -> tuple[int, int, dict[tuple[int, int], Path]]:
    folders = {}
    for folder in sorted(iteration_dir.glob("mp_rank_*")):
        match = re.fullmatch(r"mp_rank_(\d{2})(?:_(\d{3}))?(_\d{3})?", folder.name)
        if not match or not folder.is_dir():
            continue
        if match.group(3):
            raise ConversionError(f"{folder}: expert-parallel (MoE) checkpoints are not supported")
        folders[(int(match.group(1)), None if match.group(2) is None else int(match.group(2)))] = folder
    if not folders:
        if any(iteration_dir.glob("*.distcp")) or (iteration_dir / "common.pt").exists():
            raise ConversionError(
                f"{iteration_dir} is a torch_dist (distributed) checkpoint; re-save it from Megatron with "
                f"--ckpt-format torch (or convert it with Megatron's tools) before converting")
        raise ConversionError(f"{iteration_dir} has no mp_rank_* folders")
    with_pp = {pp is not None for _, pp in folders}
    if len(with_pp) > 1:
        raise ConversionError(f"{iteration_dir} mixes mp_rank_XX and mp_rank_XX_YYY folders; keep one layout")
    tp = max(t for t, _ in folders) + 1
    pp = 1 if with_pp == {False} else max(p for _, p in folders) + 1
    files, missing = {}, []
    for t in range(tp):
        for p in range(pp):
            folder = folders.get((t, None if pp == 1 and with_pp == {False} else p))
            if folder is None:
                missing.append(rank_folder_name(t, p, pp))
                continue
            found = [folder / n for n in RANK_FILE_NAMES if (folder / n).is_file()]
            if not found:
                content = ", ".join(sorted(x.name for x in folder.iterdir())) or "nothing"
                raise ConversionError(f"{folder} holds no {' or '.join(RANK_FILE_NAMES)} (it holds {content})")
            files[(t, p)] = found[0]
    if missing:
        raise ConversionError(f"{iteration_dir}: missing rank folder(s) {', '.join(missing)} for TP={tp}, PP={pp}; "
                              f"copy the complete checkpoint (every mp_rank_* folder)")
    return tp, pp, files


# ----------------------------------------------------------------------------- canonical names
# Aliases written by different Megatron-LM / Pai-Megatron-Patch versions -> the one name the tables use.
_SEGMENT_ALIASES = {"transformer": "encoder", "input_norm": "input_layernorm",
                    "post_attention_norm": "post_attention_layernorm", "final_norm": "final_layernorm"}
# Never converted: rotary inv_freq is recomputed from rope theta, word_embeddings_for_head is the last stage's
# copy of the (tied) embedding, _extra_state is Transformer Engine bookkeeping.
_IGNORED = re.compile(r"(^|\.)(rotary_emb|rotary_pos_emb)\.inv_freq$|^word_embeddings_for_head\.|_extra_state$")
_LAYER = re.compile(re.escape(LAYER_PREFIX) + r"(\d+)\.(.+)$")


def _flatten(tree: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flatten(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], tree


def canonical_name(name: str) -> str:
    return ".".join(_SEGMENT_ALIASES.get(part, part) for part in name.split("."))


@dataclass
class RankState:
    """One rank file's tensors: `globals` (embedding, final norm, output layer) by canonical name, and
    `layers[global layer index][local name]`."""
    path: Path
    num_chunks: int = 1  # > 1 for virtual-pipeline checkpoints (model0, model1, ...)
    globals: dict[str, torch.Tensor] = field(default_factory=dict)
    layers: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


def _model_chunks(state: dict, path: Path) -> list[dict]:
    if "model" in state:
        return [state["model"]]
    chunk_keys = sorted((k for k in state if re.fullmatch(r"model\d+", str(k))), key=lambda k: int(k[5:]))
    if not chunk_keys:
        raise ConversionError(f"{path}: no `model` entry (top-level keys: {', '.join(map(str, state))})")
    return [state[k] for k in chunk_keys]


def _chunk_tensors(chunk: dict, path: Path) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
    """Canonical globals and {local layer index: {local name: tensor}} of one model chunk."""
    flat = dict(_flatten(chunk))
    from toolkits.megatron_hf import mcore_format
    if mcore_format.is_mcore_state(flat):  # Megatron-Core names -> the canonical legacy ones
        globals_, layers = mcore_format.legacy_tensors(flat)
        for name, value in [*globals_.items(), *((n, v) for d in layers.values() for n, v in d.items())]:
            if not isinstance(value, torch.Tensor):
                raise ConversionError(f"{path}: model entry {name} is a {type(value).__name__}, not a tensor")
        return globals_, layers
    globals_, layers = {}, {}
    for raw_name, value in flat.items():
        if _IGNORED.search(raw_name):
            continue
        name = canonical_name(raw_name)
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: model entry {raw_name} is a {type(value).__name__}, not a tensor")
        match = _LAYER.match(name)
        if match:
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = value
        else:
            globals_[name] = value
    # Pai-Megatron-Patch's converter also wrote the output layer as `lm_head`; use it only when alone.
    if "lm_head.weight" in globals_:
        lm_head = globals_.pop("lm_head.weight")
        globals_.setdefault("language_model.output_layer.weight", lm_head)
    return globals_, layers


def expected_stage_layer_counts(num_layers: int, pp: int, first: int | None = None, last: int | None = None,
                                standalone_embedding_stage: bool = False) -> list[int]:
    """Layers per pipeline stage as Megatron-LM assigns them (even, or uneven when the args say so)."""
    if pp == 1:
        return [num_layers]
    if standalone_embedding_stage:
        return [0] + expected_stage_layer_counts(num_layers, pp - 1)
    fixed = {0: first, pp - 1: last}
    fixed = {stage: n for stage, n in fixed.items() if n is not None}
    rest_layers, rest_stages = num_layers - sum(fixed.values()), pp - len(fixed)
    if rest_layers < 0 or (rest_stages == 0 and rest_layers) or (rest_stages and rest_layers % rest_stages):
        how = (f" with decoder_first_pipeline_num_layers={first}, decoder_last_pipeline_num_layers={last}"
               if fixed else "")
        raise ConversionError(
            f"{num_layers} layers cannot be split over PP={pp} stages{how}; choose a PP that divides the layers "
            f"or set --decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers")
    per_stage = rest_layers // rest_stages if rest_stages else 0
    return [fixed.get(stage, per_stage) for stage in range(pp)]


def arg(args: Any, *names: str, default: Any = None) -> Any:
    """First attribute of Megatron `args` (a Namespace, or None) that is set, trying each alias in turn."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and not isinstance(value, PickledStandIn):
            return value
    return default


def check_declared(args: Any, names: tuple[str, ...], found: Any, evidence: str) -> None:
    """Refuse a checkpoint whose args contradict its tensors (the tensors decide everything we write)."""
    declared = arg(args, *names)
    if declared is not None and declared != found:
        raise ConversionError(f"checkpoint args declare {names[0]}={declared} but {evidence} implies {found}; the "
                              f"args and the weights disagree, so the checkpoint cannot be converted safely")


@dataclass
class MegatronCheckpoint:
    root: Path | None          # folder with the tracker file (tokenizer files may live here), if any
    iteration_dir: Path
    tp: int
    pp: int
    rank_files: dict[tuple[int, int], Path]
    args: Any
    checkpoint_version: float | None
    is_mcore: bool = False     # Megatron-Core names (decoder.layers...) in the rank files
    format: str = "legacy"     # "legacy", "torch" (Megatron-Core rank files) or "torch_dist"

    @classmethod
    def open(cls, source: Path, iteration: str | None = None):
        """The checkpoint in SOURCE, whatever its format (a TorchDistCheckpoint for torch_dist)."""
        root, iteration_dir = _checkpoint_root_and_iteration_dir(Path(source), iteration)
        from toolkits.megatron_hf import mcore_format
        if mcore_format.is_torch_dist(iteration_dir) and not any(iteration_dir.glob("mp_rank_*")):
            return mcore_format.TorchDistCheckpoint.open(root, iteration_dir)
        tp, pp, files = _discover_rank_files(iteration_dir)
        first = safe_torch_load(files[(0, 0)])
        if not isinstance(first, dict):
            raise ConversionError(f"{files[(0, 0)]}: expected a dict saved by Megatron, found {type(first).__name__}")
        args = first.get("args")
        for field_name, found in [("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp)]:
            declared = arg(args, field_name)
            if declared is not None and declared != found:
                raise ConversionError(
                    f"{files[(0, 0)]}: args say {field_name}={declared} but {iteration_dir} holds rank folders "
                    f"for {field_name.split('_')[0].upper()}={found}; the checkpoint is incomplete or was resharded "
                    f"without updating its args")
        chunks = _model_chunks(first, files[(0, 0)])
        is_mcore = mcore_format.is_mcore_state(dict(_flatten(chunks[0])))
        return cls(root, iteration_dir, tp, pp, files, args, first.get("checkpoint_version"), is_mcore,
                   "torch" if is_mcore else "legacy")

    def load_stage(self, pp_rank: int, stage_offsets: list[int] | None = None) -> list[RankState]:
        """All TP ranks of one stage, layer indices made global. Tensors are mmap'd, not read."""
        return [self._load_rank(t, pp_rank, stage_offsets) for t in range(self.tp)]

    def _load_rank(self, tp_rank: int, pp_rank: int, stage_offsets: list[int] | None) -> RankState:
        path = self.rank_files[(tp_rank, pp_rank)]
        state = safe_torch_load(path)
        chunks = _model_chunks(state, path)
        rank = RankState(path, num_chunks=len(chunks))
        num_layers = arg(self.args, "num_layers")
        for chunk_index, chunk in enumerate(chunks):
            globals_, layers = _chunk_tensors(chunk, path)
            rank.globals.update(globals_)
            if len(chunks) > 1:  # virtual pipeline: chunk c of stage p starts at c*L/vp + p*L/(pp*vp)
                if num_layers is None:
                    raise ConversionError(f"{path}: virtual-pipeline checkpoint without args.num_layers")
                per_chunk = num_layers // (self.pp * len(chunks))
                offset = chunk_index * (num_layers // len(chunks)) + pp_rank * per_chunk
            else:
                offset = stage_offsets[pp_rank] if stage_offsets else 0
            for local, tensors in layers.items():
                rank.layers[offset + local] = tensors
        if self.is_mcore:
            from toolkits.megatron_hf.mcore_format import drop_tied_head_copy
            drop_tied_head_copy(rank, self.args)
        return rank

    def stage_layer_offsets(self) -> tuple[list[int], int]:
        """Where each stage's layers start, and the total; from the files, cross-checked with the args."""
        counts, chunked = [], False
        for p in range(self.pp):
            rank = self._load_rank(0, p, None)
            chunked = chunked or rank.num_chunks > 1
            local = sorted(rank.layers)
            if local != list(range(len(local))) and not chunked:
                raise ConversionError(f"{rank.path}: layer indices {local} are not 0..{len(local) - 1}; "
                                      f"the file is incomplete")
            counts.append(len(local))
        total = sum(counts)
        if chunked:
            return [0] * self.pp, total
        declared = arg(self.args, "num_layers")
        if declared is not None:
            expected = expected_stage_layer_counts(
                declared, self.pp, arg(self.args, "decoder_first_pipeline_num_layers"),
                arg(self.args, "decoder_last_pipeline_num_layers"),
                bool(arg(self.args, "standalone_embedding_stage", default=False)))
            if expected != counts:
                stage = next(p for p in range(self.pp) if expected[p] != counts[p])
                raise ConversionError(
                    f"{self.rank_files[(0, stage)]}: holds {counts[stage]} layers but the args (num_layers="
                    f"{declared}, PP={self.pp}) imply {expected[stage]} for stage {stage}; the checkpoint is "
                    f"incomplete or its args are wrong")
        offsets = [sum(counts[:p]) for p in range(self.pp)]
        return offsets, total


# ----------------------------------------------------------------------------- writing
# Nesting Megatron's loaders expect: the longest of these prefixes becomes nested dicts, the rest of the name
# stays one flat key (e.g. encoder -> {"layers.0.input_layernorm.weight": ...}).
_CONTAINERS = ("language_model.embedding.word_embeddings", "language_model.encoder",
               "language_model.output_layer", "word_embeddings_for_head")
NORM_NAME_STYLES = {
    "layernorm": {},  # Pai-Megatron-Patch and Megatron-LM up to 23.08
    "norm": {"input_layernorm": "input_norm", "post_attention_layernorm": "post_attention_norm",
             "final_layernorm": "final_norm"},  # Megatron-LM 23.09 and later (legacy models)
}


def nest_model_state(flat: dict[str, torch.Tensor], norm_names: str = "layernorm") -> dict:
    renames = NORM_NAME_STYLES[norm_names]
    nested: dict = {}
    for name, tensor in flat.items():
        name = ".".join(renames.get(part, part) for part in name.split("."))
        container = max((c for c in _CONTAINERS if name.startswith(c + ".")), key=len, default=None)
        if container is None:
            raise ValueError(f"no Megatron container for {name}")
        node = nested
        for part in container.split("."):
            node = node.setdefault(part, {})
        node[name[len(container) + 1:]] = tensor
    return nested


class _DataRecordCollector:
    """Stands in for torch's zip writer during torch.serialization._save: metadata records go to the real
    writer, tensor-data records are only noted (name, storage) to be written later with the real bytes."""

    def __init__(self, writer):
        self.writer = writer
        self.data_records: list[tuple[str, Any, int]] = []

    def write_record(self, name, data, size):
        if name.startswith("data/"):
            self.data_records.append((name, data, size))
        else:
            self.writer.write_record(name, data, size)


def _untouched_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor on its own anonymous mapping that is never written, so it occupies no memory and gives the
    address space back when freed (a malloc'd placeholder would leave free but resident holes in the heap
    that later allocations touch, growing the footprint layer after layer)."""
    nbytes = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


class RankFileWriter:
    """Writes one Megatron rank file, in torch.save's format, tensor by tensor as they are produced.

    Why: torch.save needs every tensor of a rank at once, and a rank of a large model is far bigger than a
    layer. Its zip format keeps the pickle (names, shapes, dtypes, storage keys) in one record and each
    tensor's bytes in a record of its own, so we run torch's own serializer on placeholder tensors (allocated
    but never touched, so they take no memory), note the record name it gives each one, and write the real
    bytes under that name when the tensor is ready. The file is what torch.save would write, CRCs included.
    Tensors must arrive in the order the pickle lists them (the order of `specs`).
    """

    def __init__(self, path: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 args: argparse.Namespace, norm_names: str, model_state=None):
        """`model_state(placeholders)` builds the `model` entry from the canonical names (default: legacy
        nesting with `norm_names`; mcore_format.mcore_model_state for Megatron-Core rank files)."""
        import pickle
        placeholders = {name: _untouched_tensor(shape, dtype) for name, (shape, dtype) in specs.items()}
        model = model_state(placeholders) if model_state else nest_model_state(placeholders, norm_names)
        state = {"model": model, "args": args,
                 "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0}
        path.parent.mkdir(parents=True, exist_ok=True)
        self._opener = torch.serialization._open_zipfile_writer(str(path))
        self._zip = self._opener.__enter__()
        collector = _DataRecordCollector(self._zip)
        torch.serialization._save(state, collector, pickle, torch.serialization.DEFAULT_PROTOCOL, False)
        name_of_storage = {t.untyped_storage()._cdata: name for name, t in placeholders.items()}
        self._queue = [(record, name_of_storage[storage._cdata], size)
                       for record, storage, size in collector.data_records]
        self._specs = specs
        self._written = 0
        self.path = path

    def write(self, name: str, tensor: torch.Tensor) -> None:
        record, expected, nbytes = self._queue[self._written]
        shape, dtype = self._specs[name]
        if name != expected or tuple(tensor.shape) != tuple(shape):
            raise AssertionError(f"{self.path}: expected {expected} next, got {name} {tuple(tensor.shape)}")
        data = tensor.to(dtype).contiguous()
        self._zip.write_record(record, data.data_ptr(), nbytes)
        self._written += 1

    def close(self) -> None:
        if self._written != len(self._queue):
            raise AssertionError(f"{self.path}: closed after {self._written} of {len(self._queue)} tensors")
        self._opener.__exit__(None, None, None)


def rank_file_path(iteration_dir: Path, tp_rank: int, pp_rank: int, pp: int) -> Path:
    return iteration_dir / rank_folder_name(tp_rank, pp_rank, pp) / RANK_FILE_NAMES[0]


def padded_vocab_size(vocab_rows: int, tp: int, divisible_by: int) -> int:
    """Megatron's _vocab_size_with_padding: round up to a multiple of divisible_by * TP."""
    multiple = divisible_by * tp
    return -(-vocab_rows // multiple) * multiple
