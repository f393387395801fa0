"""Shared fixtures.

Markers (registered in pyproject.toml, --strict-markers):
  upstream — needs the real upstream work trees made by `make setup`; such tests are skipped, with the reason,
             when the work tree is absent (no mirror and no setup cache on this machine).
  slow     — trains or converts for more than a few seconds (CPU only; still part of `make test`).
Plain helper functions several test files share (tensorboard reader, job subprocesses, entry-module inputs) are in
tests/helpers.py.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from rlhf_overlay import PROJECT_ROOT
# Tests never touch the network or the hub, and tiny models run fastest with one thread per process.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _upstream_problem(name: str, probe: str) -> str | None:
    """Why the upstream work tree `name` cannot be used, or None when it is ready."""
    from rlhf_overlay.paths import upstream_dir
    tree = upstream_dir(name)
    if not (tree / ".git").exists():
        return (f"upstream {name} is not set up at {tree}: no upstream mirror or setup cache was available "
                f"(run `UPSTREAM_MIRROR=<dir with {name}.git> make setup` to enable these tests)")
    if not (tree / probe).exists():
        return f"upstream {name} at {tree} lacks {probe}; re-run `make upstream`"
    status_file = PROJECT_ROOT / "upstream" / f".{name}.status"
    if status_file.exists() and status_file.read_text().strip() != "ok":
        return f"upstream {name}: last setup reported: {status_file.read_text().strip()}"
    return None


def _ready(name: str, probe: str) -> None:
    problem = _upstream_problem(name, probe)
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="session")
def dschat_dir() -> Path:
    """DeepSpeed-Chat folder of the set-up DeepSpeedExamples work tree (skips, with the reason, if absent)."""
    _ready("DeepSpeedExamples", "applications/DeepSpeed-Chat/dschat")
    from rlhf_overlay.paths import dschat_dir as _d
    return _d()


@pytest.fixture(scope="session")
def trlx_dir() -> Path:
    """The set-up trlx work tree (skips, with the reason, if absent)."""
    _ready("trlx", "trlx/__init__.py")
    from rlhf_overlay.paths import trlx_dir as _d
    return _d()


@pytest.fixture(scope="session")
def tiny_assets() -> Path:
    """The embedded tiny models/tokenizers/data (built once, deterministically, offline)."""
    from rlhf_overlay.data.tiny_assets import ensure_tiny_assets
    return ensure_tiny_assets()


@pytest.fixture(autouse=True)
def _no_launcher_env():
    """No test inherits a distributed launcher's variables that an earlier in-process test (or helper) left in
    os.environ, and none leaves them behind: the entry modules read LOCAL_RANK as "started under a launcher" and
    refuse. They are removed before and after each test, never restored (monkeypatch would restore a value a test
    had set itself, and module fixtures of the next file would see it: a full CI run failed that way)."""
    names = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
    for name in names:
        os.environ.pop(name, None)
    yield
    for name in names:
        os.environ.pop(name, None)


@pytest.fixture(autouse=True, scope="module")
def _no_shm_left_behind():
    """After each test file, DeepSpeed all-reduce buffers no live process uses are removed from /dev/shm (RAM):
    jobs a test starts without rlhf_overlay's launcher (seed commands, upstream suites, killed runs) leave 69 MB per
    rank there, and a full run piled up GBs until the OOM killer took later ranks (rlhf_overlay/runtime/shm.py)."""
    yield
    from rlhf_overlay.runtime.shm import sweep
    sweep(quiet=True)
