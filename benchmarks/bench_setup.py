"""Benchmark: how long a no-op `make setup` / `make upstream` takes when nothing changed (target: < 2 s).

    python benchmarks/bench_setup.py [--repeat 5]

Run after a successful `make setup`. Prints min/median/max wall time of each command.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import time

from rlhf_overlay import PROJECT_ROOT
def time_command(cmd: list[str], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=PROJECT_ROOT, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    for label, cmd in [("bash setup.sh (no-op)", ["bash", "setup.sh"]),
                       ("make upstream (no-op)", ["make", "-s", "upstream"]),
                       ("make verify", ["make", "-s", "verify"])]:
        t = time_command(cmd, args.repeat)
        print(f"{label:24s} min {min(t):.2f} s  median {statistics.median(t):.2f} s  max {max(t):.2f} s"
              f"  (n={args.repeat})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
