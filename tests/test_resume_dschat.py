"""Checkpoints and RESUME for the DeepSpeed-Chat targets rm-llama2, dpo-llama2 and ppo-llama2
(rlhf_overlay.dschat_jobs.resume, DeepSpeedExamples patches 0020/0021/0023 + dschat/utils/checkpointing.py).

Integration (slow, tiny LLaMA, one CPU rank): a run SIGKILLed after its first mid-run checkpoint and resumed with
`make <target> RESUME=<run>` ends with the same model as an uninterrupted run with the same seed (max |Δ| = 0), one
tensorboard point per step, equal to the uninterrupted run's; half-written checkpoints are ignored. Two CPU ranks with
ZeRO-2 (rm-llama2): each rank's optimizer shard is written and restored, and the resumed run ends where the
uninterrupted one does. ppo-llama2 (6 PPO steps against a tiny reward model trained once for the module): SIGKILL +
RESUME ends with the uninterrupted run's actor and critic (max |Δ| = 0) and tensorboard points; SIGTERM stops at the
next step with a checkpoint and status `interrupted`, and the printed resume command works as printed; a changed
setting, CRITIC or critic folder is refused, naming it; on 2 CPU ranks with ZeRO-2, SIGTERM reaches both ranks and the
resume restores each rank's shard of actor and critic (max |Δ| = 0).
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
from helpers import run_printed_resume

pytestmark = pytest.mark.upstream
RUN = [sys.executable, "-m", "rlhf_overlay.dschat_jobs.reward_model"]
# target -> (entry module, its loss scalar, the steps of its eval/acc points in a tiny run of 60 steps)
TARGETS = {"rm-llama2": ("rlhf_overlay.dschat_jobs.reward_model", "rm/loss", [0, 20, 40, 60, 60]),
           "dpo-llama2": ("rlhf_overlay.dschat_jobs.dpo", "dpo/loss", [0, 20, 40, 60])}
MAKE_VARS = ("MODEL", "DATA", "OUTPUT", "OVERWRITE", "RESUME", "NUM_GPUS", "CHECKPOINT_EVERY", "CHECKPOINT_MINUTES",
             "KEEP_CHECKPOINTS", "ZERO_STAGE", "LORA_DIM", "HOSTFILE", "RANK_REPORT")


def _env():
    env = {k: v for k, v in os.environ.items() if k not in MAKE_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHON=sys.executable)
    return env


def _weights(run_dir: Path) -> dict:
    import torch
    return torch.load(run_dir / "model" / "pytorch_model.bin", map_location="cpu", weights_only=True)


def _max_abs_diff(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    assert wa and wa.keys() == wb.keys()
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


def _scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))


@pytest.fixture(scope="module", params=sorted(TARGETS))
def reference(request, dschat_dir, tiny_assets, tmp_path_factory):
    target = request.param
    out = tmp_path_factory.mktemp(f"{target}-uninterrupted") / "run"
    res = subprocess.run([sys.executable, "-m", TARGETS[target][0], "--checkpoint-every", "20", "--output", str(out)],
                         cwd=PROJECT_ROOT, env=_env(), capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert _checkpoints(out) == ["step-40", "step-60"]  # every 20 of the tiny recipe's 60 steps, KEEP_CHECKPOINTS=2
    st = json.loads((out / "status.json").read_text())
    assert st["state"] == "completed" and st["checkpoint"].endswith("step-60")
    assert st["resume_command"] == f"make {target} RESUME={out}"
    return target, out


@pytest.mark.slow
def test_sigkilled_run_resumes_bit_identically(reference, tmp_path):
    target, reference = reference
    module, loss_tag, eval_steps = TARGETS[target]
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", module, "--checkpoint-every", "20", "--output", str(out)],
                            cwd=PROJECT_ROOT, env=_env(),
                            stdout=open(tmp_path / "first.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    while not (out / "checkpoints" / "step-20").is_dir():
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.time() - t0 < 1800
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)   # the launcher and its rank, as a dying node would
    proc.wait()
    assert not (out / "model").exists()   # the model folder of a killed run is absent, never half there
    assert json.loads((out / "status.json").read_text())["state"] == "running"   # nobody could record the kill
    newest = _checkpoints(out)[-1]
    # a checkpoint killed half-written (no trainer_state.json: still `.tmp-*`, or not marked complete) is ignored
    (out / "checkpoints" / ".tmp-step-59" / "model").mkdir(parents=True)
    (out / "checkpoints" / ".tmp-step-59" / "model" / "mp_rank_00_model_states.pt").write_bytes(b"cut")
    (out / "checkpoints" / "step-58" / "model").mkdir(parents=True)

    res = subprocess.run(["make", "--no-print-directory", target, f"RESUME={out}"], cwd=PROJECT_ROOT, env=_env(),
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    log = (out / "training.log").read_text()
    step = int(newest.split("-")[1])
    assert f"resumed from step {step} ({out / 'checkpoints' / newest})" in log
    assert "half-written checkpoint(s) .tmp-step-59" in res.stdout
    assert not (out / "checkpoints" / ".tmp-step-59").exists()
    st = json.loads((out / "status.json").read_text())
    assert st["state"] == "completed" and st["exit_code"] == 0
    commands = (out / "command.txt").read_text()
    assert commands.count(module) == 2 and "# resumed " in commands
    assert f"--resume {out}" in commands
    assert _max_abs_diff(out, reference) == 0.0
    # one tensorboard point per step, the uninterrupted run's (points the killed run logged past its checkpoint are
    # purged); the evaluations as in the uninterrupted run (the one before training logged once; at the last step
    # the reward model evaluates twice, at --eval_interval and at the epoch's end, in both runs)
    loss = _scalars(out, loss_tag)
    assert [s for s, _ in loss] == list(range(1, 61)) and loss == _scalars(reference, loss_tag)
    assert _scalars(out, "eval/acc") == _scalars(reference, "eval/acc")
    assert [s for s, _ in _scalars(out, "eval/acc")] == eval_steps
    results = json.loads((out / "model" / "eval_results.json").read_text())
    assert results["eval/acc"] == json.loads((reference / "model" / "eval_results.json").read_text())["eval/acc"]


@pytest.mark.slow
def test_two_rank_zero2_reward_model_resumes_with_every_rank_s_optimizer_shard(dschat_dir, tiny_assets, tmp_path):
    """2 CPU ranks, ZeRO-2: each rank writes and reloads its own optimizer shard; the resumed run ends where the
    uninterrupted one does."""
    args = ["--num-gpus", "2", "--zero-stage", "2", "--max-steps", "30", "--checkpoint-every", "10"]
    ref = tmp_path / "ref"
    res = subprocess.run(RUN + args + ["--output", str(ref)], cwd=PROJECT_ROOT, env=_env(), capture_output=True,
                         text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    shards = sorted(p.name for p in (ref / "checkpoints" / "step-30" / "model").glob("*optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert sorted(p.name for p in (ref / "checkpoints" / "step-30").glob("rng-rank*.pt")) == ["rng-rank0.pt",
                                                                                             "rng-rank1.pt"]
    out = tmp_path / "run"
    proc = subprocess.Popen(RUN + args + ["--output", str(out)], cwd=PROJECT_ROOT, env=_env(),
                            stdout=open(tmp_path / "first.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    while not (out / "checkpoints" / "step-10").is_dir():
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.time() - t0 < 1800
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    res = subprocess.run(RUN + ["--resume", str(out)], cwd=PROJECT_ROOT, env=_env(), capture_output=True, text=True,
                         timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert re.search(r"resumed from step (10|20) ", (out / "training.log").read_text())
    assert _max_abs_diff(out, ref) == 0.0


def test_resume_refuses_a_changed_setting_and_a_run_without_checkpoints(reference, tmp_path):
    target, reference = reference
    run = [sys.executable, "-m", TARGETS[target][0]]
    res = subprocess.run(run + ["--resume", str(reference), "--batch-size", "4"], cwd=PROJECT_ROOT, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert re.search(r"^error: batch_size: the run was started with None, this resume asks for 4", res.stderr, re.M)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"requested": {"seed": 1234}}))
    res = subprocess.run(run + ["--resume", str(empty)], cwd=PROJECT_ROOT, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2 and "no complete checkpoint" in res.stderr, res.stderr
    res = subprocess.run(run + ["--resume", str(tmp_path)], cwd=PROJECT_ROOT, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and f"not the run folder of a `make {target}` run" in res.stderr, res.stderr


# ------------------------------------------------------------------------------------------ ppo-llama2
PPO = [sys.executable, "-m", "rlhf_overlay.dschat_jobs.ppo"]
PPO_STEPS = ["--max-steps", "6", "--checkpoint-every", "2"]


def _ppo_weights(run_dir: Path, model: str) -> dict:
    import torch
    return torch.load(run_dir / model / "pytorch_model.bin", map_location="cpu", weights_only=True)


def _ppo_max_abs_diff(a: Path, b: Path) -> float:
    """Over the actor (LoRA merged into its weights on save) and the critic."""
    worst = 0.0
    for model in ("actor", "critic"):
        wa, wb = _ppo_weights(a, model), _ppo_weights(b, model)
        assert wa and wa.keys() == wb.keys()
        worst = max(worst, *(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa))
    return worst


def _start_ppo(args: list[str], out: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(PPO + args + ["--output", str(out)], cwd=PROJECT_ROOT, env=_env(),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait(proc: subprocess.Popen, what, log: Path, timeout: float = 1800) -> None:
    t0 = time.time()
    while not what():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() - t0 < timeout
        time.sleep(0.05)


@pytest.fixture(scope="module")
def ppo_critic(dschat_dir, tiny_assets, tmp_path_factory):
    """A tiny reward model (10 steps: PPO's resume is what is tested, not the reward) for every ppo-llama2 run here."""
    out = tmp_path_factory.mktemp("ppo-critic") / "rm"
    res = subprocess.run(RUN + ["--max-steps", "10", "--checkpoint-every", "0", "--output", str(out)],
                         cwd=PROJECT_ROOT, env=_env(), capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def ppo_reference(ppo_critic, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo-uninterrupted") / "run"
    res = subprocess.run(PPO + ["--critic", str(ppo_critic)] + PPO_STEPS + ["--output", str(out)], cwd=PROJECT_ROOT,
                         env=_env(), capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert _checkpoints(out) == ["step-4", "step-6"]  # every 2 of 6 PPO steps, KEEP_CHECKPOINTS=2
    ck = out / "checkpoints" / "step-6"
    assert sorted(p.name for p in ck.iterdir()) == ["actor", "critic", "rng-rank0.pt", "state-rank0.pt",
                                                    "trainer_state.json"]
    assert json.loads((ck / "trainer_state.json").read_text())["engines"] == ["actor", "critic"]
    st = json.loads((out / "status.json").read_text())
    assert st["state"] == "completed" and st["checkpoint"].endswith("step-6")
    assert st["resume_command"] == f"make ppo-llama2 RESUME={out}"
    return out


@pytest.mark.slow
def test_ppo_sigkilled_run_resumes_bit_identically(ppo_critic, ppo_reference, tmp_path):
    out, log = tmp_path / "run", tmp_path / "first.log"
    proc = _start_ppo(["--critic", str(ppo_critic)] + PPO_STEPS, out, log)
    _wait(proc, lambda: (out / "checkpoints" / "step-2").is_dir(), log)
    os.killpg(proc.pid, signal.SIGKILL)   # the launcher and its rank, as a dying node would
    proc.wait()
    assert not (out / "actor").exists() and not (out / "critic").exists()   # absent, never half there
    newest = _checkpoints(out)[-1]
    # a checkpoint killed half-written (still `.tmp-*`) and a step folder without trainer_state.json: both removed
    (out / "checkpoints" / ".tmp-step-5" / "actor").mkdir(parents=True)
    (out / "checkpoints" / "step-5" / "actor").mkdir(parents=True)

    res = subprocess.run(["make", "--no-print-directory", "ppo-llama2", f"RESUME={out}"], cwd=PROJECT_ROOT,
                         env=_env(), capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    step = int(newest.split("-")[1])
    assert f"resumed from step {step} ({out / 'checkpoints' / newest})" in (out / "training.log").read_text()
    assert "half-written checkpoint(s) .tmp-step-5" in res.stdout
    assert "removed incomplete checkpoint folder(s) without trainer_state.json: step-5" in res.stdout
    assert not (out / "checkpoints" / ".tmp-step-5").exists() and not (out / "checkpoints" / "step-5").exists()
    st = json.loads((out / "status.json").read_text())
    assert st["state"] == "completed" and st["exit_code"] == 0
    assert "# resumed " in (out / "command.txt").read_text()
    assert _ppo_max_abs_diff(out, ppo_reference) == 0.0
    # one tensorboard point per PPO step, the uninterrupted run's values (the killed run's later points purged)
    for tag in ("ppo/reward_mean", "ppo/kl", "ppo/value_loss"):
        points = _scalars(out, tag)
        assert [s for s, _ in points] == list(range(6)) and points == _scalars(ppo_reference, tag), tag
    assert json.loads((out / "ppo_results.json").read_text())["ppo/steps"] == 6


@pytest.mark.slow
def test_ppo_sigterm_checkpoints_stops_and_the_printed_resume_command_works(ppo_critic, ppo_reference, tmp_path):
    out, log = tmp_path / "run", tmp_path / "first.log"
    # no scheduled checkpoint: the only one is the one SIGTERM asks for
    proc = _start_ppo(["--critic", str(ppo_critic), "--max-steps", "6", "--checkpoint-every", "0",
                       "--checkpoint-minutes", "0"], out, log)
    # a tiny PPO step takes ~0.1 s: the signal is sent while the models load (the handler is in place by then), so
    # the run stops at the first step boundary
    _wait(proc, lambda: (out / "training.log").is_file() and "Initializing Actor" in (out / "training.log").read_text(),
          log)
    proc.send_signal(signal.SIGTERM)                      # to the launching process only, as a scheduler does
    rc = proc.wait(timeout=600)
    text = log.read_text()
    assert rc == 143, text[-3000:]
    st = json.loads((out / "status.json").read_text())
    assert st["state"] == "interrupted" and 1 <= st["last_step"] < 6, st
    assert Path(st["checkpoint"]).name == f"step-{st['last_step']}" and not (out / "actor").exists()
    res = run_printed_resume(text, f"make ppo-llama2 RESUME={out}")
    assert f"resumed from step {st['last_step']}" in res.stdout
    assert json.loads((out / "status.json").read_text())["state"] == "completed"
    # the resume keeps the run's settings (no scheduled checkpoints) and ends where the uninterrupted run does
    assert _ppo_max_abs_diff(out, ppo_reference) == 0.0


def test_ppo_resume_refuses_a_changed_setting_critic_or_critic_folder(ppo_critic, ppo_reference, tmp_path):
    def resume(*args):
        return subprocess.run(PPO + ["--resume", str(ppo_reference), *args], cwd=PROJECT_ROOT, env=_env(),
                              capture_output=True, text=True, timeout=300)

    res = resume("--batch-size", "2")
    assert res.returncode == 2
    assert re.search(r"^error: batch_size: the run was started with None, this resume asks for 2", res.stderr, re.M)
    other = tmp_path / "other-rm"
    other.mkdir()
    for f in (ppo_critic / "model").iterdir():
        if f.is_file():
            (other / f.name).write_bytes(f.read_bytes())
    res = resume("--critic", str(other))
    assert res.returncode == 2 and re.search(r"^error: critic \(CRITIC\): the run was started with", res.stderr, re.M)
    weights = ppo_critic / "model" / "pytorch_model.bin"
    before = weights.stat()
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))   # the same folder, retrained (or touched)
    try:
        res = resume()
    finally:
        os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert re.search(rf"^error: CRITIC={re.escape(str(ppo_critic / 'model'))}: the model folder changed since the run "
                     rf"started \(pytorch_model.bin differ", res.stderr, re.M), res.stderr
    assert json.loads((ppo_reference / "status.json").read_text())["state"] == "completed"   # nothing was started


@pytest.mark.slow
def test_ppo_two_rank_zero2_sigterm_reaches_every_rank_and_resumes_each_shard(ppo_critic, tmp_path):
    """2 CPU ranks, ZeRO-2: SIGTERM to the launching process reaches both ranks (DeepSpeed's runner does not forward
    it), each writes its optimizer shard of actor and critic, and the resumed run ends where an uninterrupted one
    does."""
    args = ["--critic", str(ppo_critic), "--num-gpus", "2", "--zero-stage", "2", "--max-steps", "6",
            "--checkpoint-every", "0", "--checkpoint-minutes", "0"]
    ref = tmp_path / "ref"
    res = subprocess.run(PPO + args + ["--output", str(ref)], cwd=PROJECT_ROOT, env=_env(), capture_output=True,
                         text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out, log = tmp_path / "run", tmp_path / "first.log"
    proc = _start_ppo(args, out, log)
    _wait(proc, lambda: (out / "training.log").is_file() and "Initializing Actor" in (out / "training.log").read_text(),
          log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=600) == 143, log.read_text()[-3000:]
    st = json.loads((out / "status.json").read_text())
    assert st["state"] == "interrupted" and st["last_step"] == 1, st
    ck = Path(st["checkpoint"])
    for model in ("actor", "critic"):
        assert sorted(p.name for p in (ck / model).glob("*optim_states.pt")) == [
            "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert sorted(p.name for p in ck.glob("rng-rank*.pt")) == ["rng-rank0.pt", "rng-rank1.pt"]
    res = subprocess.run(PPO + ["--resume", str(out)], cwd=PROJECT_ROOT, env=_env(), capture_output=True, text=True,
                         timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert _ppo_max_abs_diff(out, ref) == 0.0
