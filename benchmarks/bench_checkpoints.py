"""Cost of resumable checkpoints on the tiny models (one CPU rank), and resume start-up versus a fresh start.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_checkpoints.py [--steps 6]

trlx PPO (tiny BLOOM, rule reward): a run with a checkpoint after every PPO step prints seconds per checkpoint (from
metrics.json) and their share of a PPO step (rollout + updates); then a resume from the newest checkpoint (one step
left) against a fresh run of the same length: start-up = wall time minus the time inside the PPO steps.
Reward model (tiny BLOOM, HF Trainer): training seconds with a checkpoint every 10 optimizer steps versus none.
DeepSpeed-Chat ppo-llama2 (tiny LLaMA, LoRA, against a tiny reward model trained first): seconds per checkpoint (the
`checkpoint:` lines of training.log), their share of a PPO step (tensorboard ppo/step_time_s) and the same start-up
comparison as for trlx PPO (`--only dschat` runs this part alone).
Prints figures only; nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args, out: Path) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t0 = time.time()
    cmd = [sys.executable, "-m", *args] + ([] if "--resume" in args else ["--output", str(out)])
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"failed: {' '.join(args)}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return time.time() - t0


def step_seconds(s: dict) -> float:
    return s["rollout_seconds"] + s["ppo_step_seconds"] * s["optimizer_steps"] + s.get("eval_seconds", 0.0)


def step_times(run_dir: Path) -> list[float]:
    """ppo/step_time_s of a ppo-llama2 run, one per PPO step (the resumed run's, after its purge_step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars("ppo/step_time_s")]


def dschat_ppo(tmp: Path, steps: int) -> None:
    run(["rlhf_overlay.dschat_jobs.reward_model", "--max-steps", "10", "--checkpoint-every", "0"], tmp / "rm")
    ppo = ["rlhf_overlay.dschat_jobs.ppo", "--critic", str(tmp / "rm"), "--max-steps", str(steps)]
    ck_wall = run(ppo + ["--checkpoint-every", "1", "--keep-checkpoints", str(steps)], tmp / "ppo-ck")
    log = (tmp / "ppo-ck" / "training.log").read_text()
    cks = [float(x) for x in re.findall(r"^checkpoint: step \d+ -> \S+ \(([\d.]+) s\)$", log, re.M)]
    per_ck, times = sum(cks) / len(cks), step_times(tmp / "ppo-ck")
    per_step = sum(times[1:]) / len(times[1:])   # the first step includes one-off warm-up
    size = sum(f.stat().st_size for f in (tmp / "ppo-ck" / "checkpoints" / "step-1").rglob("*") if f.is_file())
    print(f"DeepSpeed-Chat ppo-llama2, tiny LLaMA (LoRA): {len(cks)} checkpoints, {per_ck:.3f} s each "
          f"({size / 1e6:.1f} MB: actor + critic engines, optimizer, RNG), PPO step {per_step:.3f} s -> checkpointing "
          f"every step costs {100 * per_ck / per_step:.0f}% of step time")
    fresh_wall = run(ppo + ["--checkpoint-every", "0", "--checkpoint-minutes", "0"], tmp / "ppo-fresh")
    fresh_steps = sum(step_times(tmp / "ppo-fresh"))
    last = tmp / "ppo-ck" / "checkpoints" / f"step-{steps - 1}"
    for d in sorted((tmp / "ppo-ck" / "checkpoints").glob("step-*")):
        if d != last:
            shutil.rmtree(d)
    for d in ("actor", "critic"):
        shutil.rmtree(tmp / "ppo-ck" / d)
    resume_wall = run(["rlhf_overlay.dschat_jobs.ppo", "--resume", str(tmp / "ppo-ck")], tmp / "ppo-ck")
    resumed = step_times(tmp / "ppo-ck")[-1:]
    print(f"ppo-llama2 start-up (wall minus time in PPO steps): fresh {fresh_wall - fresh_steps:.1f} s, "
          f"resume {resume_wall - sum(resumed):.1f} s (walls: fresh {fresh_wall:.1f} s for {steps} steps, resume "
          f"{resume_wall:.1f} s for 1 step; first run with checkpoints {ck_wall:.1f} s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--only", choices=("trlx", "dschat"), default=None, help="run one part (default: both)")
    ns = p.parse_args()
    if ns.only != "trlx":
        with tempfile.TemporaryDirectory() as tmp:
            dschat_ppo(Path(tmp), ns.steps)
        if ns.only == "dschat":
            return
    ppo = ["rlhf_overlay.trlx_jobs.ppo", "--arch", "bloom", "--reward", "rule", "--steps", str(ns.steps)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ck_wall = run(ppo + ["--checkpoint-every", "1", "--keep-checkpoints", str(ns.steps)], tmp / "ck")
        m = json.loads((tmp / "ck" / "metrics.json").read_text())
        cks, steps = m["checkpoint_seconds"], [step_seconds(s) for s in m["steps"]]
        per_ck, per_step = sum(cks) / len(cks), sum(steps) / len(steps)
        size = sum(f.stat().st_size for f in (tmp / "ck" / "checkpoints" / "step-1").rglob("*") if f.is_file())
        print(f"trlx PPO, tiny BLOOM: {len(cks)} checkpoints, {per_ck:.3f} s each ({size / 1e6:.1f} MB), "
              f"PPO step {per_step:.3f} s -> checkpointing every step costs {100 * per_ck / per_step:.1f}% of step time")
        fresh_wall = run(ppo + ["--checkpoint-every", "0", "--checkpoint-minutes", "0"], tmp / "fresh")
        fresh_steps = sum(step_seconds(s) for s in json.loads((tmp / "fresh" / "metrics.json").read_text())["steps"])
        # resume the checkpointed run from its step N-1 (the last step runs again)
        last = tmp / "ck" / "checkpoints" / f"step-{ns.steps - 1}"
        for d in sorted((tmp / "ck" / "checkpoints").glob("step-*")):
            if d != last:
                shutil.rmtree(d)
        shutil.rmtree(tmp / "ck" / "policy")
        resume_wall = run(["rlhf_overlay.trlx_jobs.ppo", "--resume", str(tmp / "ck")], tmp / "ck")
        resumed = json.loads((tmp / "ck" / "metrics.json").read_text())["steps"][-1:]
        print(f"start-up (wall minus time in PPO steps): fresh {fresh_wall - fresh_steps:.1f} s, "
              f"resume {resume_wall - sum(step_seconds(s) for s in resumed):.1f} s "
              f"(walls: fresh {fresh_wall:.1f} s for {ns.steps} steps, resume {resume_wall:.1f} s for 1 step; "
              f"first run with checkpoints {ck_wall:.1f} s)")
        rm = ["rlhf_overlay.trlx_jobs.reward_model", "--arch", "bloom", "--max-steps", "60"]
        run(rm + ["--checkpoint-every", "10", "--keep-checkpoints", "10"], tmp / "rm-ck")
        run(rm + ["--checkpoint-every", "0", "--checkpoint-minutes", "0"], tmp / "rm-none")
        a, b = (json.loads((tmp / d / "metrics.json").read_text()) for d in ("rm-ck", "rm-none"))
        n = len(list((tmp / "rm-ck" / "checkpoints").glob("step-*")))
        print(f"reward model, tiny BLOOM, 60 steps: train {a['train_seconds']:.2f} s with {n} checkpoints vs "
              f"{b['train_seconds']:.2f} s without -> {(a['train_seconds'] - b['train_seconds']) / n:.3f} s per "
              f"checkpoint, step {b['seconds_per_step']:.3f} s")


if __name__ == "__main__":
    main()
