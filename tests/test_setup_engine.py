"""The setup engine against fake upstream repositories built with gitpython (no network, a few seconds)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import git
import pytest

from rlhf_overlay import paths

from rlhf_overlay.engine import setup_engine
from rlhf_overlay.engine.lock import LockError, load_lock

PATCH_HEADER = """Description: greet politely
 The upstream greeting is terse.
Origin: vendor
Forwarded: not-needed
Last-Update: 2026-11-23

"""


def _commit(repo: git.Repo, files: dict[str, str | None], message: str) -> str:
    for rel, text in files.items():
        f = Path(repo.working_tree_dir) / rel
        if text is None:
            repo.index.remove([rel], working_tree=True)
            continue
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
        repo.index.add([rel])
    return repo.index.commit(message).hexsha


class Sandbox:
    """A fake upstream `demo` with two commits, an overlays folder, a lock, a cache and an upstream dir."""

    def __init__(self, tmp: Path, monkeypatch):
        self.tmp = tmp
        self.src = tmp / "src" / "demo"
        self.repo = git.Repo.init(self.src, initial_branch="main")
        with self.repo.config_writer() as cw:
            cw.set_value("user", "name", "t").set_value("user", "email", "t@example.com")
        self.c1 = _commit(self.repo, {"lib/greet.py": "def greet():\n    return 'hi'\n",
                                      "lib/skip/huge.bin": "left out by the lock's sparse exclude\n",
                                      "lib/other.py": "X = 1\n", "docs/big.bin": "pretend this is huge\n",
                                      "README.md": "demo\n"}, "one")
        self.c2 = _commit(self.repo, {"lib/greet.py": "def greet():\n    return 'hey'\n"}, "two")
        self.overlays = tmp / "overlays"
        (self.overlays / "demo").mkdir(parents=True)
        self.upstream = tmp / "upstream"
        self.lock = tmp / "upstream.lock"
        monkeypatch.setattr(paths, "OVERLAYS_DIR", self.overlays)
        monkeypatch.setattr(paths, "UPSTREAM_DIR", self.upstream)
        monkeypatch.setenv("RLHF_OVERLAY_CACHE", str(tmp / "cache"))
        monkeypatch.delenv("UPSTREAM_MIRROR", raising=False)
        monkeypatch.delenv("FORCE", raising=False)
        self.url = self.src.as_uri()
        self.write_lock()

    def write_lock(self, commit=None, url=None, extra=""):
        self.lock.write_text(f'[demo]\nurl = "{url or self.url}"\ncommit = "{commit or self.c1}"\n'
                             f'sparse = ["lib", "README.md", "!lib/skip"]\n{extra}')

    def add_overlay(self, rel: str, text: str):
        f = self.overlays / "demo" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)

    def add_patch(self, name: str, body: str, header: str = PATCH_HEADER):
        pdir = self.overlays / "demo" / "patches"
        pdir.mkdir(parents=True, exist_ok=True)
        (pdir / name).write_text(header + body)
        series = pdir / "series"
        lines = series.read_text() if series.exists() else "# applied top to bottom\n"
        series.write_text(lines + name + "\n")

    def greet_patch(self, new="'hello, friend'"):
        return ("diff --git a/lib/greet.py b/lib/greet.py\n--- a/lib/greet.py\n+++ b/lib/greet.py\n"
                "@@ -1,2 +1,2 @@\n def greet():\n-    return 'hi'\n+    return " + new + "\n")

    def run(self, *args) -> int:
        return setup_engine.main([*args, "--lock", str(self.lock)])

    @property
    def tree(self) -> Path:
        return self.upstream / "demo"


@pytest.fixture
def sb(tmp_path, monkeypatch):
    return Sandbox(tmp_path, monkeypatch)


def test_checkout_at_pin_sparse_and_detached(sb, capsys):
    assert sb.run("lock") == 0
    assert sb.run("sync") == 0
    wt = git.Repo(sb.tree)
    assert wt.head.is_detached and wt.head.commit.hexsha == sb.c1
    assert (sb.tree / "lib/greet.py").read_text() == "def greet():\n    return 'hi'\n"
    assert not (sb.tree / "docs").exists(), "sparse checkout must leave out paths not listed"
    assert (sb.tree / "README.md").read_text() == "demo\n", "a file can be a sparse path"
    assert not (sb.tree / "lib/skip").exists(), "'!lib/skip' must exclude that folder"
    assert sb.run("verify") == 0
    assert "= pin + overlays, no drift" in capsys.readouterr().out


def test_lock_records_trees_and_setup_checks_them(sb, capsys):
    assert sb.run("lock") == 0
    lock = load_lock(sb.lock)
    assert set(lock.upstreams["demo"].trees) == {"lib", "README.md"}
    tampered = sb.lock.read_text().replace(lock.upstreams["demo"].trees["lib"], "0" * 40)
    sb.lock.write_text(tampered)
    assert sb.run("sync") == 2
    err = capsys.readouterr().err
    assert "tree of 'lib'" in err and "0" * 40 in err and "make lock" in err
    assert not sb.tree.exists()


@pytest.mark.parametrize("body, message", [
    ('[demo]\nurl = "x"\ncommit = "83757d9c"\n', r"upstream.lock:3: \[demo\] commit '83757d9c' is not a full 40-hex"),
    ('[demo]\nurl = "x"\ncommit = "' + "g" * 40 + '"\n', r":3: .*not a full 40-hex"),
    ('[demo]\nurl = "x"\ncommit = "' + "a" * 40 + '"\nbranch = "main"\n', r":4: unknown key 'branch'"),
    ('[demo]\nurl = "x"\n', r":1: \[demo\] is missing the required field 'commit'"),
    ('[demo]\ncommit = "' + "a" * 40 + '"\n', r"missing the required field 'url'"),
    ('[demo\nurl = "x"\n', r"not valid TOML.*line 1"),
    ('[demo]\nurl = "x"\ncommit = "' + "a" * 40 + '"\nsparse = "lib"\n', r":4: \[demo\] sparse must be a list"),
])
def test_malformed_lock_names_the_line(tmp_path, body, message):
    f = tmp_path / "upstream.lock"
    f.write_text(body)
    with pytest.raises(LockError, match=message):
        load_lock(f)


def test_real_lock_is_valid_and_pins_full_commits():
    lock = load_lock(paths.LOCK_FILE)
    assert lock.upstreams["DeepSpeedExamples"].commit == "83757d9c937daabd1089a08051061706cb73900d"
    assert lock.upstreams["trlx"].commit == "3340c2f3a56d1d14fdd5f13ad575121fa26b6d92"
    assert "!applications/DeepSpeed-Chat/assets" in lock.upstreams["DeepSpeedExamples"].sparse


def test_commit_missing_from_source_is_a_clear_error(sb, capsys):
    sb.write_lock(commit="1" * 40)
    assert sb.run("sync") == 2
    err = capsys.readouterr().err
    assert "does not contain the pinned commit " + "1" * 40 in err
    assert "UPSTREAM_MIRROR" in err


def test_unreachable_url_lists_sources_tried(sb, capsys, monkeypatch):
    sb.write_lock(url=(sb.tmp / "nowhere.git").as_uri())
    monkeypatch.setenv("UPSTREAM_MIRROR", str(sb.tmp / "no-mirror-here"))
    assert sb.run("sync") == 2
    err = capsys.readouterr().err
    assert "[demo] no source holds the pinned commit" in err
    assert "no-mirror-here/demo.git: does not exist" in err and "nowhere.git: clone failed" in err
    assert "set UPSTREAM_MIRROR to a folder holding a git copy named demo.git or demo" in err


@pytest.mark.parametrize("layout", ["bare", "non-bare"])
def test_mirror_override_when_url_is_unreachable(sb, monkeypatch, layout):
    mirrors = sb.tmp / "mirrors"
    mirrors.mkdir()
    if layout == "bare":
        git.Repo.clone_from(str(sb.src), str(mirrors / "demo.git"), mirror=True)
    else:
        git.Repo.clone_from(str(sb.src), str(mirrors / "demo"))
    assert sb.run("lock") == 0  # lock computed from the url first
    shutil.rmtree(sb.tmp / "cache")
    sb.write_lock(url=(sb.tmp / "nowhere.git").as_uri())
    assert sb.run("lock") != 0  # no source at all
    monkeypatch.setenv("UPSTREAM_MIRROR", str(mirrors))
    assert sb.run("lock") == 0 and sb.run("sync") == 0
    assert git.Repo(sb.tree).head.commit.hexsha == sb.c1


def test_offline_resetup_from_cache(sb):
    assert sb.run("lock") == 0 and sb.run("sync") == 0
    shutil.rmtree(sb.src)          # the "network" is gone
    shutil.rmtree(sb.tree)         # and the work tree too
    assert sb.run("sync") == 0
    assert (sb.tree / "lib/greet.py").exists()


def test_overlays_apply_idempotently_and_update_only_what_changed(sb, capsys):
    sb.add_overlay("lib/greet.py.orig-not-used", "")  # any path works; removed below
    (sb.overlays / "demo/lib/greet.py.orig-not-used").unlink()
    sb.add_overlay("lib/new_module.py", "# overlay: adds a module upstream lacks\nY = 2\n")
    sb.add_patch("0001-greet.patch", sb.greet_patch())
    assert sb.run("lock") == 0 and sb.run("sync") == 0
    assert "hello, friend" in (sb.tree / "lib/greet.py").read_text()
    assert (sb.tree / "lib/new_module.py").read_text().endswith("Y = 2\n")
    # The work tree is pin + overlays: HEAD at the pin, the index holds our overlays, nothing else changed.
    staged = git.Repo(sb.tree).git.diff("--cached", "--name-only").splitlines()
    assert sorted(staged) == ["lib/greet.py", "lib/new_module.py"]
    mtimes = {p: (sb.tree / p).stat().st_mtime_ns for p in ("lib/greet.py", "lib/new_module.py", "lib/other.py")}
    capsys.readouterr()
    assert sb.run("sync") == 0
    assert "[demo] up to date" in capsys.readouterr().out
    assert {p: (sb.tree / p).stat().st_mtime_ns for p in mtimes} == mtimes
    # Change one overlay file: only it is rewritten.
    sb.add_overlay("lib/new_module.py", "# overlay: adds a module upstream lacks\nY = 3\n")
    assert sb.run("lock") == 0 and sb.run("sync") == 0
    assert "updated 1 file(s): lib/new_module.py" in capsys.readouterr().out
    assert (sb.tree / "lib/new_module.py").read_text().endswith("Y = 3\n")
    assert (sb.tree / "lib/greet.py").stat().st_mtime_ns == mtimes["lib/greet.py"]
    assert sb.run("verify") == 0


def test_unrecorded_overlay_change_is_refused_before_anything_changes(sb, capsys):
    sb.add_overlay("lib/new_module.py", "Y = 2\n")
    assert sb.run("lock") == 0 and sb.run("sync") == 0
    sb.add_overlay("lib/new_module.py", "Y = 99\n")
    assert sb.run("sync") == 2
    err = capsys.readouterr().err
    assert "overlays differ from" in err and "sha256 expected" in err and "make lock" in err
    assert (sb.tree / "lib/new_module.py").read_text() == "Y = 2\n"


def _snapshot(tree: Path) -> dict[str, bytes]:
    return {p.relative_to(tree).as_posix(): p.read_bytes() for p in tree.rglob("*")
            if p.is_file() and ".git" not in p.relative_to(tree).parts}


def test_failing_patch_changes_nothing_and_names_patch_and_hunk(sb, capsys):
    sb.add_patch("0001-greet.patch", sb.greet_patch())
    assert sb.run("lock") == 0 and sb.run("sync") == 0
    before = _snapshot(sb.tree)
    # A second patch that expects text upstream does not have.
    bad = ("diff --git a/lib/other.py b/lib/other.py\n--- a/lib/other.py\n+++ b/lib/other.py\n"
           "@@ -1 +1 @@\n-X = 42\n+X = 43\n")
    sb.add_patch("0002-other.patch", bad)
    sb.add_overlay("lib/extra.py", "Z = 1\n")
    with pytest.raises(setup_engine.SetupError, match=r"0002-other.patch does not apply"):
        setup_engine.relock(load_lock(sb.lock))
    # Record digests by hand-free means (as if the lock was made before upstream moved), then sync.
    lock = load_lock(sb.lock)
    ov = setup_engine.collect_overlays("demo")
    spec = lock.upstreams["demo"]
    spec.overlays = {r: setup_engine.OverlayRecord(setup_engine.sha256_file(f), "new") for r, f in ov.files.items()}
    spec.patches = {n: setup_engine.PatchRecord(setup_engine.sha256_file(f), {}) for n, f in ov.patches}
    setup_engine.write_lock_atomic(lock)
    capsys.readouterr()
    assert sb.run("sync") == 2
    err = capsys.readouterr().err
    assert "0002-other.patch does not apply" in err and "lib/other.py" in err and "nothing was changed" in err
    assert _snapshot(sb.tree) == before


def test_patch_without_header_is_refused(sb):
    sb.add_patch("0001-greet.patch", sb.greet_patch(), header="")
    with pytest.raises(setup_engine.SetupError, match=r"0001-greet.patch: patch has no DEP-3 header"):
        setup_engine.collect_overlays("demo")


def test_unlisted_patch_and_double_claimed_path_are_refused(sb):
    pdir = sb.overlays / "demo" / "patches"
    pdir.mkdir()
    (pdir / "series").write_text("")
    (pdir / "0009-stray.patch").write_text(PATCH_HEADER + sb.greet_patch())
    with pytest.raises(setup_engine.SetupError, match="0009-stray.patch not listed in"):
        setup_engine.collect_overlays("demo")
    (pdir / "0009-stray.patch").unlink()
    sb.add_patch("0001-greet.patch", sb.greet_patch())
    sb.add_overlay("lib/greet.py", "whole file\n")
    with pytest.raises(setup_engine.SetupError, match="lib/greet.py are both patched and replaced"):
        setup_engine.collect_overlays("demo")


def test_user_edit_is_refused_and_preserved_then_backed_up_with_force(sb, capsys, monkeypatch):
    sb.add_overlay("lib/new_module.py", "Y = 2\n")
    assert sb.run("lock") == 0 and sb.run("sync") == 0
    (sb.tree / "lib/other.py").write_text("X = 'my local experiment'\n")
    (sb.tree / "lib/notes.txt").write_text("my notes\n")
    sb.add_overlay("lib/new_module.py", "Y = 3\n")
    assert sb.run("lock") == 0
    capsys.readouterr()
    assert sb.run("sync") == 2
    err = capsys.readouterr().err
    assert "refusing to touch them" in err and "lib/other.py" in err and "lib/notes.txt" in err and "FORCE=1" in err
    assert (sb.tree / "lib/other.py").read_text() == "X = 'my local experiment'\n"
    assert (sb.tree / "lib/new_module.py").read_text() == "Y = 2\n"
    assert sb.run("verify") == 1
    assert sb.run("sync", "--force") == 0
    out = capsys.readouterr().out
    backups = list((sb.upstream / ".backup").glob("demo-*"))
    assert len(backups) == 1 and str(backups[0]) in out
    assert (backups[0] / "lib/other.py").read_text() == "X = 'my local experiment'\n"
    assert (backups[0] / "lib/notes.txt").read_text() == "my notes\n"
    assert (sb.tree / "lib/other.py").read_text() == "X = 1\n"
    assert not (sb.tree / "lib/notes.txt").exists()
    assert (sb.tree / "lib/new_module.py").read_text() == "Y = 3\n"
    assert sb.run("verify") == 0


def test_pin_bump_reports_drift_then_moves_after_relock(sb, capsys):
    sb.add_patch("0001-greet.patch", sb.greet_patch())
    sb.add_overlay("lib/other.py", "X = 'ours'\n")
    assert sb.run("lock") == 0 and sb.run("sync") == 0
    # A maintainer bumps the pin to c2, where upstream changed lib/greet.py under our patch.
    sb.lock.write_text(sb.lock.read_text().replace(sb.c1, sb.c2))
    capsys.readouterr()
    assert sb.run("verify") == 1
    err = capsys.readouterr().err
    assert "drift: patch 0001-greet.patch touches lib/greet.py" in err
    assert "drift: overlay lib/other.py" not in err  # upstream did not change that file
    assert "HEAD is " + sb.c1 in err
    # The patch no longer applies at c2: lock refuses, listing the failing patch.
    assert sb.run("lock") == 2
    assert "0001-greet.patch does not apply" in capsys.readouterr().err
    # Refresh the patch for the new upstream, relock, sync: the tree moves to c2 + overlays.
    (sb.overlays / "demo/patches/0001-greet.patch").write_text(PATCH_HEADER + sb.greet_patch().replace(
        "-    return 'hi'", "-    return 'hey'"))
    assert sb.run("lock") == 0 and sb.run("sync") == 0
    assert git.Repo(sb.tree).head.commit.hexsha == sb.c2
    assert "hello, friend" in (sb.tree / "lib/greet.py").read_text()
    assert sb.run("verify") == 0


def test_overlay_outside_sparse_checkout_is_reported(sb, capsys):
    sb.add_overlay("docs/extra.md", "outside\n")
    assert sb.run("lock") == 0
    assert sb.run("sync") == 2
    assert "overlay paths outside the sparse checkout" in capsys.readouterr().err


def test_best_effort_records_unavailable_upstream(sb, capsys):
    sb.write_lock(url=(sb.tmp / "nowhere.git").as_uri())
    assert sb.run("sync", "--best-effort") == 0
    status = (sb.upstream / ".demo.status").read_text()
    assert "no source holds the pinned commit" in status


def test_shell_scripts_parse_and_make_help_lists_targets():
    root = paths.PROJECT_ROOT
    for script in [root / "setup.sh", *sorted((root / "training_scripts").glob("*.sh"))]:
        subprocess.run(["bash", "-n", str(script)], check=True)
    out = subprocess.run(["make", "-s", "help"], cwd=root, capture_output=True, text=True, check=True).stdout
    for target in ["setup", "upstream", "verify", "lock", "assets", "test", "rm-llama2", "ppo-llama2", "rm-bloom",
                   "rm-gptj", "ppo-bloom", "ppo-gptj", "ppo-smoke-test", "report"]:
        assert f" {target} " in out.replace("\x1b[36m", " ").replace("\x1b[0m", " "), target


def test_engine_help_is_instant():
    out = subprocess.run([os.sys.executable, "-m", "rlhf_overlay.engine.setup_engine", "--help"], capture_output=True,
                         text=True, check=True, cwd=paths.PROJECT_ROOT).stdout
    assert "sync" in out and "verify" in out and "lock" in out


def test_make_does_not_leak_its_builtin_rm_variable():
    # make predefines RM = "rm -f"; the Makefile must export an empty RM unless the user sets one.
    env = {k: v for k, v in os.environ.items() if k != "RM"}
    out = subprocess.run(["make", "-s", "-p", "help"], cwd=paths.PROJECT_ROOT, env=env, capture_output=True,
                         text=True).stdout
    assert "\nRM := \n" in out
    env["RM"] = "/models/rm"
    out = subprocess.run(["make", "-s", "-p", "help"], cwd=paths.PROJECT_ROOT, env=env, capture_output=True,
                         text=True).stdout
    assert "\nRM = /models/rm\n" in out
