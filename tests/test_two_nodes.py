"""Two real nodes on one machine (issue 18), made by rlhf_overlay.runtime.cluster: node-a is this machine, node-b a network
namespace with its own hostname, /tmp and sshd, joined by a veth pair (10.213.7.0/30, traffic stays on this
machine). OUTPUT and DATA live on the shared file system (/var/tmp), as on a cluster's shared storage.

- rm-llama2, dpo-llama2 (DeepSpeed-Chat) and rm-bloom (trlx reward model): DeepSpeed's launcher starts one rank
  per node over pdsh/ssh from the hostfile `node-a slots=1` / `node-b slots=1`;
- ppo-smoke-test as two accelerate machines: machine 0 on node-a, machine 1 joined with `make ppo-join` inside
  node-b's namespace (`ip netns exec`);
  each: world size 2 with one rank on each node (RANK_REPORT: hostname and network namespace), one copy of the
  outputs, the quality bar of the one-node runs (tests/test_scaleout_runs.py, the same data);
- refused before launch with a clear message: sshd down on node-b, pdsh missing, node-b unreachable (link down);
- a rank killed on node-b mid-run ends the whole job on both nodes instead of hanging.
The cluster is removed after the module, also when a test fails (a cluster left up is replaced first); the last
test checks that nothing of it is left. Skipped, with the reason, where no network namespace or sshd can be made.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from rlhf_overlay import PROJECT_ROOT

from rlhf_overlay.runtime import cluster
from helpers import wait_for
from test_scaleout_runs import (TARGET_VARS, assert_disjoint_samples, assert_zero2_sharded, event_files, jsonl, ranks,
                                unique, write_jsonl)

pytestmark = [pytest.mark.upstream, pytest.mark.slow]
SHARED_ROOT = Path("/var/tmp")          # not /tmp: node-b has its own


def target_env(**variables) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TARGET_VARS}
    env.update(OMP_NUM_THREADS="1", RANK_REPORT="1", **{k: str(v) for k, v in variables.items()})
    return env


def make(target: str, cmd_prefix: list[str] | None = None, env: dict | None = None, check: bool = True,
         **variables) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.time()
    res = subprocess.run([*(cmd_prefix or []), "make", "-s", target], cwd=PROJECT_ROOT, capture_output=True,
                         text=True, timeout=900, env=env or target_env(**variables))
    if check:
        assert res.returncode == 0, f"make {target} failed:\n{digest(res.stdout + res.stderr)}"
    return res, time.time() - t0


def digest(output: str) -> str:
    """The error lines of a failed run (the first rank's traceback is often far from the end), then its end."""
    errors = [ln for ln in output.splitlines() if re.search(r"Error|error:|Traceback|Exception", ln)]
    return "\n".join(errors[:40]) + "\n...\n" + output[-4000:]


def ssh(node: str, command: str) -> str:
    res = subprocess.run(["ssh", "-o", "BatchMode=yes", node, command], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


@pytest.fixture(scope="module")
def nodes():
    """The two-node cluster for this module: {node: its network namespace as `net:[inode]`}."""
    why = cluster.problem()
    if why:
        pytest.skip(f"no two-node test cluster on this machine: {why}")
    try:
        cluster.install_packages()
    except cluster.ClusterError as e:
        pytest.skip(f"no two-node test cluster on this machine: {e}")
    with cluster.running(replace_leftovers=True):
        yield {n: ssh(n, "readlink /proc/self/ns/net") for n in cluster.NODES}


@pytest.fixture(scope="module")
def shared(nodes):
    root = Path(tempfile.mkdtemp(prefix="rlhf-two-nodes-", dir=SHARED_ROOT))
    (root / "hostfile").write_text("node-a slots=1\nnode-b slots=1\n")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def pref_data(tiny_assets, shared) -> Path:
    """The deduplicated preference pairs of tests/test_scaleout_runs.py (192 eval, 2000 train), on shared storage."""
    pref = tiny_assets / "data" / "preference"
    rows = unique(jsonl(pref / "train.jsonl") + jsonl(pref / "eval.jsonl"), lambda r: (r["prompt"], r["chosen"]))
    rows = unique(rows, lambda r: (r["prompt"], r["rejected"]))
    write_jsonl(shared / "pref" / "eval.jsonl", rows[:192])
    write_jsonl(shared / "pref" / "train.jsonl", rows[192:2192])
    return shared / "pref"


def assert_one_rank_per_node(reports: list[dict], nodes: dict) -> None:
    assert [r["host"] for r in reports] == ["node-a", "node-b"], reports
    assert [r["netns"] for r in reports] == [nodes["node-a"], nodes["node-b"]], "rank 1 ran in node-b's namespace"


def assert_pdsh_started_both_nodes(out: str) -> None:
    assert "Running on the following workers: node-a,node-b" in out, "DeepSpeed's launcher used pdsh"
    for node in ("node-a", "node-b"):   # pdsh prefixes each line with the host it came from
        assert re.search(rf"^{node}: .*dist_world_size=2", out, re.M), f"no launcher output from {node}"


def drop_node_a_data_cache(run: Path) -> None:
    """Several nodes: DS-Chat caches the tokenized data node-locally, /tmp/rlhf-overlay-data/<run> (node-b's /tmp
    goes with the cluster)."""
    shutil.rmtree(Path("/tmp/rlhf-overlay-data") / run.name, ignore_errors=True)


def test_the_nodes_are_two_hosts_sharing_only_the_file_system(nodes, shared):
    assert ssh("node-a", "hostname") == "node-a" and ssh("node-b", "hostname") == "node-b"
    assert nodes["node-a"] == os.readlink("/proc/self/ns/net") != nodes["node-b"]
    assert ssh("node-b", f"cat {shared / 'hostfile'}") == "node-a slots=1\nnode-b slots=1", "shared storage"
    with tempfile.NamedTemporaryFile(dir="/tmp") as local:
        assert ssh("node-b", f"test -e {local.name} && echo shared || echo own") == "own", "node-b has its own /tmp"
    out = subprocess.run(cluster.on_node("node-b", ["hostname"]), capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "node-b", out.stderr


# ------------------------------------------------------------------------ DeepSpeed's launcher over pdsh/ssh
@pytest.fixture(scope="module")
def rm_llama2(nodes, shared, pref_data, dschat_dir):
    out = shared / "rm-llama2"
    res, seconds = make("rm-llama2", HOSTFILE=shared / "hostfile", ZERO_STAGE=2, DATA=pref_data, OUTPUT=out)
    drop_node_a_data_cache(out)
    return out, res, seconds


def test_rm_llama2_one_rank_on_each_node_learns_and_writes_once(rm_llama2, nodes):
    out, res, _ = rm_llama2
    assert_pdsh_started_both_nodes(res.stdout)
    reports = ranks(out, "rm")
    assert_one_rank_per_node(reports, nodes)
    assert_disjoint_samples(reports)
    assert len(reports[0]["samples"]) == len(reports[1]["samples"]) == 60 * 8 * 2   # as with 2 ranks on one node
    assert_zero2_sharded([r["optimizers"]["rm"] for r in reports])
    results = json.loads((out / "model" / "eval_results.json").read_text())
    assert results["eval/acc"] >= 0.75, results                     # the one-node bar; chance is 0.5
    assert [p.name for p in (out / "model").glob("*.bin")] == ["pytorch_model.bin"]
    assert [p.name.split(".")[-3] for p in event_files(out / "tensorboard")] == ["node-a"], "rank 0 writes them"
    assert not (out / "data_cache").exists(), "the tokenized-data cache is node-local on several nodes"


def test_dpo_llama2_one_rank_on_each_node_learns_and_writes_once(nodes, shared, dschat_dir):
    out = shared / "dpo-llama2"
    res, _ = make("dpo-llama2", HOSTFILE=shared / "hostfile", OUTPUT=out)
    drop_node_a_data_cache(out)
    assert_pdsh_started_both_nodes(res.stdout)
    assert re.search(r"^node-b: .*node_rank=1", res.stdout, re.M), "node-b ran the second node's rank"
    r = json.loads((out / "model" / "eval_results.json").read_text())
    assert r["after"]["acc"] >= 0.9 and r["after"]["policy_acc"] >= 0.9, r    # the one-node bars
    assert r["after"]["loss"] < r["before"]["loss"] - 0.2 and r["train/steps"] == 60, r
    assert len([p for p in (out / "model").iterdir() if p.suffix in (".bin", ".safetensors")]) == 1
    assert {p.name.split(".")[-3] for p in event_files(out / "tensorboard")} == {"node-a"}


def test_rm_bloom_one_rank_on_each_node_learns_and_writes_once(nodes, shared, pref_data, trlx_dir):
    out = shared / "rm-bloom"
    res, _ = make("rm-bloom", HOSTFILE=shared / "hostfile", DATA=pref_data, OUTPUT=out)
    assert_pdsh_started_both_nodes(res.stdout)
    reports = ranks(out, "rm")
    assert_one_rank_per_node(reports, nodes)
    assert_disjoint_samples(reports, first=2000 // 2 - 64)
    m = json.loads((out / "metrics.json").read_text())
    assert m["eval_accuracy"] >= 0.75 > 0.5 == m["chance_accuracy"], m
    assert sorted(p.name for p in (out / "reward_model").glob("*.safetensors")) == [
        "model.safetensors", "value_head.safetensors"]
    assert {p.name.split(".")[-3] for p in event_files(out / "tensorboard")} == {"node-a"}


# ------------------------------------------------------------------------- accelerate: two machines joined
def test_ppo_smoke_test_as_two_accelerate_machines(nodes, shared, trlx_dir):
    """Machine 0 on node-a (`make ppo-smoke-test HOSTFILE=...`), machine 1 inside node-b's namespace
    (`ip netns exec rlhf-node-b ... make ppo-join`)."""
    out = shared / "ppo-smoke"
    env = target_env()
    first = subprocess.Popen(cluster.on_node("node-a", ["make", "-s", "ppo-smoke-test", f"HOSTFILE={shared / 'hostfile'}",
                                                        f"OUTPUT={out}"], cwd=PROJECT_ROOT),
                             cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        config = out / "accelerate" / "machine-1.yaml"
        wait_for(first, config.is_file, timeout=300)   # machine 0 writes the per-machine configs
        join = cluster.on_node("node-b", ["make", "-s", "ppo-join", f"RUN={out}", "MACHINE_RANK=1"], cwd=PROJECT_ROOT)
        assert join[:4] == ["ip", "netns", "exec", cluster.NETNS]
        joined = subprocess.run(join, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900)
        stdout, _ = first.communicate(timeout=900)
    finally:
        if first.poll() is None:
            first.kill()
    assert joined.returncode == 0, digest(joined.stdout + joined.stderr)
    assert first.returncode == 0, digest(stdout)
    assert "PASS: the mean reward rose" in stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["reward_last"] > m["reward_first"] + 0.1, m                      # the one-node bar
    reports = ranks(out, "ppo")
    assert_one_rank_per_node(reports, nodes)
    assert_disjoint_samples(reports, first=2000 // 2 - 64)
    assert sorted(p.name for p in (out / "policy").glob("*.safetensors")) == ["model.safetensors"]
    assert {p.name.split(".")[-3] for p in event_files(out / "tensorboard")} == {"node-a"}


# ------------------------------------------------------------------------------------- failures at launch
def test_sshd_down_on_node_b_is_refused_before_launch(nodes, shared, dschat_dir):
    out = shared / "refused-sshd"
    cluster.stop_sshd("node-b")
    try:
        res, _ = make("rm-llama2", check=False, HOSTFILE=shared / "hostfile", OUTPUT=out)
    finally:
        cluster.start_sshd("node-b")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "hostfile:2: host 'node-b' is not reachable on port 22 (ssh): Connection refused" in res.stderr, res.stderr
    assert not out.exists(), "nothing is created"


def test_missing_pdsh_is_refused_before_launch(nodes, shared, trlx_dir, tmp_path):
    """A PATH on which every program is found except pdsh."""
    shadow = tmp_path / "bin"
    shadow.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        for program in (Path(folder).iterdir() if Path(folder).is_dir() else []):
            if program.name != "pdsh" and not (shadow / program.name).exists():
                (shadow / program.name).symlink_to(program)
    assert shutil.which("pdsh", path=str(shadow)) is None and shutil.which("make", path=str(shadow))
    out = shared / "refused-pdsh"
    res, _ = make("rm-bloom", check=False, env=target_env(PATH=shadow, HOSTFILE=shared / "hostfile", OUTPUT=out))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "several nodes, but `pdsh` is not installed on this node" in res.stderr, res.stderr
    assert "apt-get install pdsh" in res.stderr and not out.exists()


def test_node_b_unreachable_is_refused_before_launch(nodes, shared, dschat_dir):
    out = shared / "refused-link"
    cluster.set_link("node-b", up=False)
    try:
        res, _ = make("dpo-llama2", check=False, HOSTFILE=shared / "hostfile", OUTPUT=out)
    finally:
        cluster.set_link("node-b", up=True)
    assert res.returncode == 2, res.stdout + res.stderr
    assert re.search(r"hostfile:2: host 'node-b' is not reachable on port 22 \(ssh\): (No route to host|timed out)",
                     res.stderr), res.stderr
    assert not out.exists()


# ------------------------------------------------------------------------------ a rank dies on node-b
def job_pids(marker: str, netns: str | None = None) -> list[int]:
    """Processes whose command line holds `marker` (in network namespace `netns`, if given)."""
    found = []
    for p in Path("/proc").glob("[0-9]*"):
        try:
            argv = (p / "cmdline").read_bytes().split(b"\0")
            ns = os.readlink(p / "ns" / "net")
        except OSError:
            continue
        if any(marker.encode() in a for a in argv) and netns in (None, ns) and int(p.name) != os.getpid():
            found.append(int(p.name))
    return found


def rank_pid(marker: str, netns: str) -> list[int]:
    """The training rank (the script DeepSpeed's launcher gives --local_rank), not the launchers around it."""
    return [p for p in job_pids(marker, netns)
            if any(a.startswith(b"--local_rank") for a in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0"))]


def test_a_rank_killed_on_node_b_stops_the_whole_job(nodes, shared, pref_data, dschat_dir):
    """rm-llama2 on both nodes for 2 epochs; once it trains, node-b's rank is killed (SIGKILL): the launcher on
    node-a must return an error and no rank may be left on either node (the 900 s limit only guards a hang)."""
    out = shared / "dead-rank"
    cmd = [str(PROJECT_ROOT / ".venv" / "bin" / "python"), "-m", "rlhf_overlay.dschat_jobs.reward_model", "--hostfile",
           str(shared / "hostfile"), "--data", str(pref_data), "--output", str(out), "--max-steps", "0",
           "--epochs", "2"]
    job = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=target_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log = out / "training.log"
        for _ in range(1200):
            if job.poll() is not None or (log.is_file() and re.search(r"step \d+/", log.read_text())):
                break
            time.sleep(0.25)
        victims = rank_pid(str(out), nodes["node-b"])
        assert job.poll() is None and len(victims) == 1, f"node-b's rank is training ({victims})"
        os.kill(victims[0], signal.SIGKILL)
        killed = time.time()
        stdout, _ = job.communicate(timeout=900)
        stopped = time.time() - killed
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        drop_node_a_data_cache(out)
    print(f"\n[two nodes] the job stopped {stopped:.1f} s after node-b's rank was killed (exit {job.returncode})")
    assert job.returncode != 0, stdout[-3000:]
    assert "failed with exit code" in stdout + (out / "training.log").read_text()
    deadline = time.time() + 10         # the launchers' last exits
    while job_pids(str(out)) and time.time() < deadline:
        time.sleep(0.2)
    assert job_pids(str(out)) == [], "nothing of the job is left on either node"


# ---------------------------------------------------------------------------------------------- teardown
def test_cluster_down_leaves_nothing_also_after_a_failure(nodes):
    """Last: remove the module's cluster, then make one and fail inside it; nothing is left either time."""
    cluster.down()
    assert cluster.leftovers() == []
    with pytest.raises(RuntimeError, match="a test failing"):
        with cluster.running():
            assert "network namespace rlhf-node-b" in cluster.leftovers()
            assert ssh("node-b", "hostname") == "node-b"
            raise RuntimeError("a test failing while the cluster is up")
    assert cluster.leftovers() == []
    assert cluster.HOSTS_BEGIN not in Path("/etc/hosts").read_text()
