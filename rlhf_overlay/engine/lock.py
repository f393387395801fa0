"""`upstream.lock`: which upstream commits we build on, and the digests of what we lay over them.

The format is TOML, one table per upstream. This module is its schema: what is written by hand, what is
written by `make lock` (never typed by a person), and the checks run on every load.

    [DeepSpeedExamples]                                   # upstream name = folder under upstream/ and overlays/
    url = "https://github.com/microsoft/DeepSpeedExamples.git"   # by hand: where `make setup` clones from
    commit = "83757d9c937daabd1089a08051061706cb73900d"   # by hand: the pin, full 40-hex sha
    sparse = ["applications/DeepSpeed-Chat", "!applications/DeepSpeed-Chat/assets"]  # by hand, optional:
                                                          #   sparse-checkout paths, "!" excludes (non-cone)
    install = ["applications/DeepSpeed-Chat"]             # by hand, optional: `pip install -e` these folders
    trees = { "applications/DeepSpeed-Chat" = "<40-hex>" }   # make lock: git tree id of each checked-out
                                                          #   path at the pin (verified on every setup)
    [DeepSpeedExamples.overlays."<path in upstream>"]     # make lock: one per file in overlays/<name>/
    sha256 = "<64-hex>"                                   #   digest of our overlay file
    base = "<40-hex blob at the pin>" | "new"             #   what upstream had there when we wrote it
    [DeepSpeedExamples.patches."0001-name.patch"]         # make lock: one per patch in the series
    sha256 = "<64-hex>"
    bases = { "<path the patch touches>" = "<40-hex blob at the pin>" | "new" }

Every error names the lock file and the line, and says what to do.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from rlhf_overlay.errors import UserError

SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
NEW_FILE = "new"  # `base` of an overlay/patch target that the pinned upstream does not have

LOCK_HEADER = """\
# upstream.lock — the pinned upstreams of rlhf-overlay and the verified digests of our overlays.
# Schema and checks: rlhf_overlay/engine/lock.py. Edit `url`, `commit`, `sparse` and `install` by hand;
# `trees`, `overlays` and `patches` are written by `make lock` (never by hand).
# After changing `commit`: `make verify` lists drifted overlays/patches, fix them, then `make lock`.
"""


class LockError(UserError, ValueError):
    """A malformed upstream.lock; the message names the file and line."""


@dataclass
class OverlayRecord:
    sha256: str
    base: str  # blob id at the pin, or NEW_FILE


@dataclass
class PatchRecord:
    sha256: str
    bases: dict[str, str] = field(default_factory=dict)  # path -> blob id at the pin, or NEW_FILE


@dataclass
class UpstreamSpec:
    name: str
    url: str
    commit: str
    sparse: list[str] = field(default_factory=list)
    install: list[str] = field(default_factory=list)
    trees: dict[str, str] = field(default_factory=dict)
    overlays: dict[str, OverlayRecord] = field(default_factory=dict)
    patches: dict[str, PatchRecord] = field(default_factory=dict)

    @property
    def sparse_includes(self) -> list[str]:
        return [p.strip("/") for p in self.sparse if not p.startswith("!")]

    def sparse_patterns(self) -> list[str]:
        """Non-cone sparse-checkout patterns: `/path/` includes, `!/path/` excludes."""
        # An include without a trailing slash matches a file or a whole folder; an exclude is written both
        # ways, since a folder-only pattern (`/x/`) would not match a file and vice versa.
        out = []
        for p in self.sparse:
            path = "/" + p.lstrip("!").strip("/")
            out += [f"!{path}", f"!{path}/"] if p.startswith("!") else [path]
        return out

    def tree_paths(self) -> list[str]:
        """Paths whose tree ids the lock records: the sparse includes, or the root (".")."""
        return self.sparse_includes or ["."]


@dataclass
class Lock:
    path: Path
    upstreams: dict[str, UpstreamSpec]


_UPSTREAM_KEYS = {"url": str, "commit": str, "sparse": list, "install": list, "trees": dict,
                  "overlays": dict, "patches": dict}
_REQUIRED = ("url", "commit")


def _line_of(text: str, table: str, key: str | None = None) -> int:
    """Best-effort line number of `key` inside `[table...]` (tomllib gives none for valid TOML)."""
    lines = text.splitlines()
    start = 0
    header = re.compile(r"^\s*\[\s*" + re.escape(table) + r"\s*[\].]")
    for i, line in enumerate(lines):
        if header.match(line):
            start = i
            break
    if key is None:
        return start + 1
    key_re = re.compile(r'^\s*"?' + re.escape(key) + r'"?\s*=')
    for i in range(start, len(lines)):
        if i > start and lines[i].lstrip().startswith("[") and not lines[i].lstrip().startswith(f"[{table}"):
            break
        if key_re.match(lines[i]):
            return i + 1
    return start + 1


def load_lock(path: Path) -> Lock:
    path = Path(path)
    if not path.is_file():
        raise LockError(f"{path}: lock file not found; it ships with the project (git checkout -- upstream.lock)")
    text = path.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # message already carries "(at line N, column M)"
        raise LockError(f"{path}: not valid TOML: {exc}") from None
    if not data:
        raise LockError(f"{path}:1: no upstream tables; expected e.g. [DeepSpeedExamples] with url and commit")
    upstreams = {}
    for name, entry in data.items():
        where = f"{path}:{_line_of(text, name)}"
        if not NAME_RE.match(name):
            raise LockError(f"{where}: upstream name {name!r} must be letters, digits, '.', '_' or '-'")
        if not isinstance(entry, dict):
            raise LockError(f"{where}: {name!r} must be a table ([{name}]), got a {type(entry).__name__}")
        upstreams[name] = _parse_upstream(name, entry, text, path)
    return Lock(path=path, upstreams=upstreams)


def _parse_upstream(name: str, entry: dict, text: str, path: Path) -> UpstreamSpec:
    def where(key=None):
        return f"{path}:{_line_of(text, name, key)}"

    for key, value in entry.items():
        if key not in _UPSTREAM_KEYS:
            raise LockError(f"{where(key)}: unknown key {key!r} in [{name}]; allowed: {', '.join(_UPSTREAM_KEYS)}")
        if not isinstance(value, _UPSTREAM_KEYS[key]):
            raise LockError(f"{where(key)}: [{name}] {key} must be a {_UPSTREAM_KEYS[key].__name__}, "
                            f"got {type(value).__name__} {value!r}")
    for key in _REQUIRED:
        if key not in entry:
            raise LockError(f"{where()}: [{name}] is missing the required field {key!r}")
    commit = entry["commit"]
    if not SHA1_RE.match(commit):
        raise LockError(f"{where('commit')}: [{name}] commit {commit!r} is not a full 40-hex lowercase sha; "
                        f"short or symbolic refs are not allowed (use `git rev-parse <ref>` to get the full sha)")
    if not entry["url"].strip():
        raise LockError(f"{where('url')}: [{name}] url is empty")
    for key in ("sparse", "install"):
        for item in entry.get(key, []):
            if not isinstance(item, str) or not item.strip("!/ "):
                raise LockError(f"{where(key)}: [{name}] {key} entries must be non-empty paths, got {item!r}")
            if ".." in Path(item.lstrip("!")).parts:
                raise LockError(f"{where(key)}: [{name}] {key} entry {item!r} must stay inside the repository")
    trees = entry.get("trees", {})
    for tpath, tid in trees.items():
        if not isinstance(tid, str) or not SHA1_RE.match(tid):
            raise LockError(f"{where(tpath)}: [{name}] trees.{tpath} = {tid!r} is not a 40-hex tree id; "
                            f"run `make lock` to recompute")
    overlays = {}
    for opath, rec in entry.get("overlays", {}).items():
        overlays[opath] = OverlayRecord(**_parse_record(name, "overlays", opath, rec, {"sha256", "base"}, where))
    patches = {}
    for pname, rec in entry.get("patches", {}).items():
        patches[pname] = PatchRecord(**_parse_record(name, "patches", pname, rec, {"sha256", "bases"}, where))
    return UpstreamSpec(name=name, url=entry["url"], commit=commit, sparse=list(entry.get("sparse", [])),
                        install=list(entry.get("install", [])), trees=dict(trees), overlays=overlays,
                        patches=patches)


def _parse_record(name, kind, key, rec, fields, where) -> dict:
    if not isinstance(rec, dict):
        raise LockError(f"{where(key)}: [{name}.{kind}] {key!r} must be a table; run `make lock` to rewrite it")
    unknown = set(rec) - fields
    missing = fields - set(rec)
    if unknown or missing:
        raise LockError(f"{where(key)}: [{name}.{kind}] {key!r} has unknown {sorted(unknown)} / missing "
                        f"{sorted(missing)} fields; run `make lock` to rewrite it")
    if not isinstance(rec["sha256"], str) or not SHA256_RE.match(rec["sha256"]):
        raise LockError(f"{where(key)}: [{name}.{kind}] {key!r} sha256 {rec['sha256']!r} is not 64 hex digits")
    bases = rec.get("bases", {"_": rec.get("base")})
    if not isinstance(bases, dict):
        raise LockError(f"{where(key)}: [{name}.{kind}] {key!r} bases must be a table")
    for b in bases.values():
        if not isinstance(b, str) or not (b == NEW_FILE or SHA1_RE.match(b)):
            raise LockError(f"{where(key)}: [{name}.{kind}] {key!r} base {b!r} must be a 40-hex blob id or "
                            f"{NEW_FILE!r}")
    return dict(rec)


def dump_lock(lock: Lock) -> str:
    """Serialise in a stable order, with the schema header, so diffs of the lock stay readable."""
    import tomli_w

    doc = {}
    for name, spec in lock.upstreams.items():
        entry = {"url": spec.url, "commit": spec.commit}
        if spec.sparse:
            entry["sparse"] = spec.sparse
        if spec.install:
            entry["install"] = spec.install
        if spec.trees:
            entry["trees"] = dict(sorted(spec.trees.items()))
        if spec.overlays:
            entry["overlays"] = {p: {"sha256": r.sha256, "base": r.base} for p, r in sorted(spec.overlays.items())}
        if spec.patches:
            entry["patches"] = {p: {"sha256": r.sha256, "bases": dict(sorted(r.bases.items()))}
                                for p, r in spec.patches.items()}
        doc[name] = entry
    return LOCK_HEADER + "\n" + tomli_w.dumps(doc)
