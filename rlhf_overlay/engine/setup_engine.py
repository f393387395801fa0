"""The setup engine: pinned upstream source -> work tree at the pin -> our overlays laid on top.

    python -m rlhf_overlay.engine.setup_engine sync   [--force] [--best-effort]   # what `make upstream` runs
    python -m rlhf_overlay.engine.setup_engine verify                              # `make verify`
    python -m rlhf_overlay.engine.setup_engine lock                                # `make lock`
    UPSTREAM_MIRROR=/srv/mirrors python -m rlhf_overlay.engine.setup_engine sync   # air-gapped: DIR/<name>.git

How it works, per upstream in upstream.lock:
1. Source. A bare mirror per upstream lives in the user cache (`<cache>/git/<name>.git`). If it holds the
   pinned commit, nothing is fetched. Otherwise it is (re)made with `git clone --mirror` from, in order,
   `$UPSTREAM_MIRROR/<name>.git`, `$UPSTREAM_MIRROR/<name>`, then the lock's url. Local mirrors are cloned
   with git's local (hard-link) transfer, which also works for snapshots that lack a few large blobs.
   The tree id of every checked-out path at the pin must equal the lock's `trees`.
2. Expected state. In a throw-away git index: read the pinned tree, `git apply --cached` each patch of
   `overlays/<name>/patches/series` in order, then add each overlay file. The result is one git tree id,
   "pin + overlays", computed without touching the work tree — so a failing patch changes nothing.
3. Work tree `upstream/<name>`: HEAD detached at the pin, sparse where the lock says so. Its git index
   holds "pin + overlays", so `git diff --cached` shows our overlays and `git status` shows anything a
   user changed. Before changing anything we look for such user edits; they are refused (listed), or with
   --force copied to `upstream/.backup/<name>-<time>/` first. Moving from the previous overlay state to
   the new one is `git read-tree -m -u OLD NEW`: only files that changed are rewritten.
A state file in the work tree's .git records the inputs' digest and the resulting tree, so a second run with
nothing changed is a no-op that touches nothing.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_overlay import paths
from rlhf_overlay.engine.lock import NEW_FILE, Lock, LockError, OverlayRecord, PatchRecord, UpstreamSpec, dump_lock, load_lock
from rlhf_overlay.errors import ArgumentParser, UserError, main_guard

STATE_FILE = "rlhf-overlay-state.json"  # inside <work tree>/.git
EXCLUDES = ["__pycache__/", "*.py[cod]", "*.egg-info/", "build/", ".eggs/"]  # pip -e and Python leave these


class SetupError(UserError, RuntimeError):
    """A setup problem with a message that says what was wrong, where, and what to do."""


# --------------------------------------------------------------------------------------------- helpers
def _git(*args, cwd=None, env=None) -> str:
    """Run a git command through GitPython and return stdout (stripped)."""
    import git

    g = git.Git(str(cwd) if cwd else None)
    full_env = None
    if env:
        full_env = dict(os.environ)
        full_env.update(env)
    return g.execute(["git", *map(str, args)], env=full_env, strip_newline_in_stdout=True)


def _git_ok(*args, cwd=None, env=None) -> tuple[bool, str]:
    import git

    try:
        return True, _git(*args, cwd=cwd, env=env)
    except git.GitCommandError as exc:
        return False, (exc.stderr or exc.stdout or str(exc)).strip().removeprefix("stderr: ").strip("'\n ")


from rlhf_overlay.paths import sha256_file  # noqa: E402


def _has_commit(repo: Path, commit: str) -> bool:
    return repo.exists() and _git_ok("cat-file", "-e", f"{commit}^{{commit}}", cwd=repo)[0]


def _blob_at(repo: Path, commit: str, path: str) -> str:
    ok, out = _git_ok("rev-parse", "--verify", "--quiet", f"{commit}:{path}", cwd=repo)
    return out if ok and out else NEW_FILE


# --------------------------------------------------------------------------------------------- overlays
@dataclass
class OverlaySet:
    """What overlays/<name>/ holds: whole files (by upstream path) and the ordered patch series."""
    name: str
    root: Path
    files: dict[str, Path] = field(default_factory=dict)       # upstream path -> our file
    patches: list[tuple[str, Path]] = field(default_factory=list)  # (patch name, file) in series order

    def patch_targets(self, patch_file: Path) -> list[str]:
        targets = []
        for line in patch_file.read_text(errors="replace").splitlines():
            m = re.match(r"^diff --git a/(\S+) b/(\S+)$", line)
            if m:
                targets.append(m.group(2))
        return targets


def collect_overlays(name: str, overlays_root: Path | None = None) -> OverlaySet:
    root = Path(overlays_root or paths.OVERLAYS_DIR) / name
    ov = OverlaySet(name=name, root=root)
    if not root.exists():
        return ov
    patch_dir = root / "patches"
    for f in sorted(root.rglob("*")):
        if not f.is_file() or "__pycache__" in f.parts or f.suffix in (".pyc",):
            continue
        rel = f.relative_to(root).as_posix()
        if rel.startswith("patches/"):
            continue
        ov.files[rel] = f
    series = patch_dir / "series"
    if series.exists():
        listed = set()
        for lineno, raw in enumerate(series.read_text().splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            pfile = patch_dir / line
            if not pfile.is_file():
                raise SetupError(f"{series}:{lineno}: patch {line!r} is listed but {pfile} does not exist")
            header = pfile.read_text(errors="replace").split("\ndiff --git", 1)[0]
            if not re.search(r"^Description:\s*\S", header, re.M):
                raise SetupError(f"{pfile}: patch has no DEP-3 header; start it with `Description: <what and why>`"
                                 f" (plus Origin:, Forwarded:, Last-Update:) before the diff")
            if not ov.patch_targets(pfile):
                raise SetupError(f"{pfile}: no `diff --git a/... b/...` section found; create it with `git diff`")
            ov.patches.append((line, pfile))
            listed.add(line)
        stray = sorted(p.name for p in patch_dir.glob("*.patch") if p.name not in listed)
        if stray:
            raise SetupError(f"{patch_dir}: {', '.join(stray)} not listed in {series}; add them or delete them")
    elif patch_dir.exists() and any(patch_dir.glob("*.patch")):
        raise SetupError(f"{patch_dir} holds patches but no `series` file listing their order")
    both = sorted(set(ov.files) & {t for _, p in ov.patches for t in ov.patch_targets(p)})
    if both:
        raise SetupError(f"overlays/{name}: {', '.join(both)} are both patched and replaced by a whole file; "
                         f"keep one of the two")
    return ov


def check_overlay_digests(spec: UpstreamSpec, ov: OverlaySet, lock_path: Path) -> list[str]:
    """Differences between overlays/<name>/ and the digests in the lock (empty = all recorded)."""
    problems = []
    for kind, files, recorded in (("overlay", ov.files.items(), spec.overlays), ("patch", ov.patches, spec.patches)):
        for name, f in files:
            rec = recorded.get(name)
            actual = sha256_file(f)
            if rec is None:
                problems.append(f"{kind} {f} is not recorded in {lock_path}")
            elif rec.sha256 != actual:
                problems.append(f"{kind} {f}: sha256 expected {rec.sha256} (lock), actual {actual}")
    for rel in sorted(set(spec.overlays) - set(ov.files)):
        problems.append(f"{lock_path} records overlay {rel} but overlays/{spec.name}/{rel} does not exist")
    for pname in sorted(set(spec.patches) - {p for p, _ in ov.patches}):
        problems.append(f"{lock_path} records patch {pname} but it is not in overlays/{spec.name}/patches/series")
    return problems


# --------------------------------------------------------------------------------------------- source
def mirror_candidates(name: str, mirror_env: str | None = None) -> list[str]:
    mirror_env = os.environ.get("UPSTREAM_MIRROR", "") if mirror_env is None else mirror_env
    out = []
    for d in [p for p in mirror_env.split(os.pathsep) if p.strip()]:
        out += [str(Path(d).expanduser() / f"{name}.git"), str(Path(d).expanduser() / name)]
    return out


def ensure_source(spec: UpstreamSpec, log=print) -> Path:
    """A bare mirror in the user cache that holds the pinned commit; fetch only when it does not."""
    cache = paths.cache_dir() / "git" / f"{spec.name}.git"
    if _has_commit(cache, spec.commit):
        return cache
    tried = []
    if cache.exists():
        tried.append(f"setup cache {cache}: does not hold commit {spec.commit}")
    sources = mirror_candidates(spec.name)
    mirror_set = bool(sources)
    sources = [s for s in sources if Path(s).exists()] + [spec.url]
    for cand in mirror_candidates(spec.name):
        if not Path(cand).exists():
            tried.append(f"{cand}: does not exist")
    for src in sources:
        log(f"[{spec.name}] cloning a mirror of {src} into {cache} ...")
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", suffix=".git", dir=cache.parent))
        shutil.rmtree(tmp)
        is_local = Path(src).exists()
        ok, out = _git_ok("clone", "--mirror", "--quiet", *(["--local"] if is_local else []), src, tmp,
                          env={"GIT_TERMINAL_PROMPT": "0"})
        if not ok:
            shutil.rmtree(tmp, ignore_errors=True)
            tried.append(f"{src}: clone failed: {out.splitlines()[-1] if out else 'unknown error'}")
            continue
        if not _has_commit(tmp, spec.commit):
            shutil.rmtree(tmp, ignore_errors=True)
            tried.append(f"{src}: reachable, but it does not contain the pinned commit {spec.commit}")
            continue
        if cache.exists():  # an older mirror without our commit: replace it as a whole
            old = cache.with_name(cache.name + f".old-{os.getpid()}")
            os.replace(cache, old)
            os.replace(tmp, cache)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, cache)
        return cache
    hint = ("set UPSTREAM_MIRROR to a folder holding a git copy named "
            f"{spec.name}.git or {spec.name} (bare or not) that contains commit {spec.commit}, "
            "or restore network access to the url")
    if mirror_set:
        hint = "check UPSTREAM_MIRROR; " + hint
    raise SetupError(f"[{spec.name}] no source holds the pinned commit {spec.commit}. Tried:\n  - "
                     + "\n  - ".join(tried) + f"\nTo fix: {hint}.")


def check_trees(spec: UpstreamSpec, repo: Path, lock_path: Path) -> None:
    if not spec.trees:
        raise SetupError(f"{lock_path}: [{spec.name}] has no `trees` record to verify the checkout against; "
                         f"run `make lock` (it computes them)")
    for tpath, expected in spec.trees.items():
        ref = f"{spec.commit}:" if tpath == "." else f"{spec.commit}:{tpath}"
        ok, actual = _git_ok("rev-parse", "--verify", "--quiet", ref, cwd=repo)
        if not ok or actual != expected:
            raise SetupError(
                f"[{spec.name}] tree of {tpath!r} at {spec.commit} is {actual or 'missing'}, but {lock_path} "
                f"records {expected}. If you changed `commit` in the lock, run `make lock`; otherwise the source "
                f"at {repo} is not the upstream the lock was made for.")


# --------------------------------------------------------------------------------------------- expected tree
def expected_tree(spec: UpstreamSpec, ov: OverlaySet, repo: Path) -> str:
    """Tree id of pin + patches + overlay files, built in a throw-away index (the work tree is untouched)."""
    with tempfile.TemporaryDirectory(prefix="rlhf-overlay-index-") as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        _git("read-tree", spec.commit, cwd=repo, env=env)
        for pname, pfile in ov.patches:
            ok, out = _git_ok("apply", "--cached", "--verbose", str(pfile), cwd=repo, env=env)
            if not ok:
                raise SetupError(f"[{spec.name}] patch {pfile} does not apply to the pinned commit "
                                 f"{spec.commit[:12]} (after the patches before it in the series); nothing was "
                                 f"changed. git says:\n{out}")
        for rel, f in ov.files.items():
            blob = _git("hash-object", "-w", str(f), cwd=repo)
            mode = "100755" if os.access(f, os.X_OK) else "100644"
            _git("update-index", "--add", "--cacheinfo", f"{mode},{blob},{rel}", cwd=repo, env=env)
        return _git("write-tree", "--missing-ok", cwd=repo, env=env)


def inputs_digest(spec: UpstreamSpec, ov: OverlaySet) -> str:
    h = hashlib.sha256()
    h.update(f"{spec.commit}\n{spec.sparse_patterns()}\n".encode())
    for rel, f in sorted(ov.files.items()):
        h.update(f"F {rel} {os.access(f, os.X_OK)} {sha256_file(f)}\n".encode())
    for pname, pfile in ov.patches:
        h.update(f"P {pname} {sha256_file(pfile)}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- work tree
def _read_state(tree: Path) -> dict:
    try:
        return json.loads((tree / ".git" / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _write_state(tree: Path, state: dict) -> None:
    f = tree / ".git" / STATE_FILE
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, f)


def user_edits(tree: Path) -> list[str]:
    """Files in the work tree that are neither the pin nor our overlays: `git status` relative to the index
    (which holds pin + overlays), plus staged changes if someone altered the index itself."""
    out = _git("status", "--porcelain=v1", "--untracked-files=all", "--ignore-submodules", cwd=tree)
    edits = []
    state = _read_state(tree)
    index_tree = _git("write-tree", "--missing-ok", cwd=tree)
    staged_by_user = state.get("tree") and index_tree != state["tree"]
    for line in out.splitlines():
        xy, path = line[:2], line[3:]
        if xy == "??" or xy[1] != " ":
            edits.append(path)
    if staged_by_user:
        edits += _git("diff", "--name-only", state["tree"], index_tree, cwd=tree).splitlines()
    return sorted(set(edits))


def backup_edits(name: str, tree: Path, edits: list[str], log=print) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    dest = paths.UPSTREAM_DIR / ".backup" / f"{name}-{stamp}"
    dest.mkdir(parents=True, exist_ok=True)
    deleted = []
    for rel in edits:
        src = tree / rel
        if src.is_file() or src.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel, follow_symlinks=False)
        else:
            deleted.append(rel)
    if deleted:
        (dest / "DELETED_FILES.txt").write_text("\n".join(deleted) + "\n")
    log(f"[{name}] backed up {len(edits)} edited file(s) to {dest}")
    return dest


def _new_work_tree(spec: UpstreamSpec, source: Path, tree: Path, log=print) -> None:
    log(f"[{spec.name}] checking out {spec.commit[:12]} into {tree}"
        + (f" (sparse: {', '.join(spec.sparse)})" if spec.sparse else ""))
    tree.parent.mkdir(parents=True, exist_ok=True)
    tmp = tree.with_name(f".{tree.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _git("clone", "--quiet", "--no-checkout", "--local", str(source), str(tmp))
    if spec.sparse:
        _git("sparse-checkout", "set", "--no-cone", *spec.sparse_patterns(), cwd=tmp)
    _git("-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach", spec.commit, cwd=tmp)
    (tmp / ".git" / "info").mkdir(exist_ok=True)
    (tmp / ".git" / "info" / "exclude").write_text("# written by rlhf-overlay setup\n" + "\n".join(EXCLUDES) + "\n")
    os.replace(tmp, tree)


@dataclass
class SyncResult:
    name: str
    changed: list[str]
    tree: str
    created: bool = False


def sync_upstream(spec: UpstreamSpec, lock_path: Path, force: bool = False, log=print,
                  overlays_root: Path | None = None) -> SyncResult:
    ov = collect_overlays(spec.name, overlays_root)
    problems = check_overlay_digests(spec, ov, lock_path)
    if problems:
        raise SetupError(f"[{spec.name}] overlays differ from {lock_path} (nothing was changed):\n  - "
                         + "\n  - ".join(problems)
                         + "\nIf you edited the overlays on purpose, record them with `make lock`.")
    tree = paths.upstream_dir(spec.name)
    digest = inputs_digest(spec, ov)
    state = _read_state(tree) if (tree / ".git").exists() else {}

    if (tree / ".git").exists():
        edits = user_edits(tree)
        if edits and not force:
            raise SetupError(
                f"[{spec.name}] {tree} holds edits that are neither the pin nor our overlays; refusing to touch "
                f"them:\n  - " + "\n  - ".join(edits[:50]) + ("\n  - ..." if len(edits) > 50 else "")
                + "\nMove your changes into overlays/ (then `make lock`), or re-run with FORCE=1 (--force) to "
                  "move them to a backup folder first.")
        head = _git("rev-parse", "HEAD", cwd=tree)
        if not edits and head == spec.commit and state.get("inputs") == digest and state.get("tree"):
            return SyncResult(spec.name, [], state["tree"])  # nothing to do
        if edits:
            backup_edits(spec.name, tree, edits, log=log)
            _restore_index_state(tree, state)
    source = ensure_source(spec, log=log)
    check_trees(spec, source, lock_path)
    created = False
    if (tree / ".git").exists() and not _has_commit(tree, spec.commit):
        # A pin bump: bring the commit in. A fetch can fail where the source lacks a large blob (snapshots);
        # the tree has no user edits at this point, so starting it afresh loses nothing.
        ok, _ = _git_ok("fetch", "--quiet", str(source), spec.commit, cwd=tree)
        if not ok:
            log(f"[{spec.name}] fetch into {tree} failed; re-creating the work tree from {source}")
            shutil.rmtree(tree)
    if not (tree / ".git").exists():
        _new_work_tree(spec, source, tree, log=log)
        created = True
        state = {}
    new_tree = expected_tree(spec, ov, tree)
    head = _git("rev-parse", "HEAD", cwd=tree)
    old_tree = _git("write-tree", "--missing-ok", cwd=tree)
    if head != spec.commit:
        # The pin moved. The index holds the old pin + overlays and the work tree matches it (no user edits),
        # so a two-way read-tree moves both straight to the new state; then HEAD is detached at the new pin.
        _git("read-tree", "-m", "-u", old_tree, new_tree, cwd=tree)
        _git("update-ref", "--no-deref", "HEAD", spec.commit, cwd=tree)
        if spec.sparse:
            _git("sparse-checkout", "set", "--no-cone", *spec.sparse_patterns(), cwd=tree)
    else:
        if old_tree != new_tree:
            _git("read-tree", "-m", "-u", old_tree, new_tree, cwd=tree)
        if spec.sparse and state.get("sparse") != spec.sparse_patterns():
            _git("sparse-checkout", "set", "--no-cone", *spec.sparse_patterns(), cwd=tree)
    changed = _git("diff", "--name-only", old_tree, new_tree, cwd=tree).splitlines() if old_tree != new_tree else []
    missing = [rel for rel in ov.files if not (tree / rel).is_file()]
    if missing:
        raise SetupError(f"[{spec.name}] overlay paths outside the sparse checkout ({', '.join(spec.sparse)}): "
                         f"{', '.join(missing)}; widen `sparse` in {lock_path} or move the overlays")
    _write_state(tree, {"commit": spec.commit, "inputs": digest, "tree": new_tree, "sparse": spec.sparse_patterns()})
    return SyncResult(spec.name, changed, new_tree, created=created)


def _restore_index_state(tree: Path, state: dict) -> None:
    """After a backup: put index and files back to the last applied state (pin + overlays)."""
    target = state.get("tree") or _git("rev-parse", "HEAD^{tree}", cwd=tree)
    _git("read-tree", "--reset", "-u", target, cwd=tree)
    _git("checkout-index", "--all", "--force", cwd=tree)
    _git("clean", "-fdq", cwd=tree)  # untracked files were backed up; ignored ones (caches) stay


# --------------------------------------------------------------------------------------------- verify / lock
def verify_upstream(spec: UpstreamSpec, lock_path: Path, log=print) -> list[str]:
    """Everything that makes upstream/<name> differ from pin + overlays, plus drift of overlay bases."""
    problems = []
    try:
        ov = collect_overlays(spec.name)
    except SetupError as exc:
        return [str(exc)]
    problems += check_overlay_digests(spec, ov, lock_path)
    tree = paths.upstream_dir(spec.name)
    cache = paths.cache_dir() / "git" / f"{spec.name}.git"
    repo = tree if (tree / ".git").exists() and _has_commit(tree, spec.commit) else cache
    if not _has_commit(repo, spec.commit):
        return problems + [f"[{spec.name}] pinned commit {spec.commit} not available locally; run `make upstream`"]
    problems += drift(spec, ov, repo)
    try:
        check_trees(spec, repo, lock_path)
    except SetupError as exc:
        problems.append(str(exc))
    if not (tree / ".git").exists():
        return problems + [f"[{spec.name}] work tree {tree} does not exist; run `make upstream`"]
    head = _git("rev-parse", "HEAD", cwd=tree)
    if head != spec.commit:
        problems.append(f"[{spec.name}] {tree} HEAD is {head}, the lock pins {spec.commit}; run `make upstream`")
    try:
        want = expected_tree(spec, ov, tree)
    except SetupError as exc:
        return problems + [str(exc)]
    have = _git("write-tree", "--missing-ok", cwd=tree)
    if have != want:
        diff = _git("diff", "--name-status", have, want, cwd=tree)
        problems.append(f"[{spec.name}] {tree} is not pin + current overlays; `make upstream` would change:\n"
                        + "\n".join("      " + line for line in diff.splitlines()))
    edits = user_edits(tree)
    if edits:
        problems.append(f"[{spec.name}] files edited in {tree} (not pin, not overlays): " + ", ".join(edits))
    return problems


def drift(spec: UpstreamSpec, ov: OverlaySet, repo: Path) -> list[str]:
    """Overlays/patches whose recorded upstream base is not what the pinned commit has (e.g. after a bump)."""
    out = []
    for rel, rec in spec.overlays.items():
        now = _blob_at(repo, spec.commit, rel)
        if now != rec.base:
            out.append(f"[{spec.name}] drift: overlay {rel} was written against upstream {rec.base}, the pin "
                       f"{spec.commit[:12]} has {now}; review the overlay against the new upstream, then `make lock`")
    for pname, rec in spec.patches.items():
        for rel, base in rec.bases.items():
            now = _blob_at(repo, spec.commit, rel)
            if now != base:
                out.append(f"[{spec.name}] drift: patch {pname} touches {rel}, written against upstream {base}, "
                           f"the pin {spec.commit[:12]} has {now}; refresh the patch, then `make lock`")
    return out


def relock(lock: Lock, log=print) -> Lock:
    """Recompute trees, digests and upstream bases from the current overlays and the pinned commits."""
    for spec in lock.upstreams.values():
        ov = collect_overlays(spec.name)
        repo = ensure_source(spec, log=log)
        spec.trees = {}
        for tpath in spec.tree_paths():
            ref = f"{spec.commit}:" if tpath == "." else f"{spec.commit}:{tpath}"
            ok, tid = _git_ok("rev-parse", "--verify", "--quiet", ref, cwd=repo)
            if not ok:
                raise SetupError(f"[{spec.name}] sparse path {tpath!r} does not exist at {spec.commit}")
            spec.trees[tpath] = tid
        spec.overlays = {rel: OverlayRecord(sha256_file(f), _blob_at(repo, spec.commit, rel))
                         for rel, f in ov.files.items()}
        spec.patches = {pname: PatchRecord(sha256_file(pfile),
                                           {t: _blob_at(repo, spec.commit, t) for t in ov.patch_targets(pfile)})
                        for pname, pfile in ov.patches}
        expected_tree(spec, ov, repo)  # refuse to record patches that do not apply
    return lock


def write_lock_atomic(lock: Lock) -> None:
    text = dump_lock(lock)
    tmp = lock.path.with_name(f".{lock.path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, lock.path)


# --------------------------------------------------------------------------------------------- CLI
def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m rlhf_overlay.engine.setup_engine", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["sync", "verify", "lock"],
                   help="sync: clone/verify pins and apply overlays; verify: check work trees and drift; "
                        "lock: recompute upstream.lock digests")
    p.add_argument("--lock", default=str(paths.LOCK_FILE), help="lock file (default: upstream.lock)")
    p.add_argument("--only", action="append", help="limit to this upstream (repeatable)")
    p.add_argument("--force", action="store_true", default=os.environ.get("FORCE", "0") not in ("", "0"),
                   help="move user edits inside upstream/ to upstream/.backup/ instead of refusing (env FORCE=1)")
    p.add_argument("--best-effort", action="store_true",
                   help="for tests: an upstream with no reachable source is recorded as unavailable "
                        "(upstream/.<name>.status) instead of failing")
    return p


@main_guard   # bad flags (and any UserError _main does not report itself) -> `error: ...`, exit 2
def main(argv=None) -> int:
    import git

    try:
        return _main(argv)
    except git.GitCommandError as exc:  # unexpected git failure: say which command and what git said
        print(f"error: git failed: {' '.join(map(str, exc.command))}\n{(exc.stderr or '').strip()}", file=sys.stderr)
        return 2


def engine_lock():
    """One setup engine at a time per project: two `make setup` / `make upstream` / `make lock` at once would move
    the same work trees. A kernel lock (fcntl.flock on upstream/.setup-engine.lock) that dies with its holder; a
    live holder is waited for with a message naming it, up to RLHF_LOCK_TIMEOUT. Returns the open lock file (keep
    it until done), or None where upstream/ cannot be written (a read-only prepared checkout: nothing to guard)."""
    from rlhf_overlay.runtime.waits import acquire_flock
    path = paths.UPSTREAM_DIR / ".setup-engine.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")
    except OSError:
        return None
    acquire_flock(f, f"the setup engine lock {path}",
                  "Another `make setup` / `make upstream` / `make lock` runs in this project; this one goes on when "
                  "it ends.")
    return f


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.monotonic()
    try:
        held = engine_lock()  # noqa: F841  (held until this process ends)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        lock = load_lock(Path(args.lock))
    except LockError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    names = args.only or list(lock.upstreams)
    unknown = [n for n in names if n not in lock.upstreams]
    if unknown:
        print(f"error: --only {unknown}: not in {args.lock} (known: {', '.join(lock.upstreams)})", file=sys.stderr)
        return 2
    if args.command == "lock":
        try:
            relock(lock)
        except SetupError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        write_lock_atomic(lock)
        print(f"wrote {args.lock}")
        return 0
    if args.command == "verify":
        problems = []
        for name in names:
            problems += verify_upstream(lock.upstreams[name], lock.path)
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            print(f"verify: {len(problems)} problem(s)", file=sys.stderr)
            return 1
        print(f"verify: {', '.join(names)} = pin + overlays, no drift")
        return 0
    rc = 0
    for name in names:
        spec = lock.upstreams[name]
        status = paths.UPSTREAM_DIR / f".{name}.status"
        try:
            res = sync_upstream(spec, lock.path, force=args.force)
        except SetupError as exc:
            status.parent.mkdir(parents=True, exist_ok=True)
            status.write_text(str(exc).splitlines()[0] + "\n")
            print(f"error: {exc}", file=sys.stderr)
            if args.best_effort and "no source holds the pinned commit" in str(exc):
                print(f"[{name}] unavailable: tests that need it will be skipped", file=sys.stderr)
                continue
            rc = 2
            continue
        status.write_text("ok\n")
        if res.created or res.changed:
            print(f"[{name}] at {spec.commit[:12]} + overlays (tree {res.tree[:12]}); updated {len(res.changed)} "
                  f"file(s)" + (": " + ", ".join(res.changed[:10]) if res.changed else ""))
        else:
            print(f"[{name}] up to date ({spec.commit[:12]} + overlays)")
    print(f"done in {time.monotonic() - t0:.2f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
