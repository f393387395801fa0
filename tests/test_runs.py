"""Run folders: fresh by default, never silently reused, with the command, config and a tee'd log."""
from __future__ import annotations

import json
import sys

import pytest

from rlhf_overlay.runtime import runs
def test_new_run_dirs_are_unique(tmp_path):
    a = runs.prepare_run_dir("rm-bloom", runs_root=tmp_path)
    b = runs.prepare_run_dir("rm-bloom", runs_root=tmp_path)
    assert a != b and a.is_dir() and b.is_dir() and a.name.startswith("rm-bloom-")


def test_non_empty_output_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "pytorch_model.bin").write_text("an earlier model")
    with pytest.raises(runs.RunDirError, match=r"is not empty .* OVERWRITE=1"):
        runs.prepare_run_dir("rm-bloom", output=out)
    assert (out / "pytorch_model.bin").read_text() == "an earlier model"
    assert runs.prepare_run_dir("rm-bloom", output=out, overwrite=True) == out.resolve()
    (tmp_path / "file").write_text("x")
    with pytest.raises(runs.RunDirError, match="is a file"):
        runs.prepare_run_dir("rm-bloom", output=tmp_path / "file")


def test_record_invocation_and_run_logged(tmp_path, capfd):
    runs.record_invocation(tmp_path, ["python", "-m", "x", "--lr", "1e-3", "a b"], {"lr": 1e-3}, cwd="/w")
    assert (tmp_path / "command.txt").read_text() == "cd /w && python -m x --lr 1e-3 'a b'\n"
    assert json.loads((tmp_path / "config.json").read_text()) == {"lr": 0.001}
    rc = runs.run_logged([sys.executable, "-c", "import sys; print('step 1'); print('oops', file=sys.stderr); sys.exit(3)"],
                         tmp_path)
    assert rc == 3
    log = (tmp_path / "training.log").read_text()
    assert "step 1" in log and "oops" in log
    assert "step 1" in capfd.readouterr().out


def test_runtime_env_cpu_defaults_respect_user_settings(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    env = runs.runtime_env(cpu=True)
    assert env["OMP_NUM_THREADS"] == "2"           # the user's choice wins
    assert env["DS_ACCELERATOR"] == "cpu" and env["HF_HUB_OFFLINE"] == "1"
    assert env["TORCH_EXTENSIONS_DIR"].endswith("torch_extensions")
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert runs.runtime_env(cpu=True)["OMP_NUM_THREADS"] == "1"
