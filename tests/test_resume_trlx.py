"""Checkpoints and RESUME for trlx PPO (ppo-smoke-test, ppo-bloom, ppo-gptj share rlhf_overlay.trlx_jobs.ppo).

Integration (upstream + slow, tiny BLOOM, one CPU rank): a run SIGKILLed after its first mid-run checkpoint, with a
half-written checkpoint left behind, resumed with RESUME, ends with the same policy as an uninterrupted run (max |Δ|
= 0), the same per-step metrics and one tensorboard point per step; a run sent SIGTERM stops at the next step
boundary with a checkpoint, says it was interrupted, and the resume command it prints works as printed.
Unit: a resume that changes a setting that matters is refused, naming it; one without a checkpoint is refused.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_overlay import PROJECT_ROOT
from rlhf_overlay.errors import ConfigError
from helpers import job_env as _env, run_printed_resume, start_job, tb_scalars, wait_for as _wait_for

STEPS = 5
RUN = [sys.executable, "-m", "rlhf_overlay.trlx_jobs.ppo", "--arch", "bloom", "--reward", "rule", "--steps", str(STEPS)]


def _start(args, out: Path, log: Path) -> subprocess.Popen:
    return start_job(RUN + args + ["--output", str(out)], log)


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(folder / "model.safetensors"))


def _max_abs_diff(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def _scalar_steps(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    return tb_scalars(run_dir / "tensorboard")[tag]


@pytest.fixture(scope="module")
def reference(trlx_dir, tiny_assets, tmp_path_factory):
    """The uninterrupted run: checkpoints every 2 PPO steps (2 and 4 of 5)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    res = subprocess.run(RUN + ["--checkpoint-every", "2", "--output", str(out), "--overwrite"], cwd=PROJECT_ROOT,
                         env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


@pytest.mark.upstream
@pytest.mark.slow
def test_sigkilled_run_resumes_bit_identically(reference, tmp_path):
    assert [p.name for p in sorted((reference / "checkpoints").iterdir())] == ["step-2", "step-4"]
    st = json.loads((reference / "status.json").read_text())
    assert st["state"] == "completed" and st["last_step"] == 4 and st["exit_code"] == 0
    out = tmp_path / "run"
    proc = _start(["--checkpoint-every", "2"], out, tmp_path / "first.log")
    _wait_for(proc, lambda: (out / "checkpoints" / "step-2").is_dir())
    os.killpg(proc.pid, signal.SIGKILL)                     # the whole job, as a dead node would
    proc.wait()
    assert not (out / "policy").exists()                    # the model folder of a killed run is absent
    # a new run into the killed run's folder is refused, and says how to resume
    again = subprocess.run(RUN + ["--output", str(out)], cwd=PROJECT_ROOT, env=_env(), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 2 and f"incomplete run" in again.stderr and f"RESUME={out}" in again.stderr
    # a checkpoint killed while being written (no trainer_state.json) is ignored: the complete one is used
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    half = out / "checkpoints" / f".tmp-step-{int(newest.name.split('-')[1]) + 1}"
    half.mkdir()
    (half / "pytorch_model.bin").write_bytes((newest / "pytorch_model.bin").read_bytes()[:1000])
    res = subprocess.run([sys.executable, "-m", "rlhf_overlay.trlx_jobs.ppo", "--resume", str(out)], cwd=PROJECT_ROOT,
                         env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"ignored and removed half-written checkpoint(s) {half.name}" in res.stdout and not half.exists()
    log = (out / "training.log").read_text()
    assert f"resumed from step {newest.name.split('-')[1]}" in log
    commands = (out / "command.txt").read_text()
    assert "--output" in commands and f"--resume {out}" in commands and "# resumed" in commands
    assert json.loads((out / "status.json").read_text())["state"] == "completed"
    # the same policy, bit for bit, and the same run history
    assert _max_abs_diff(out / "policy", reference / "policy") == 0.0
    ref_m, m = (json.loads((d / "metrics.json").read_text()) for d in (reference, out))
    assert [s["reward_mean"] for s in m["steps"]] == [s["reward_mean"] for s in ref_m["steps"]]
    assert _scalar_steps(out, "ppo/reward_mean") == _scalar_steps(reference, "ppo/reward_mean")
    assert [s for s, _ in _scalar_steps(out, "ppo/reward_mean")] == list(range(1, STEPS + 1))


@pytest.mark.upstream
@pytest.mark.slow
def test_sigterm_checkpoints_stops_and_the_printed_resume_command_works(reference, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "first.log"
    # no scheduled checkpoints at all: the only one is the one SIGTERM asks for
    proc = _start(["--checkpoint-every", "0", "--checkpoint-minutes", "0"], out, log)
    _wait_for(proc, lambda: (out / "training.log").is_file() and "step   1/" in (out / "training.log").read_text())
    proc.send_signal(signal.SIGTERM)                      # to the launching process only, as a scheduler does
    rc = proc.wait(timeout=300)
    text = log.read_text()
    assert rc == 143, text[-3000:]
    st = json.loads((out / "status.json").read_text())
    assert st["state"] == "interrupted" and st["signal"] == "SIGTERM" and 1 <= st["last_step"] < STEPS
    assert Path(st["checkpoint"]).name == f"step-{st['last_step']}" and not (out / "policy").exists()
    assert "run interrupted" in (out / "training.log").read_text()
    res = run_printed_resume(text, f"make ppo-bloom RESUME={out}", timeout=900)
    assert f"resumed from step {st['last_step']}" in res.stdout
    assert json.loads((out / "status.json").read_text())["state"] == "completed"
    assert _max_abs_diff(out / "policy", reference / "policy") == 0.0
    assert (out / "summary.md").is_file()                 # make's run.sh reported the whole run


def _run_folder(tmp_path, **settings):
    from rlhf_overlay.trlx_jobs.ppo import PPORunConfig
    cfg = PPORunConfig(arch="bloom", reward="rule", **settings).resolve()
    (tmp_path / "config.json").write_text(json.dumps({"ppo": dataclasses.asdict(cfg)}))
    return cfg


def test_resume_refuses_changed_settings_and_names_them(tmp_path):
    from rlhf_overlay.trlx_jobs.checkpoints import resolve_resume, resume_config
    from rlhf_overlay.trlx_jobs.ppo import PPORunConfig, build_parser
    _run_folder(tmp_path, steps=40, batch_size=16)

    def resume(*argv, **fields):
        cfg = PPORunConfig(arch="bloom", resume=str(tmp_path), **fields)
        return resume_config(cfg, build_parser().parse_args(list(argv)).settings_given, PPORunConfig)

    cfg, run_dir, changed = resume("--resume", str(tmp_path))
    assert run_dir == tmp_path.resolve() and changed == [] and cfg.steps == 40 and cfg.reward == "rule"
    cfg, _, changed = resume("--steps", "60", steps=60)               # the number of steps may change
    assert changed == ["steps"] and cfg.steps == 60
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"^model \(MODEL\): the run was started with ''"):
        resume("--model", str(model), model=str(model))
    with pytest.raises(ConfigError, match=r"^num_processes \(NUM_GPUS\)"):
        resume("--num-processes", "2", num_processes=2)
    with pytest.raises(ConfigError, match=r"^batch_size"):
        resume("--batch-size=8", batch_size=8)
    with pytest.raises(ConfigError, match="contradict"):
        resume(overwrite=True)
    with pytest.raises(ConfigError, match="not the run folder of a trlx PPO run"):
        resume_config(PPORunConfig(resume=str(tmp_path / "nothing")), [], PPORunConfig)
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        resolve_resume(tmp_path)


@pytest.mark.upstream
@pytest.mark.slow
def test_two_rank_zero2_resume_restores_each_ranks_optimizer_shard(trlx_dir, tiny_assets, tmp_path):
    """accelerate + DeepSpeed ZeRO-2 on 2 CPU ranks: each rank's optimizer shard is in the checkpoint and comes back.
    The run stopped after step 1 is the uninterrupted run's own folder with its end removed (its step-1 checkpoint is
    what a run killed after step 1 leaves, the runs being deterministic; this saves a third 2-rank start-up)."""
    import shutil
    ref = tmp_path / "ref"
    res = subprocess.run(RUN[:-1] + ["2", "--zero-stage", "2", "--num-processes", "2", "--checkpoint-every", "1",
                                     "--output", str(ref)], cwd=PROJECT_ROOT, env=_env(), capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    step1 = ref / "checkpoints" / "step-1"
    shards = sorted(p.name for p in step1.rglob("*optim_states.pt"))
    assert len(shards) == 2 and all(f"zero_pp_rank_{r}_" in s for r, s in enumerate(shards)), shards
    assert {p.name for p in step1.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    out = tmp_path / "stopped"
    shutil.copytree(ref, out, ignore=shutil.ignore_patterns("policy", "metrics.json"))
    (out / "status.json").write_text(json.dumps(dict(json.loads((ref / "status.json").read_text()),
                                                     state="failed", checkpoint=str(out / "checkpoints" / "step-1"))))
    for d in (out / "checkpoints").glob("step-*"):
        if d.name != "step-1":
            shutil.rmtree(d)
    # the copied config.json names the reference folder nowhere the resume uses: RESUME takes the folder given
    res = subprocess.run([sys.executable, "-m", "rlhf_overlay.trlx_jobs.ppo", "--resume", str(out)], cwd=PROJECT_ROOT,
                         env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resumed from step 1" in res.stdout
    assert _max_abs_diff(out / "policy", ref / "policy") == 0.0


@pytest.mark.upstream
@pytest.mark.slow
def test_ctrl_c_checkpoints_at_the_step_boundary(trlx_dir, tiny_assets, tmp_path):
    """Ctrl-C in a terminal = SIGINT to the whole process group (launcher and workers)."""
    out = tmp_path / "run"
    log = tmp_path / "first.log"
    proc = _start(["--checkpoint-every", "0", "--checkpoint-minutes", "0"], out, log)
    _wait_for(proc, lambda: (out / "training.log").is_file() and "step   1/" in (out / "training.log").read_text())
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=300) == 130
    text = log.read_text()
    st = json.loads((out / "status.json").read_text())
    assert st["state"] == "interrupted" and st["signal"] == "SIGINT" and (out / "checkpoints" / f"step-{st['last_step']}").is_dir()
    assert "SIGINT received: saving a checkpoint at the end of this step" in text
    assert text.count(f"resume with: make ppo-bloom RESUME={out}") == 1 and "error: interrupted (Ctrl-C)" in text
