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

import hashlib
import os
import re
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


# A Hugging Face hub id: `name` or `org/name` (letters, digits, `_ . -`).
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
DATA_SUFFIXES = (".jsonl", ".json")


def looks_local(name: str) -> bool:
    """The one rule every job uses for MODEL/DATA/RM values: True = a local path, False = a hub id. A name is a hub id
    only when nothing exists at it and it is not path-like: absolute, ~ or ./-relative, deeper than org/name, a
    .json/.jsonl name, not of the hub id's form, or under a folder that exists here (`models/typo` when `models/`
    exists is a missing folder, not a hub id)."""
    if Path(name).expanduser().exists():
        return True
    parts = Path(name).parts
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") >= 2 or name.endswith(DATA_SUFFIXES)
            or ("/" in name and Path(parts[0]).is_dir()) or not HUB_ID.match(name))


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
