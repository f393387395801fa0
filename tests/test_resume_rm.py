"""Checkpoints and RESUME for the HF-Trainer reward models (rm-bloom, rm-gptj: rlhf_overlay.trlx_jobs.reward_model).

Integration (slow, tiny BLOOM, one CPU rank): a run SIGKILLed after its first mid-run checkpoint and resumed with
RESUME ends with the same reward model as an uninterrupted run (max |Δ| = 0); a run sent SIGTERM writes a checkpoint
at the next optimizer step, is marked interrupted, and the resume command it prints works as printed.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_overlay import PROJECT_ROOT
from helpers import job_env as _env, start_job, tb_scalars, wait_for as _wait_for
RUN = [sys.executable, "-m", "rlhf_overlay.trlx_jobs.reward_model", "--arch", "bloom", "--max-steps", "60"]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def _max_abs_diff(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    assert wa and wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def _start(args, out: Path, log: Path) -> subprocess.Popen:
    return start_job(RUN + args + ["--output", str(out)], log)


@pytest.fixture(scope="module")
def reference(tiny_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm-uninterrupted")
    res = subprocess.run(RUN + ["--checkpoint-every", "20", "--output", str(out), "--overwrite"], cwd=PROJECT_ROOT,
                         env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-40", "step-60"]  # KEEP_CHECKPOINTS=2
    return out


@pytest.mark.slow
def test_sigkilled_reward_model_resumes_bit_identically(reference, tmp_path):
    out = tmp_path / "run"
    proc = _start(["--checkpoint-every", "20"], out, tmp_path / "first.log")
    _wait_for(proc, lambda: (out / "checkpoints" / "step-20").is_dir())
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "reward_model").exists()
    res = subprocess.run([sys.executable, "-m", "rlhf_overlay.trlx_jobs.reward_model", "--resume", str(out)],
                         cwd=PROJECT_ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert re.search(r"resumed from step (20|40)", (out / "training.log").read_text())
    assert json.loads((out / "status.json").read_text())["state"] == "completed"
    assert _max_abs_diff(out / "reward_model", reference / "reward_model") == 0.0
    # one tensorboard point per logged step (points logged after the checkpoint by the killed run are purged)
    assert _scalars(out, "rm/loss") == _scalars(reference, "rm/loss")


def _scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    points = tb_scalars(run_dir / "tensorboard")[tag]
    assert len({s for s, _ in points}) == len(points), points
    return points


@pytest.mark.slow
def test_sigterm_stops_the_reward_model_at_a_checkpoint_and_the_printed_command_resumes(reference, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "first.log"
    proc = _start(["--checkpoint-every", "0", "--checkpoint-minutes", "0"], out, log)
    _wait_for(proc, lambda: "eval accuracy before training" in (out / "training.log").read_text()
              if (out / "training.log").is_file() else False)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=300)
    text = log.read_text()
    st = json.loads((out / "status.json").read_text())
    if rc == 0:
        pytest.fail(f"the run finished before SIGTERM reached it: {text[-2000:]}")
    assert rc == 143 and st["state"] == "interrupted" and st["signal"] == "SIGTERM", text[-3000:]
    assert 1 <= st["last_step"] < 60 and not (out / "reward_model").exists()
    printed = re.findall(r"^resume with: (.+)$", text, re.M)
    assert printed and printed[-1] == f"make rm-bloom RESUME={out}"
    res = subprocess.run(printed[-1], shell=True, cwd=PROJECT_ROOT, env=_env(), capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert _max_abs_diff(out / "reward_model", reference / "reward_model") == 0.0
