"""Health guards on DeepSpeed-Chat (dschat/utils/health_guard.py, DeepSpeedExamples patch 0024): rm-, dpo-, ppo-llama2.

Each signal is provoked in a real tiny run through the entry modules, by fault injection
(RLHF_FAULT_INJECTION=<signal>@<step>: from that step on, what the guard measures is corrupted — the loss or reward
becomes NaN, the KL per token +10 nats, every answer its first token repeated, every answer gets U+FFFD, the reward
falls by 3 per step); the guard must fire with its warning line, and with --on_unhealthy stop (the scripts' default)
the run writes a checkpoint at that step, status.json says failed with the reason, no model folder appears and the
job exits 3. --on_unhealthy warn only warns; ON_UNHEALTHY=auto (the default) is warn on the tiny recipe and stop with
a model of your own. The tiny ppo-llama2 default trips nothing: every health/* scalar of its 40 steps stays within
its bound.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_overlay import PROJECT_ROOT
from rlhf_overlay.runtime.health import DEFAULTS
from helpers import tb_scalars

FAULT_ENV = "RLHF_FAULT_INJECTION"
MAKE_VARS = ("MODEL", "DATA", "OUTPUT", "OVERWRITE", "RESUME", "NUM_GPUS", "CHECKPOINT_EVERY", "CHECKPOINT_MINUTES",
             "KEEP_CHECKPOINTS", "ZERO_STAGE", "LORA_DIM", "HOSTFILE", "RANK_REPORT", "ON_UNHEALTHY", FAULT_ENV)


def _run(module: str, args: list[str], out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in MAKE_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHON=sys.executable)
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-m", f"rlhf_overlay.dschat_jobs.{module}", "--output", str(out), *args],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=1800)


def _assert_stopped(res, out: Path, signal: str, step: int, model_dirs: tuple[str, ...]) -> str:
    text = res.stdout + res.stderr
    assert res.returncode == 3, text[-4000:]
    warning = f"[health] WARNING unhealthy at step {step}: {signal} = "
    assert warning in res.stdout, text[-4000:]
    assert "likely causes: " in res.stdout.split(warning, 1)[1].split("\n", 1)[0]
    st = json.loads((out / "status.json").read_text())
    assert st["state"] == "failed" and st["exit_code"] == 3, st
    assert st["reason"].startswith(f"unhealthy at step {step}: {signal} = "), st
    assert st["checkpoint"].endswith(f"step-{step}") and (out / "checkpoints" / f"step-{step}").is_dir(), st
    assert (out / "checkpoints" / f"step-{step}" / "trainer_state.json").is_file()
    for name in model_dirs:
        assert not (out / name).exists(), name
    return res.stdout.split(warning, 1)[1].split("\n", 1)[0]


def test_on_unhealthy_auto_is_warn_tiny_and_stop_with_your_own_model(dschat_dir, tiny_assets, tmp_path):
    def launched(module, args):
        res = _run(module, [*args, "--dry-run"], tmp_path / "dry")
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return res.stdout
    assert "--on_unhealthy warn --max_kl_per_token 1.0 --max_degenerate 0.5" in launched("ppo", [])
    assert "--on_unhealthy stop" in launched("ppo", ["--on-unhealthy", "stop"])
    own = ["--model", str(tiny_assets / "models" / "tiny-llama"), "--data", str(tiny_assets / "data" / "preference")]
    assert "--on_unhealthy stop" in launched("reward_model", own)   # a model of your own: the llama2-7b recipe
    assert "--on_unhealthy warn" in launched("dpo", [])
    res = _run("dpo", ["--on-unhealthy", "maybe", "--dry-run"], tmp_path / "dry")
    assert res.returncode == 2 and "error: on_unhealthy (ON_UNHEALTHY)='maybe': must be stop, warn or auto" in res.stderr
    assert not (tmp_path / "dry").exists()


@pytest.mark.parametrize("module,model_dir", [("reward_model", "model"), ("dpo", "model")])
def test_rm_and_dpo_nan_loss_stop_with_a_checkpoint(module, model_dir, dschat_dir, tiny_assets, tmp_path):
    out = tmp_path / "run"
    res = _run(module, ["--max-steps", "10", "--checkpoint-every", "0", "--on-unhealthy", "stop"], out,
               fault="nonfinite@5")
    line = _assert_stopped(res, out, "nonfinite", 5, (model_dir,))
    assert line.startswith("1 (loss=nan) (bound 0)"), line
    points = tb_scalars(out / "tensorboard")["health/nonfinite"]
    assert points == [(1, 0.0), (2, 0.0), (3, 0.0), (4, 0.0), (5, 1.0)]


@pytest.fixture(scope="module")
def critic(dschat_dir, tiny_assets, tmp_path_factory):
    """A tiny reward model (10 steps) for the PPO runs that provoke the guards."""
    out = tmp_path_factory.mktemp("health-critic") / "rm"
    res = _run("reward_model", ["--max-steps", "10", "--checkpoint-every", "0"], out)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("signal,at,stops_at,bound", [
    ("nonfinite", 2, 2, 0.0),                                    # the reward turns NaN
    ("kl_per_token", 2, 2, DEFAULTS["max_kl_per_token"]),
    ("degenerate", 2, 2, DEFAULTS["max_degenerate"]),            # the policy "emits one token"
    ("undecodable", 2, 2, DEFAULTS["max_undecodable"]),
    ("reward_drop", 4, 6, DEFAULTS["max_reward_drop"]),          # falls from step 4: 3 + 3 steps compared
])
def test_ppo_signal_stops_the_run(signal, at, stops_at, bound, critic, tmp_path):
    out = tmp_path / "run"
    res = _run("ppo", ["--critic", str(critic), "--max-steps", "8", "--checkpoint-every", "0", "--on-unhealthy",
                       "stop"], out, fault=f"{signal}@{at}")
    line = _assert_stopped(res, out, signal, stops_at, ("actor", "critic"))
    assert "DeepSpeedExamples #864/#794, DeepSpeed #4788" in line  # the ZeRO-3 + hybrid-engine issue is named
    scalars = tb_scalars(out / "tensorboard")
    points = scalars[f"health/{signal}"]
    # tensorboard steps are 0-based (as ppo/*): PPO step N is point N - 1; the tripped value is beyond its bound
    assert points[-1][0] == stops_at - 1 and points[-1][1] > bound, points
    if signal != "reward_drop":
        assert all(v <= bound for s, v in points if s < at - 1), points


@pytest.mark.slow
def test_ppo_warn_only_warns(critic, tmp_path):
    out = tmp_path / "run"
    res = _run("ppo", ["--critic", str(critic), "--max-steps", "3", "--checkpoint-every", "0", "--on-unhealthy",
                       "warn"], out, fault="degenerate@2")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("[health] WARNING unhealthy at step ") == 2  # steps 2 and 3
    assert json.loads((out / "status.json").read_text())["state"] == "completed"
    assert (out / "actor").is_dir()


@pytest.mark.slow
def test_tiny_ppo_default_trips_nothing(dschat_dir, tiny_assets, tmp_path):
    """The tiny ppo-llama2 default (its own tiny RM, 40 PPO steps): every health/* point within its bound."""
    out = tmp_path / "run"
    res = _run("ppo", [], out)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "[health]" not in res.stdout
    scalars = tb_scalars(out / "tensorboard")
    bounds = {"nonfinite": 0.0, "kl_per_token": DEFAULTS["max_kl_per_token"],
              "degenerate": DEFAULTS["max_degenerate"], "undecodable": DEFAULTS["max_undecodable"],
              "reward_drop": DEFAULTS["max_reward_drop"]}
    for signal, bound in bounds.items():
        points = scalars[f"health/{signal}"]
        assert len(points) == (40 if signal != "reward_drop" else 35), (signal, len(points))  # drop: 2 windows of 3
        worst = max(v for _, v in points)
        print(f"health/{signal}: max {worst:.4g} over {len(points)} steps (bound {bound:g})")
        assert worst <= bound, (signal, points)


@pytest.mark.slow
def test_ppo_running_away_stops_itself_without_fault_injection(critic, tmp_path):
    """A real runaway, nothing injected: LoRA lr 5e-3 (the degenerate-verdict setting of test_dschat_training) drives
    the actor away from the reference; with ON_UNHEALTHY=stop the KL guard ends the run long before its 60 steps
    (measured: step 33, 1.143 nats per answer token)."""
    out = tmp_path / "run"
    res = _run("ppo", ["--critic", str(critic), "--max-steps", "60", "--checkpoint-every", "0", "--on-unhealthy",
                       "stop", "--", "--actor_lora_learning_rate", "5e-3"], out)
    assert res.returncode == 3, res.stdout[-3000:] + res.stderr[-3000:]
    st = json.loads((out / "status.json").read_text())
    step = st["last_step"]
    assert st["state"] == "failed" and st["reason"].startswith(f"unhealthy at step {step}: kl_per_token = "), st
    assert 1 < step < 60 and (out / "checkpoints" / f"step-{step}").is_dir()
    assert not (out / "actor").exists()
    kl = tb_scalars(out / "tensorboard")["health/kl_per_token"]
    assert kl[-1][1] > DEFAULTS["max_kl_per_token"] >= max(v for _, v in kl[:-1])
