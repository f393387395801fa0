"""1 node x 2 ranks vs 2 nodes x 1 rank (rlhf_overlay.runtime.cluster: node-b is a network namespace of this machine), wall
time of each make target, and how long a rank killed on node-b takes to stop the whole job. Root; ~6 min.

    python benchmarks/bench_two_nodes.py
    python benchmarks/bench_two_nodes.py --targets rm-llama2 rm-bloom --skip-dead-rank

1 node: a `localhost slots=2` hostfile (DeepSpeed's launcher, no ssh) for rm-llama2 (ZeRO-2), dpo-llama2, rm-bloom;
NUM_GPUS=2 (accelerate) for ppo-smoke-test. 2 nodes: the hostfile `node-a slots=1` / `node-b slots=1` (pdsh over
ssh; ppo-smoke-test as two accelerate machines joined with `make ppo-join` on node-b). Both nodes share this
machine's 2 cores, so the difference is the multi-node start-up (ssh, pdsh, rendezvous over the veth pair), not
compute. OMP_NUM_THREADS=1. The figures are printed for the record; nothing here is a speed target.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
from rlhf_overlay.runtime import cluster  # noqa: E402

TARGETS = ("rm-llama2", "dpo-llama2", "rm-bloom", "ppo-smoke-test")
CLEAR = ("MODEL", "ACTOR", "CRITIC", "RM", "DATA", "OUTPUT", "NUM_GPUS", "ZERO_STAGE", "HOSTFILE", "RANK_REPORT")


def env_for(**variables) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CLEAR}
    env.update(OMP_NUM_THREADS="1", **{k: str(v) for k, v in variables.items()})
    return env


def run(cmd: list[str], env: dict) -> float:
    t0 = time.time()
    res = subprocess.run(cmd, cwd=PROJECT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return time.time() - t0


def one_node(target: str, root: Path) -> float:
    out = root / f"{target}-1node"
    if target == "ppo-smoke-test":
        return run(["make", "-s", target], env_for(NUM_GPUS=2, OUTPUT=out))
    hosts = root / "localhost"
    hosts.write_text("localhost slots=2\n")
    extra = {"ZERO_STAGE": 2} if target == "rm-llama2" else {}
    return run(["make", "-s", target], env_for(HOSTFILE=hosts, OUTPUT=out, **extra))


def two_nodes(target: str, root: Path) -> float:
    out, hosts = root / f"{target}-2nodes", root / "hostfile"
    if target != "ppo-smoke-test":
        extra = {"ZERO_STAGE": 2} if target == "rm-llama2" else {}
        return run(["make", "-s", target], env_for(HOSTFILE=hosts, OUTPUT=out, **extra))
    t0 = time.time()
    first = subprocess.Popen(cluster.on_node("node-a", ["make", "-s", target, f"HOSTFILE={hosts}", f"OUTPUT={out}"],
                                             cwd=PROJECT), cwd=PROJECT, env=env_for(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    while not (out / "accelerate" / "machine-1.yaml").is_file():
        if first.poll() is not None:
            sys.exit(f"make {target} on node-a stopped (exit {first.returncode})")
        time.sleep(0.2)
    run(cluster.on_node("node-b", ["make", "-s", "ppo-join", f"RUN={out}", "MACHINE_RANK=1"], cwd=PROJECT), env_for())
    if first.wait() != 0:
        sys.exit(f"make {target} on node-a failed (exit {first.returncode})")
    return time.time() - t0


def dead_rank(root: Path) -> tuple[float, int]:
    """rm-llama2 on both nodes for 3 epochs; SIGKILL node-b's rank once it trains; seconds until the job ends."""
    out = root / "dead-rank"
    netns_b = subprocess.run(["ssh", "node-b", "readlink /proc/self/ns/net"], capture_output=True,
                             text=True).stdout.strip()
    cmd = [sys.executable, "-m", "rlhf_overlay.dschat_jobs.reward_model", "--hostfile", str(root / "hostfile"),
           "--output", str(out), "--max-steps", "0", "--epochs", "3"]
    job = subprocess.Popen(cmd, cwd=PROJECT, env=env_for(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    while not ((out / "training.log").is_file() and re.search(r"step \d+/", (out / "training.log").read_text())):
        if job.poll() is not None:
            sys.exit("the dead-rank run ended before it trained")
        time.sleep(0.2)
    for p in Path("/proc").glob("[0-9]*"):
        try:
            argv = (p / "cmdline").read_bytes().split(b"\0")
            if os.readlink(p / "ns" / "net") == netns_b and any(a.startswith(b"--local_rank") for a in argv) \
                    and any(str(out).encode() in a for a in argv):
                os.kill(int(p.name), signal.SIGKILL)
                break
        except OSError:
            continue
    killed = time.time()
    rc = job.wait()
    return time.time() - killed, rc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    p.add_argument("--skip-dead-rank", action="store_true")
    a = p.parse_args()
    try:
        bench(a)
    finally:  # DS-Chat on several nodes caches tokenized data node-locally (node-b's /tmp goes with the cluster)
        for name in ("rm-llama2-2nodes", "dpo-llama2-2nodes", "dead-rank"):
            shutil.rmtree(Path("/tmp/rlhf-overlay-data") / name, ignore_errors=True)


def bench(a: argparse.Namespace) -> None:
    with cluster.running(replace_leftovers=True), tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        root = Path(tmp)
        (root / "hostfile").write_text("node-a slots=1\nnode-b slots=1\n")
        print(f"{'target':16} {'1 node x 2 ranks':>17} {'2 nodes x 1 rank':>17}")
        for target in a.targets:
            print(f"{target:16} {one_node(target, root):16.1f}s {two_nodes(target, root):16.1f}s", flush=True)
        if not a.skip_dead_rank:
            seconds, rc = dead_rank(root)
            print(f"rank killed on node-b: the job stopped after {seconds:.1f} s (exit {rc})")


if __name__ == "__main__":
    main()
