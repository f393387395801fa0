"""Resumable checkpoints of a run: `<run>/checkpoints/step-<N>/`, whole or absent, the newest KEEP_CHECKPOINTS kept.

A checkpoint is written into `checkpoints/.tmp-step-<N>/` and renamed to `step-<N>` only after every rank wrote its
part and the main rank wrote `trainer_state.json` (step, data position, PPO state, tensorboard step) last; a folder
killed half-written stays `.tmp-*`, is never used, and is removed by the next resume. Framework state (weights,
optimizer and scheduler state, ZeRO shards, the python/numpy/torch RNG states of each rank) is written by the
framework's own machinery (accelerate `save_state`, DeepSpeed `save_checkpoint`) into the same folder.

    schedule = Schedule(every=10, minutes=30, keep=2)     # CHECKPOINT_EVERY / CHECKPOINT_MINUTES / KEEP_CHECKPOINTS
    stop = StopRequest().install()                        # SIGINT / SIGTERM -> stop at the next step boundary
    ...at the end of step N:  if schedule.due(N) or stop.signal: save...; commit(run_dir, N, keep)
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

from rlhf_overlay.errors import ConfigError

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"  # written last by the main rank: its presence marks a complete checkpoint
_STEP = re.compile(r"^step-(\d+)$")


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    d = checkpoints_dir(run_dir)
    out = []
    if d.is_dir():
        for p in d.iterdir():
            m = _STEP.match(p.name)
            if m and p.is_dir() and (p / STATE_FILE).is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def newest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    ck = complete_checkpoints(run_dir)
    return ck[-1] if ck else None


def remove_partial(run_dir: Path) -> list[str]:
    """Remove checkpoints killed half-written (`.tmp-step-*`); returns their names."""
    d = checkpoints_dir(run_dir)
    gone = []
    if d.is_dir():
        for p in d.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p.name)
    return sorted(gone)


def tmp_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f".tmp-step-{step}"


def commit(run_dir: Path, step: int, keep: int) -> Path:
    """Rename the finished `.tmp-step-<step>` into `step-<step>` and delete all but the newest `keep` (>= 1)."""
    src, dst = tmp_dir(run_dir, step), checkpoints_dir(run_dir) / f"step-{step}"
    if not (src / STATE_FILE).is_file():
        raise RuntimeError(f"checkpoint {src} has no {STATE_FILE}: not complete, not committed")
    if dst.exists():  # the same step again (a resumed run stopped at once): the new one replaces it
        old = dst.with_name(f".old-{dst.name}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
    for _, p in complete_checkpoints(run_dir)[:-max(1, keep)]:
        shutil.rmtree(p, ignore_errors=True)
    return dst


def write_state(folder: Path, state: dict) -> None:
    tmp = folder / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, folder / STATE_FILE)


def read_state(folder: Path) -> dict:
    return json.loads((Path(folder) / STATE_FILE).read_text())


class Schedule:
    """When to write a checkpoint: every `every` steps (0 = not by steps) and/or when `minutes` passed since the
    last one (0 = not by time); `keep` = how many complete checkpoints stay."""

    def __init__(self, every: int = 0, minutes: float = 0.0, keep: int = 2):
        self.every, self.minutes, self.keep = int(every), float(minutes), int(keep)
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        if self.every and step % self.every == 0:
            return True
        return bool(self.minutes) and time.monotonic() - self.last >= self.minutes * 60

    def saved(self) -> None:
        self.last = time.monotonic()


def validate_schedule(every: int, minutes: float, keep: int) -> None:
    if every < 0:
        raise ConfigError(f"checkpoint_every (CHECKPOINT_EVERY)={every}: must be >= 0 (0 = by time only)")
    if minutes < 0:
        raise ConfigError(f"checkpoint_minutes (CHECKPOINT_MINUTES)={minutes}: must be >= 0 (0 = by steps only)")
    if keep < 1:
        raise ConfigError(f"keep_checkpoints (KEEP_CHECKPOINTS)={keep}: must be >= 1 (the newest checkpoint is what a "
                          f"resume continues from)")


class StopRequest:
    """SIGINT / SIGTERM (what a cluster scheduler sends before it kills) ask the run to stop at the next step
    boundary, after a checkpoint, instead of dying mid-step. A second signal changes nothing: the checkpoint is
    written once."""

    def __init__(self):
        self.signal: str | None = None

    def install(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal is None:
            print(f"\n[rlhf-overlay] {name} received: saving a checkpoint at the end of this step, then stopping",
                  flush=True)
        self.signal = self.signal or name

    def exit_code(self) -> int:
        return 128 + signal.Signals[self.signal].value if self.signal else 1


def agree(flags: list[bool], device=None) -> list[bool]:
    """The same decisions on every rank (any rank's True wins): a signal may reach one rank only, and a time-based
    checkpoint is decided by each rank's clock; all ranks must save (ZeRO shards) and stop together."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(flags)
    import torch

    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


def check_resume_settings(old: dict, new: dict, may_change: set[str], names: dict[str, str] | None = None) -> list[str]:
    """Refuse a resume whose settings differ from the run's where it matters; return the settings that changed and
    may (e.g. the number of steps). `names` maps a setting to the make variable that sets it, for the message."""
    names = names or {}
    changed = []
    for key in sorted(set(old) | set(new)):
        if key in new and key in old and new[key] != old[key]:
            if key in may_change:
                changed.append(key)
                continue
            label = f"{key} ({names[key]})" if key in names else key
            raise ConfigError(f"{label}: the run was started with {old[key]!r}, this resume asks for {new[key]!r}; a "
                              f"resume continues the same run, so this setting cannot change (omit it to use the "
                              f"run's, or start a new run)")
    return changed


def check_resume_folder(cfg, run_dir: Path) -> None:
    """RESUME=<run> continues in that folder: refuse OVERWRITE=1, and an OUTPUT that names another folder."""
    if cfg.overwrite:
        raise ConfigError("RESUME and OVERWRITE=1 contradict each other: RESUME continues a run in its folder, "
                          "OVERWRITE=1 starts a new one; pass one of them")
    if cfg.output and Path(cfg.output).expanduser().resolve() != run_dir:
        raise ConfigError(f"OUTPUT={cfg.output}: a resume continues in its own folder ({run_dir}); drop OUTPUT")
