"""1 rank vs 2 ranks on the tiny models: wall time of each make target, its training throughput and its quality.

    python benchmarks/bench_scaleout.py                    # rm-llama2, ppo-llama2, rm-bloom, ppo-smoke-test; ~5 min
    python benchmarks/bench_scaleout.py --reps 2 --targets rm-bloom ppo-smoke-test --json runs/bench-scaleout.json

Each run is `make <target> NUM_GPUS=<n> OUTPUT=<tmp>` with OMP_NUM_THREADS=1 (one core per rank on the 2-core
machines), ZeRO-2 for the DeepSpeed-Chat targets with 2 ranks. The per-rank batch stays the same, so 2 ranks
train on twice the samples per step: compare samples/s, not only wall time. ppo-llama2 uses a critic trained
once beforehand (so its time is PPO alone). Wall time includes start-up (python, DeepSpeed, data tokenization),
which dominates on tiny models; nothing here is a speed target, the figures are printed for the record.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
TARGETS = ("rm-llama2", "ppo-llama2", "rm-bloom", "ppo-smoke-test")


def make(target: str, out: Path, **variables) -> float:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MODEL", "ACTOR", "CRITIC", "RM", "DATA", "OUTPUT", "NUM_GPUS", "ZERO_STAGE", "HOSTFILE")}
    env.update(OMP_NUM_THREADS="1", OUTPUT=str(out), **{k: str(v) for k, v in variables.items()})
    t0 = time.time()
    res = subprocess.run(["make", "-s", target], cwd=PROJECT, env=env, capture_output=True, text=True)
    seconds = time.time() - t0
    if res.returncode != 0:
        sys.exit(f"make {target} {variables} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return seconds


def facts(target: str, out: Path, ranks: int) -> dict:
    """Samples trained on, training seconds and the quality figure, from what the run wrote."""
    if target == "rm-llama2":
        r = json.loads((out / "model" / "eval_results.json").read_text())
        steps = r["train/steps"]
        return {"samples": steps * 8 * ranks, "train_s": steps * r["train/mean_step_time_s"],
                "quality": f"eval acc {r['eval/acc']:.3f}"}
    if target == "ppo-llama2":
        r = json.loads((out / "ppo_results.json").read_text())
        return {"samples": r["ppo/steps"] * 4 * ranks, "train_s": r["ppo/steps"] * r["ppo/mean_step_time_s"],
                "quality": f"ema reward {r['ppo/ema_reward']:.3f}"}
    m = json.loads((out / "metrics.json").read_text())
    if target == "rm-bloom":
        return {"samples": m["steps"] * m["pairs_per_step"], "train_s": m["train_seconds"],
                "quality": f"eval acc {m['eval_accuracy']:.3f}"}
    return {"samples": len(m["steps"]) * 32 * ranks, "train_s": m["train_seconds"],
            "quality": f"reward {m['reward_first']:.3f} -> {m['reward_last']:.3f}"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scaleout-") as tmp:
        tmp = Path(tmp)
        critic = None
        if "ppo-llama2" in args.targets:
            print("training the critic for ppo-llama2 once ...", flush=True)
            make("rm-llama2", tmp / "critic")
            critic = tmp / "critic" / "model"
        for target in args.targets:
            for ranks in (1, 2):
                extra = {"NUM_GPUS": ranks}
                if target in ("rm-llama2", "ppo-llama2") and ranks > 1:
                    extra["ZERO_STAGE"] = 2
                if target == "ppo-llama2":
                    extra["CRITIC"] = critic
                walls, runs = [], []
                for rep in range(args.reps):
                    out = tmp / f"{target}-{ranks}-{rep}"
                    walls.append(make(target, out, **extra))
                    runs.append(facts(target, out, ranks))
                row = {"target": target, "ranks": ranks, "wall_s": statistics.median(walls),
                       "train_s": statistics.median(r["train_s"] for r in runs),
                       "samples": runs[0]["samples"], "quality": runs[-1]["quality"], "walls": walls}
                row["samples_per_train_s"] = row["samples"] / row["train_s"] if row["train_s"] else float("nan")
                rows.append(row)
                print(f"{target:15s} {ranks} rank(s): wall {row['wall_s']:6.1f} s, training {row['train_s']:6.2f} s "
                      f"for {row['samples']:5d} samples ({row['samples_per_train_s']:7.1f}/s), {row['quality']}",
                      flush=True)
    print("\ntarget           wall 1 -> 2 ranks   training samples/s 1 -> 2 ranks")
    for target in args.targets:
        one, two = [r for r in rows if r["target"] == target]
        print(f"{target:15s}  {one['wall_s']:6.1f} -> {two['wall_s']:6.1f} s   "
              f"{one['samples_per_train_s']:7.1f} -> {two['samples_per_train_s']:7.1f} "
              f"({two['samples_per_train_s'] / one['samples_per_train_s']:.2f}x)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
