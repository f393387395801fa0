"""HuggingFace model folders: read weights lazily, write safetensors shards as a stream, tokenizer files,
and the staged output folder both directions write into.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from toolkits.megatron_hf.errors import ConversionError

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
DTYPE_FROM_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}
DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt")


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '1000' -> bytes (HF's max_shard_size spelling, decimal units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", text.upper())
    if not match:
        raise ConversionError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB or a byte count")
    units = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(match.group(1)) * units[match.group(2)])


# ----------------------------------------------------------------------------- reading
class HFCheckpoint:
    """config.json plus a name -> file map over *.safetensors (preferred) or pytorch_model*.bin shards."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise ConversionError(f"{self.folder} is not a HuggingFace model folder: no config.json")
        self.config = json.loads(config_path.read_text())
        self.weight_files = self._weight_files()
        self._handles: dict[Path, object] = {}
        self.weight_map: dict[str, Path] = {}
        for path in self.weight_files:
            for name in self._names_in(path):
                self.weight_map[name] = path

    def _weight_files(self) -> list[Path]:
        for index_name, pattern in [(INDEX_FILE, "*.safetensors"), ("pytorch_model.bin.index.json", "*.bin")]:
            index = self.folder / index_name
            if index.is_file():
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                missing = [f for f in files if not (self.folder / f).is_file()]
                if missing:
                    raise ConversionError(f"{index} lists {', '.join(missing)}, which are missing from {self.folder}")
                return [self.folder / f for f in files]
            found = sorted(self.folder.glob(pattern))
            if found:
                return found
        raise ConversionError(f"{self.folder} has no *.safetensors or pytorch_model*.bin weights")

    def _open(self, path: Path):
        if path not in self._handles:
            if path.suffix == ".safetensors":
                from safetensors import safe_open
                self._handles[path] = safe_open(str(path), framework="pt")
            else:
                from toolkits.megatron_hf.megatron_format import safe_torch_load
                self._handles[path] = safe_torch_load(path)
        return self._handles[path]

    def _names_in(self, path: Path) -> list[str]:
        handle = self._open(path)
        return list(handle.keys())

    def shape_and_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        handle = self._open(self.weight_map[name])
        if isinstance(handle, dict):
            return tuple(handle[name].shape), handle[name].dtype
        piece = handle.get_slice(name)
        return tuple(piece.get_shape()), DTYPE_FROM_SAFETENSORS[piece.get_dtype()]

    def get(self, name: str) -> torch.Tensor:
        handle = self._open(self.weight_map[name])
        return handle[name] if isinstance(handle, dict) else handle.get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


# ----------------------------------------------------------------------------- writing safetensors
@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * torch.empty(0, dtype=self.dtype).element_size()


class SafetensorsShardWriter:
    """Writes safetensors shards tensor by tensor, never holding more than the tensor being written.

    safetensors' own writer needs every tensor of a shard in memory at once; the format is just an 8-byte
    header length, a JSON header with each tensor's byte range, then the bytes. Since the plan (names, shapes,
    dtypes, in write order) is known before converting, we write each shard's header up front and stream the
    bytes after it, then a standard `model.safetensors.index.json`.
    """

    def __init__(self, folder: Path, plan: list[PlannedTensor], max_shard_bytes: int):
        self.folder = folder
        shards: list[list[PlannedTensor]] = [[]]
        for item in plan:
            if shards[-1] and sum(t.nbytes for t in shards[-1]) + item.nbytes > max_shard_bytes:
                shards.append([])
            shards[-1].append(item)
        self.shard_names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        self.queue = [(shard_name, item) for shard_name, shard in zip(self.shard_names, shards) for item in shard]
        self.shards = dict(zip(self.shard_names, shards))
        self.total_bytes = sum(t.nbytes for t in plan)
        self.position = 0
        self.file = None
        self.current = None

    def _start_shard(self, shard_name: str) -> None:
        if self.file:
            self.file.close()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for item in self.shards[shard_name]:
            header[item.name] = {"dtype": SAFETENSORS_DTYPES[item.dtype], "shape": list(item.shape),
                                 "data_offsets": [offset, offset + item.nbytes]}
            offset += item.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8 bytes with spaces
        self.file = open(self.folder / shard_name, "wb")
        self.file.write(struct.pack("<Q", len(encoded)) + encoded)
        self.current = shard_name

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard_name, item = self.queue[self.position]
        if name != item.name or tuple(tensor.shape) != item.shape:
            raise AssertionError(f"writer expected {item.name} {item.shape}, got {name} {tuple(tensor.shape)}")
        if shard_name != self.current:
            self._start_shard(shard_name)
        tensor = tensor.to(item.dtype).contiguous()
        self.file.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
        self.position += 1

    def close(self) -> None:
        if self.position != len(self.queue):
            raise AssertionError(f"writer closed after {self.position} of {len(self.queue)} tensors")
        if self.file:
            self.file.close()
        weight_map = {item.name: shard_name for shard_name, item in self.queue}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


# ----------------------------------------------------------------------------- tokenizer files
def tokenizer_files(folder: Path | None) -> list[Path]:
    if folder is None or not Path(folder).is_dir():
        return []
    return [Path(folder) / name for name in TOKENIZER_FILES if (Path(folder) / name).is_file()]


def copy_tokenizer_files(files: list[Path], target: Path) -> None:
    for path in files:
        shutil.copy2(path, target / path.name)


def tokenizer_facts(folder: Path) -> dict:
    """len(tokenizer) and its special token ids, read with transformers (imported only when needed)."""
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - sentencepiece missing, broken json, ...
        raise ConversionError(f"could not load the tokenizer in {folder} ({exc}); fix it or pass --vocab-size "
                              f"instead of --tokenizer") from exc
    return {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


# ----------------------------------------------------------------------------- staged output
def check_target(target: Path, overwrite: bool, source: Path) -> None:
    """Refuse a TARGET that overlaps SOURCE, is a file, or holds something, unless --overwrite (checked before any
    work, and again before the final rename)."""
    target, source = Path(target).absolute(), Path(source).resolve()
    if target.resolve() == source or source in target.resolve().parents or target.resolve() in source.parents:
        raise ConversionError(f"TARGET {target} overlaps SOURCE {source}; write to a separate folder")
    if target.exists() and not target.is_dir():
        raise ConversionError(f"TARGET {target} exists and is a file; pass a folder path")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ConversionError(f"TARGET {target} is not empty; choose another folder or pass --overwrite "
                              f"(make: OVERWRITE=1) to replace it")


@contextlib.contextmanager
def staged_output_folder(target: Path, overwrite: bool, source: Path) -> Iterator[Path]:
    """Yield a fresh folder next to `target`; on success it replaces `target`, on failure it is removed.

    A half-written model is never left under the target's name, and a non-empty target is only replaced
    when the user said so.
    """
    check_target(target, overwrite, source)
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        check_target(target, overwrite, source)  # someone may have written there meanwhile
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
