"""Where things live. One place, so scripts, tests and the setup engine agree.

- upstream work trees: <project>/upstream/<name>          (git-ignored, made by `make setup`)
- embedded tiny assets: <project>/assets                  (git-ignored, made by `make assets`)
- run folders:          <project>/runs/<kind>-<timestamp>  (git-ignored)
- user cache:           ${RLHF_OVERLAY_CACHE:-${XDG_CACHE_HOME:-~/.cache}/rlhf-overlay}
      git/<name>.git      bare mirror per upstream, so a second setup needs no network
      torch_extensions/   DeepSpeed's JIT-built CPU ops (~80 s to build once)
      hf/                 HF_HOME for anything transformers/datasets cache
"""
from __future__ import annotations

import os
from pathlib import Path

from rlhf_overlay import PROJECT_ROOT
LOCK_FILE = PROJECT_ROOT / "upstream.lock"
OVERLAYS_DIR = PROJECT_ROOT / "overlays"
UPSTREAM_DIR = PROJECT_ROOT / "upstream"
RUNS_DIR = PROJECT_ROOT / "runs"


def assets_dir() -> Path:
    return Path(os.environ.get("RLHF_OVERLAY_ASSETS") or PROJECT_ROOT / "assets")


def cache_dir() -> Path:
    explicit = os.environ.get("RLHF_OVERLAY_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "rlhf-overlay"


def upstream_dir(name: str) -> Path:
    return UPSTREAM_DIR / name


def dschat_dir() -> Path:
    """DeepSpeed-Chat inside the DeepSpeedExamples work tree (the package `dschat` lives here)."""
    return upstream_dir("DeepSpeedExamples") / "applications" / "DeepSpeed-Chat"


def trlx_dir() -> Path:
    return upstream_dir("trlx")
