"""Megatron-Core checkpoints (Megatron-LM's `--use-mcore-models`, the default since core_r0.8) of the LLaMA family.

Two formats, both detected from the files:

    --ckpt-format torch        iter_*/mp_rank_XX[_YYY]/model_optim_rng.pt, one flat state_dict per rank
                               (`decoder.layers.0.self_attention.linear_qkv.weight`, ...), TP/PP/virtual pipeline
    --ckpt-format torch_dist   iter_*/{.metadata, __R_I.distcp, common.pt, metadata.json}: torch's distributed
                               checkpoint; every tensor whole (not split by rank), layers stacked:
                               `decoder.layers.self_attention.linear_qkv.weight` is [num_layers, rows, hidden]

Per rank, Megatron-Core keeps the legacy layouts: the fused `linear_qkv` is grouped per query group and
`linear_fc1` holds [gate_r; up_r]. In torch_dist, `linear_qkv` is the concatenation of the ranks (= the TP=1
layout) and `linear_fc1` is [gate; up] of the whole model (megatron-core's swiglu sharded factory) = the TP=1
layout too; so a torch_dist checkpoint reads as a TP=1, PP=1 one. Names are mapped onto the legacy canonical
names, so the model tables (llama2.py) and layouts (tensor_parallel.py) serve every format.

Transformer-Engine layer specs fuse the norms into the next linear (`linear_qkv.layer_norm_weight`,
`linear_fc1.layer_norm_weight`); the local spec has `input_layernorm` / `pre_mlp_layernorm` in its state_dict
but saves the Transformer-Engine names in torch_dist.

torch_dist is read with torch.distributed.checkpoint's own FileSystemReader, one layer at a time, after its
`.metadata` pickle was unpickled with an allow-list (torch's reader would run pickle.load on it). It is written
by a streaming writer of the same format (each chunk a torch.save record in a .distcp file, the Metadata pickle
listing them), which megatron-core's dist_checkpointing.load reads.
"""
from __future__ import annotations

import io
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from toolkits.megatron_hf.errors import ConversionError
from toolkits.megatron_hf.megatron_format import RankState, safe_torch_load

EMBEDDING = "language_model.embedding.word_embeddings.weight"
FINAL_NORM = "language_model.encoder.final_layernorm.weight"
OUTPUT_LAYER = "language_model.output_layer.weight"
HEAD_COPY = "word_embeddings_for_head.weight"  # a tied head's copy of the embedding on the last stage

GLOBAL_NAMES = {"embedding.word_embeddings.weight": EMBEDDING, "decoder.final_layernorm.weight": FINAL_NORM,
                "output_layer.weight": OUTPUT_LAYER}
# Megatron-Core layer-local name -> legacy canonical name; Transformer-Engine spelling first.
LAYER_NAMES_TE = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.weight": "self_attention.query_key_value.weight",
    "self_attention.linear_qkv.bias": "self_attention.query_key_value.bias",
    "self_attention.linear_proj.weight": "self_attention.dense.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.weight": "mlp.dense_h_to_4h.weight",
    "mlp.linear_fc2.weight": "mlp.dense_4h_to_h.weight",
}
_FUSED_NORMS = ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight")
LAYER_NAMES_LOCAL = {**{k: v for k, v in LAYER_NAMES_TE.items() if k not in _FUSED_NORMS},
                     "input_layernorm.weight": "input_layernorm.weight",
                     "pre_mlp_layernorm.weight": "post_attention_layernorm.weight"}
READ_LAYER_NAMES = {**LAYER_NAMES_TE, **LAYER_NAMES_LOCAL}
# Modules whose `_extra_state` Megatron-Core keeps in its state_dict (None on CPU / without FP8); a strict
# load_state_dict wants the keys. Transformer Engine's attention has one more.
EXTRA_STATE_MODULES = ["self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"]
EXTRA_STATE_MODULES_TE = EXTRA_STATE_MODULES + ["self_attention.core_attention"]
LAYER_SPECS = ("te", "local")

_MCORE_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)$")
_IGNORED = re.compile(r"_extra_state(/.*)?$|(^|\.)inv_freq$")


def is_mcore_state(model_state: dict) -> bool:
    return any(str(k).startswith(("decoder.", "embedding.")) for k in model_state)


def legacy_tensors(flat: dict[str, Any]) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """Megatron-Core names of one rank (or model chunk) -> (canonical globals, {local layer: {canonical name}}).
    Names we do not know stay as they are, so the shape check reports them instead of dropping them."""
    globals_, layers = {}, {}
    for name, value in flat.items():
        if _IGNORED.search(name):
            continue
        match = _MCORE_LAYER.match(name)
        if match:
            layers.setdefault(int(match.group(1)), {})[READ_LAYER_NAMES.get(match.group(2), match.group(2))] = value
        else:
            globals_[GLOBAL_NAMES.get(name, name)] = value
    return globals_, layers


def drop_tied_head_copy(rank: RankState, args: Any) -> None:
    """With tied embeddings and PP > 1, the last stage holds `output_layer.weight` as its copy of the embedding;
    it is not a head of its own (the args say so; without args we keep it as an untied head, same logits)."""
    if getattr(args, "untie_embeddings_and_output_weights", None) is False and EMBEDDING not in rank.globals:
        rank.globals.pop(OUTPUT_LAYER, None)


def mcore_model_state(flat: dict[str, Any], layer_spec: str, num_local_layers: int, last_stage: bool) -> dict:
    """Canonical names of one rank -> Megatron-Core's flat state_dict (what `model.state_dict()` holds)."""
    names = {v: k for k, v in (LAYER_NAMES_TE if layer_spec == "te" else LAYER_NAMES_LOCAL).items()}
    global_names = {v: k for k, v in GLOBAL_NAMES.items()}
    global_names[HEAD_COPY] = "output_layer.weight"
    state: dict[str, Any] = {}
    layer_prefix = "language_model.encoder.layers."
    extra = EXTRA_STATE_MODULES_TE if layer_spec == "te" else EXTRA_STATE_MODULES
    for name, value in flat.items():
        if name.startswith(layer_prefix):
            index, local = name[len(layer_prefix):].split(".", 1)
            state[f"decoder.layers.{index}.{names[local]}"] = value
        else:
            state[global_names[name]] = value
    for i in range(num_local_layers):
        for module in extra:
            state[f"decoder.layers.{i}.{module}._extra_state"] = None
    if last_stage:
        state["output_layer._extra_state"] = None
    return state


# ----------------------------------------------------------------------------- torch_dist: detection, metadata
def is_torch_dist(folder: Path) -> bool:
    return (folder / ".metadata").is_file() or (folder / "metadata.json").is_file()


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only the plain data classes torch's distributed checkpoint metadata consists of."""
    ALLOWED = {
        "torch.distributed.checkpoint.metadata": {
            "Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
            "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING"},
        "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData",
                                                 "BytesIOWriteData"},
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.serialization": {"_get_layout"},
        "torch": {"Size"},
        "collections": {"OrderedDict"},
    }

    def find_class(self, module: str, name: str):
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in self.ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of torch's checkpoint metadata")


def read_dcp_metadata(path: Path):
    try:
        with open(path, "rb") as file:
            metadata = _MetadataUnpickler(file).load()
    except pickle.UnpicklingError as exc:
        raise ConversionError(f"{path}: refusing to load: {exc}; loading it would run that code") from exc
    except Exception as exc:  # noqa: BLE001 - truncated or garbled file
        raise ConversionError(f"{path}: not a readable torch distributed-checkpoint metadata file ({exc})") from exc
    from torch.distributed.checkpoint.metadata import Metadata
    if not isinstance(metadata, Metadata):
        raise ConversionError(f"{path}: expected torch.distributed.checkpoint Metadata, found {type(metadata).__name__}")
    return metadata


# ----------------------------------------------------------------------------- torch_dist: reading
class LazyTensor:
    """One layer of a stacked torch_dist tensor (or a whole unstacked one), read only when `load()` is called."""

    def __init__(self, checkpoint: "TorchDistCheckpoint", key: str, layer: int | None):
        md = checkpoint.metadata.state_dict_metadata[key]
        self.checkpoint, self.key, self.layer = checkpoint, key, layer
        self.shape = tuple(md.size[1:] if layer is not None else md.size)
        self.dtype = md.properties.dtype

    def load(self) -> torch.Tensor:
        return self.checkpoint.read(self.key, self.layer)


def materialize(value) -> torch.Tensor:
    return value.load() if isinstance(value, LazyTensor) else value


class _RegionPlanner:
    """The two calls FileSystemReader.read_data makes: where each chunk's part goes."""

    def __init__(self, destination: torch.Tensor):
        self.destination = destination

    def resolve_tensor(self, item):
        target = self.destination
        for dim, (start, length) in enumerate(zip(item.dest_offsets, item.lengths)):
            target = target.narrow(dim, start, length)
        return target

    def commit_tensor(self, item, tensor) -> None:
        pass


@dataclass
class TorchDistCheckpoint:
    """A torch_dist iteration folder presented as a TP=1, PP=1 checkpoint of canonical names."""
    root: Path | None
    iteration_dir: Path
    args: Any
    checkpoint_version: float | None
    metadata: Any
    tp: int = 1
    pp: int = 1
    is_mcore: bool = True
    format: str = "torch_dist"

    @classmethod
    def open(cls, root: Path | None, iteration_dir: Path) -> "TorchDistCheckpoint":
        info_path = iteration_dir / "metadata.json"
        if info_path.is_file():
            backend = json.loads(info_path.read_text()).get("sharded_backend")
            if backend != "torch_dist":
                raise ConversionError(f"{info_path}: sharded_backend {backend!r}; only torch_dist is supported "
                                      f"(zarr checkpoints: re-save with --ckpt-format torch_dist)")
        if not (iteration_dir / ".metadata").is_file():
            raise ConversionError(f"{iteration_dir}: no .metadata file; the torch_dist checkpoint is incomplete")
        common = {}
        if (iteration_dir / "common.pt").is_file():
            common = safe_torch_load(iteration_dir / "common.pt")
        metadata = read_dcp_metadata(iteration_dir / ".metadata")
        checkpoint = cls(root, iteration_dir, common.get("args"), common.get("checkpoint_version"), metadata)
        from torch.distributed.checkpoint import FileSystemReader
        checkpoint._reader = FileSystemReader(str(iteration_dir))
        checkpoint._reader.set_up_storage_reader(metadata, is_coordinator=True)
        checkpoint._state = checkpoint._rank_state()
        return checkpoint

    @property
    def rank_files(self) -> dict:
        return {(0, 0): self.iteration_dir / ".metadata"}

    def _rank_state(self) -> RankState:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata
        flat: dict[str, Any] = {}
        for key, md in self.metadata.state_dict_metadata.items():
            if not key.startswith(("decoder.", "embedding.", "output_layer.")) or _IGNORED.search(key):
                continue  # optimizer state, rng state, ... : not part of the model
            if not isinstance(md, TensorStorageMetadata):
                raise ConversionError(f"{self.iteration_dir}: {key} is stored as an object, not a tensor")
            if key.startswith("decoder.layers.") and not _MCORE_LAYER.match(key):  # stacked: [layers, ...]
                local = key[len("decoder.layers."):]
                for i in range(md.size[0]):
                    flat[f"decoder.layers.{i}.{local}"] = LazyTensor(self, key, i)
            else:
                flat[key] = LazyTensor(self, key, None)
        if not flat:
            some = ", ".join(sorted(self.metadata.state_dict_metadata)[:5])
            raise ConversionError(f"{self.iteration_dir}/.metadata lists no Megatron-Core model tensors (embedding.*, "
                                  f"decoder.*, output_layer.*); it holds e.g. {some or 'nothing'}")
        globals_, layers = legacy_tensors(flat)
        rank = RankState(self.iteration_dir / ".metadata", globals=globals_, layers=layers)
        drop_tied_head_copy(rank, self.args)
        return rank

    def read(self, key: str, layer: int | None) -> torch.Tensor:
        """The region (layer `layer`, or all) of `key`, from every chunk that overlaps it."""
        from torch.distributed.checkpoint.metadata import MetadataIndex
        from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem
        md = self.metadata.state_dict_metadata[key]
        size = list(md.size)
        start = [0] * len(size)
        if layer is not None:
            start[0], size[0] = layer, 1
        destination = torch.empty(size, dtype=md.properties.dtype)
        items, covered = [], 0
        for chunk in md.chunks:
            lo = [max(s, c) for s, c in zip(start, chunk.offsets)]
            hi = [min(s + n, c + m) for s, n, c, m in zip(start, size, chunk.offsets, chunk.sizes)]
            if any(h <= l for l, h in zip(lo, hi)):
                continue
            lengths = [h - l for l, h in zip(lo, hi)]
            covered += int(torch.Size(lengths).numel())
            items.append(ReadItem(
                type=LoadItemType.TENSOR, dest_index=MetadataIndex(key, start),
                dest_offsets=torch.Size([l - s for l, s in zip(lo, start)]),
                storage_index=MetadataIndex(key, chunk.offsets),
                storage_offsets=torch.Size([l - c for l, c in zip(lo, chunk.offsets)]), lengths=torch.Size(lengths)))
        if covered != destination.numel():
            where = f"layer {layer} of " if layer is not None else ""
            raise ConversionError(f"{self.iteration_dir}: the chunks of {where}{key} cover {covered} of "
                                  f"{destination.numel()} elements; the checkpoint is incomplete")
        try:
            self._reader.read_data(LoadPlan(items), _RegionPlanner(destination)).wait()
        except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
            raise ConversionError(f"{self.iteration_dir}: could not read {key}: {exc}") from exc
        return destination[0] if layer is not None else destination

    def stage_layer_offsets(self) -> tuple[list[int], int]:
        return [0], len(self._state.layers)

    def load_stage(self, pp_rank: int, stage_offsets: list[int] | None = None) -> list[RankState]:
        return [self._state]


# ----------------------------------------------------------------------------- torch_dist: writing
class TorchDistWriter:
    """Writes a torch_dist checkpoint folder as a stream: each tensor (or one layer of a stacked tensor) is
    appended to `__0_0.distcp` as the torch.save record torch's FileSystemWriter would write, and noted; `close()`
    writes the `.metadata` pickle listing every chunk, `common.pt` (args, ...) and `metadata.json`."""

    FILE = "__0_0.distcp"

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.file = open(folder / self.FILE, "wb")
        self.tensors: dict[str, tuple[torch.Size, torch.dtype, list]] = {}
        self.objects: dict[str, Any] = {}

    def _append(self, obj) -> tuple[int, int]:
        offset = self.file.tell()
        torch.save(obj, self.file)
        return offset, self.file.tell() - offset

    def add_tensor(self, key: str, tensor: torch.Tensor, layer: int | None = None, num_layers: int = 0) -> None:
        tensor = tensor.detach().contiguous()
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()  # torch.save writes the whole storage; a view must not drag it along
        shape = torch.Size([num_layers, *tensor.shape]) if layer is not None else tensor.shape
        offsets = torch.Size([layer] + [0] * tensor.dim()) if layer is not None else torch.Size([0] * tensor.dim())
        global_shape, dtype, chunks = self.tensors.setdefault(key, (shape, tensor.dtype, []))
        if global_shape != shape or dtype != tensor.dtype:
            raise AssertionError(f"{key}: {tuple(shape)} {tensor.dtype} after {tuple(global_shape)} {dtype}")
        saved = tensor.unsqueeze(0) if layer is not None else tensor
        chunks.append((offsets, saved.shape, *self._append(saved)))

    def add_object(self, key: str, obj: Any) -> None:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        offset = self.file.tell()
        self.file.write(buffer.getvalue())
        self.objects[key] = (offset, self.file.tell() - offset)

    def close(self, common: dict) -> None:
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                           MetadataIndex, StorageMeta, TensorProperties,
                                                           TensorStorageMetadata)
        self.file.close()
        state_dict_metadata, storage_data = {}, {}
        for key, (shape, dtype, chunks) in self.tensors.items():
            state_dict_metadata[key] = TensorStorageMetadata(
                properties=TensorProperties(dtype=dtype), size=shape,
                chunks=[ChunkStorageMetadata(offsets=offsets, sizes=sizes) for offsets, sizes, _, _ in chunks])
            for offsets, _, offset, length in chunks:
                storage_data[MetadataIndex(key, offsets)] = _StorageInfo(self.FILE, offset, length)
        for key, (offset, length) in self.objects.items():
            state_dict_metadata[key] = BytesStorageMetadata()
            storage_data[MetadataIndex(key)] = _StorageInfo(self.FILE, offset, length)
        metadata = Metadata(state_dict_metadata=state_dict_metadata, storage_data=storage_data,
                            storage_meta=StorageMeta())
        with open(self.folder / ".metadata", "wb") as file:
            pickle.dump(metadata, file)
        torch.save(common, self.folder / "common.pt")
        (self.folder / "metadata.json").write_text(json.dumps(
            {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
             "common_backend_version": 1}))


def stacked_key(local_canonical: str) -> str:
    """torch_dist key of a layer tensor (Transformer-Engine names, as megatron-core saves every spec)."""
    return "decoder.layers." + {v: k for k, v in LAYER_NAMES_TE.items()}[local_canonical]


def global_key(canonical: str) -> str:
    return {v: k for k, v in GLOBAL_NAMES.items()}[canonical]
