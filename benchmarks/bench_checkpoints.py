"""Cost of resumable checkpoints on the tiny models (one CPU rank), and resume start-up versus a fresh start.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_checkpoints.py [--steps 6]

trlx PPO (tiny BLOOM, rule reward): a run with a checkpoint after every PPO step prints seconds per checkpoint (from
metrics.json) and their share of a PPO step (rollout + updates); then a resume from the newest checkpoint (one step
left) against a fresh run of the same length: start-up = wall time minus the time inside the PPO steps.
Reward model (tiny BLOOM, HF Trainer): training seconds with a checkpoint every 10 optimizer steps versus none.
Prints figures only; nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6)
    ns = p.parse_args()
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
        import shutil
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
