"""Benchmark: step times of the trlx path on the embedded tiny models (CPU): reward-model step, PPO rollout, PPO update.

    python benchmarks/bench_trlx.py                  # BLOOM and GPT-J, ~2 min on 2 cores
    python benchmarks/bench_trlx.py --arch bloom --ppo-steps 10

Each number comes from a real run of the entry modules (their metrics.json):
  RM step      one optimizer step of the pairwise reward model (16 pairs = 32 sequences, max 128 tokens), no eval
  rollout      one PPO step's generation + scoring + reference/value pass (32 samples, 12 new tokens)
  PPO update   one PPO optimizer step (16 samples), mean over the run
Run with nothing else on the CPU (wrap in `flock /tmp/rlhf-heavy.lock` on shared machines).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from rlhf_overlay import PROJECT_ROOT
def _run(module: str, args: list[str]) -> None:
    res = subprocess.run([sys.executable, "-m", module, *args], cwd=PROJECT_ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{module} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")


def bench(arch: str, rm_steps: int, ppo_steps: int, tmp: Path) -> dict:
    rm_dir = tmp / f"rm-{arch}"
    _run("rlhf_overlay.trlx_jobs.reward_model", ["--arch", arch, "--max-steps", str(rm_steps), "--eval-steps",
                                            str(rm_steps * 10), "--eval-before", "no", "--output", str(rm_dir)])
    rm = json.loads((rm_dir / "metrics.json").read_text())
    ppo_dir = tmp / f"ppo-{arch}"
    _run("rlhf_overlay.trlx_jobs.ppo", ["--arch", arch, "--reward", "rule", "--steps", str(ppo_steps),
                                   "--output", str(ppo_dir)])
    ppo = json.loads((ppo_dir / "metrics.json").read_text())
    return {"arch": arch, "rm_step_s": rm["seconds_per_step"], "rm_pairs_per_step": rm["pairs_per_step"],
            "rollout_s": ppo["rollout_seconds_mean"], "ppo_update_s": ppo["ppo_step_seconds_mean"],
            "ppo_wall_s": ppo.get("wall_seconds")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", action="append", choices=["bloom", "gptj", "llama"], help="default: bloom and gptj")
    p.add_argument("--rm-steps", type=int, default=60)
    p.add_argument("--ppo-steps", type=int, default=10)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-trlx-") as tmp:
        for arch in args.arch or ["bloom", "gptj"]:
            rows.append(bench(arch, args.rm_steps, args.ppo_steps, Path(tmp)))
    print(f"{'model':<12}{'RM step':>12}{'rollout':>12}{'PPO update':>13}{'PPO run':>10}")
    for r in rows:
        print(f"tiny-{r['arch']:<7}{r['rm_step_s'] * 1000:>9.0f} ms{r['rollout_s']:>10.2f} s"
              f"{r['ppo_update_s'] * 1000:>10.0f} ms{r['ppo_wall_s']:>9.0f} s")
    print(f"(RM step: {rows[0]['rm_pairs_per_step']} pairs; rollout: 32 samples x 12 new tokens; PPO update: 16 "
          f"samples; PPO run: {args.ppo_steps} steps incl. start-up)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
