"""Per-rank facts of a multi-rank run, for checking what each rank did (opt-in: RANK_REPORT=1).

When the environment variable RLHF_OVERLAY_RANK_REPORT names a folder (the make targets set it to
<run>/ranks with RANK_REPORT=1), every rank writes <folder>/<tag>-rank<r>.json at the end of training:

    {"rank": 1, "world_size": 2, "host": "node-b", "netns": "net:[4026532301]",   # where the rank ran
     "samples": ["3f2a...", ...],                                    # sha1 of each training sample it used
     "optimizers": {"actor": {"zero_stage": 2, "trainable_numel": 190784,
                              "optimizer_state_numel": 190784, ...}}}

- samples: a digest per training sample (its token ids without padding), or `row<i>` (its row in the data) where
  identical texts are common (PPO prompts), in the order the rank used them; two ranks sharing rows means the
  data were not split per rank (identical texts in different rows do share a digest).
- optimizers: DeepSpeed's own partition (ZeRO 1/2: `single_partition_of_fp32_groups`, the fp32 master slice
  this rank owns) and the numel of the optimizer's state tensors on this rank (Adam: exp_avg + exp_avg_sq).
  Under ZeRO-2 with 2 ranks each rank holds about half; without ZeRO each holds all of it. ZeRO-3 also
  partitions the parameters: `zero3_param_partition_numel` (this rank's slices, `p.ds_tensor`) of
  `zero3_param_numel` (the model's), about half each with 2 ranks.

Nothing is written unless the variable is set; the hooks cost one sha1 per sample.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Iterable

ENV = "RLHF_OVERLAY_RANK_REPORT"


def folder() -> Path | None:
    value = os.environ.get(ENV, "")
    return Path(value) if value else None


def _rank_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:
        pass
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def sample_digest(token_ids: Iterable[int], pad_id: int | None = None) -> str:
    """sha1 of a sample's token ids, padding removed (left or right), so the same text hashes the same."""
    ids = [int(t) for t in token_ids]
    if pad_id is not None:
        while ids and ids[-1] == pad_id:
            ids.pop()
        while ids and ids[0] == pad_id:
            ids.pop(0)
    return hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()[:16]


def _numel(x) -> int:
    return int(x.numel()) if hasattr(x, "numel") else 0


def optimizer_facts(engine_or_optimizer, model=None) -> dict:
    """What this rank's optimizer holds. Accepts a DeepSpeed engine, accelerate's optimizer wrapper, a ZeRO
    optimizer or a torch optimizer; unwraps `.optimizer` until it finds the one that owns the state."""
    facts: dict = {}
    engine = engine_or_optimizer
    if hasattr(engine, "zero_optimization_stage"):
        facts["zero_stage"] = int(engine.zero_optimization_stage())
        model = model or getattr(engine, "module", None)
    if model is not None:
        # ZeRO-3 empties p.data on every rank; ds_numel is the full size, ds_tensor this rank's partition
        facts["trainable_numel"] = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters()
                                       if p.requires_grad)
        partitioned = [p for p in model.parameters() if hasattr(p, "ds_tensor")]
        if partitioned:
            facts["zero3_param_numel"] = sum(int(p.ds_numel) for p in partitioned)
            facts["zero3_param_partition_numel"] = sum(_numel(p.ds_tensor) for p in partitioned)
    chain = []
    opt = engine_or_optimizer
    for _ in range(6):
        opt = getattr(opt, "optimizer", None)
        if opt is None:
            break
        chain.append(opt)
    if not chain and hasattr(engine_or_optimizer, "state"):
        chain = [engine_or_optimizer]
    facts["optimizer_classes"] = [type(o).__name__ for o in chain]
    zero = next((o for o in chain if hasattr(o, "single_partition_of_fp32_groups")), None)
    if zero is not None:
        facts["zero_partition_numel"] = sum(_numel(t) for t in zero.single_partition_of_fp32_groups)
        facts["zero_partition_count"] = int(getattr(zero, "partition_count", [0])[0]
                                            if isinstance(getattr(zero, "partition_count", None), list)
                                            else getattr(zero, "partition_count", 0) or 0)
    zero3 = next((o for o in chain if hasattr(o, "fp32_partitioned_groups_flat")), None)
    if zero3 is not None:   # ZeRO-3's fp32 master partition of this rank
        facts["zero_partition_numel"] = sum(_numel(t) for t in zero3.fp32_partitioned_groups_flat)
    inner = next((o for o in reversed(chain) if hasattr(o, "state") and isinstance(getattr(o, "state"), dict)),
                 None)
    if inner is not None:
        facts["optimizer_state_numel"] = {}
        for state in inner.state.values():
            for key, value in state.items():
                if hasattr(value, "numel") and value.dim() > 0:
                    facts["optimizer_state_numel"][key] = facts["optimizer_state_numel"].get(key, 0) + _numel(value)
    return facts


def where() -> dict:
    """The node this rank runs on: its hostname and network namespace (`net:[inode]`, Linux), so a several-node
    run shows which ranks ran where even when the nodes are namespaces of one machine."""
    try:
        netns = os.readlink("/proc/self/ns/net")
    except OSError:
        netns = None
    return {"host": socket.gethostname(), "netns": netns}


class RankReport:
    """Collects one rank's facts; `write()` saves them (no-op when the report is off)."""

    def __init__(self, tag: str):
        self.tag = tag
        self.dir = folder()
        self.samples: list[str] = []
        self.optimizers: dict[str, dict] = {}
        self.extra: dict = {}

    @property
    def enabled(self) -> bool:
        return self.dir is not None

    def add_samples(self, batch_ids, pad_id: int | None = None) -> None:
        """Record a batch of token-id rows (a 2-D tensor or a list of lists)."""
        if not self.enabled:
            return
        rows = batch_ids.tolist() if hasattr(batch_ids, "tolist") else batch_ids
        self.samples += [sample_digest(row, pad_id) for row in rows]

    def add_sample_ids(self, ids) -> None:
        """Record samples by their row number in the dataset (when identical texts are common, e.g. prompts)."""
        if self.enabled:
            self.samples += [f"row{int(i)}" for i in ids]

    def add_optimizer(self, name: str, engine_or_optimizer, model=None) -> None:
        if self.enabled:
            self.optimizers[name] = optimizer_facts(engine_or_optimizer, model)

    def write(self) -> Path | None:
        if not self.enabled:
            return None
        rank, world = _rank_world()
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{self.tag}-rank{rank}.json"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"tag": self.tag, "rank": rank, "world_size": world, **where(),
                                   "samples": self.samples, "optimizers": self.optimizers, **self.extra},
                                  indent=1) + "\n")
        os.replace(tmp, path)
        return path


def load(run_folder: str | os.PathLike, tag: str) -> list[dict]:
    """The reports of every rank for `tag`, sorted by rank (for tests and benchmarks)."""
    reports = [json.loads(p.read_text()) for p in sorted(Path(run_folder).glob(f"{tag}-rank*.json"))]
    return sorted(reports, key=lambda r: r["rank"])
