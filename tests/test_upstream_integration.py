"""The real upstreams, as `make setup` left them: at the pin, exactly pin + overlays, importable in the venv.

Skipped, with the reason, when the upstream work trees are not set up (no mirror and no setup cache).
"""
from __future__ import annotations

import subprocess
import sys

import git
import pytest

from rlhf_overlay import paths

from rlhf_overlay.engine import setup_engine
from rlhf_overlay.engine.lock import load_lock
from rlhf_overlay.runtime.runs import runtime_env

pytestmark = pytest.mark.upstream


def test_dschat_work_tree_is_pin_plus_overlays(dschat_dir):
    spec = load_lock(paths.LOCK_FILE).upstreams["DeepSpeedExamples"]
    repo = git.Repo(paths.upstream_dir("DeepSpeedExamples"))
    assert repo.head.is_detached and repo.head.commit.hexsha == spec.commit
    assert not (dschat_dir / "assets").exists(), "the media assets must stay out of the sparse checkout"
    assert setup_engine.verify_upstream(spec, paths.LOCK_FILE) == []


def test_trlx_work_tree_is_pin_plus_overlays(trlx_dir):
    spec = load_lock(paths.LOCK_FILE).upstreams["trlx"]
    repo = git.Repo(trlx_dir)
    assert repo.head.is_detached and repo.head.commit.hexsha == spec.commit
    assert setup_engine.verify_upstream(spec, paths.LOCK_FILE) == []


def _import_in_venv(code: str) -> subprocess.CompletedProcess:
    # A fresh interpreter from a neutral folder, so the import comes from the editable install, not the cwd.
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",
                          env=runtime_env(cpu=True), timeout=300)


def test_dschat_imports_from_the_work_tree(dschat_dir):
    res = _import_in_venv("import dschat.utils.utils as u, dschat.rlhf.ppo_trainer; print(u.__file__)")
    assert res.returncode == 0, res.stderr[-2000:]
    assert str(dschat_dir) in res.stdout


def test_trlx_imports_without_ray_or_wandb(trlx_dir):
    res = _import_in_venv("import trlx, sys; print(trlx.__file__); "
                          "print('ray' in sys.modules, 'wandb' in sys.modules)")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.split()
    assert str(trlx_dir) in lines[0] and lines[1:] == ["False", "False"]
