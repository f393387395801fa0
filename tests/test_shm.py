"""rlhf_overlay/runtime/shm.py: DeepSpeed's CPU all-reduce buffers do not pile up in /dev/shm (RAM)."""
import os
import subprocess
import sys
import textwrap

import pytest

from rlhf_overlay.runtime import shm

PY = sys.executable


def test_sweep_removes_only_buffers_no_live_process_uses(tmp_path):
    uid = os.getuid()
    stale = tmp_path / f"{shm.PREFIX}{uid}_127.0.0.1_29500_0"
    live = tmp_path / f"{shm.PREFIX}{uid}_127.0.0.1_29501_0"
    other_user = tmp_path / f"{shm.PREFIX}{uid + 1}_127.0.0.1_29500_0"
    unrelated = tmp_path / "psm_something"
    for p in (stale, live, other_user, unrelated):
        p.write_bytes(b"x" * 1000)
    holder = subprocess.Popen([PY, "-c", f"import time; f = open({str(live)!r}, 'rb'); time.sleep(60)"])
    try:
        for _ in range(100):   # until the holder has the file open
            if str(live) in shm._in_use(tmp_path):
                break
            subprocess.run(["sleep", "0.1"])
        assert shm.sweep(tmp_path, quiet=True) == (1, 1000)
    finally:
        holder.kill()
        holder.wait()
    assert not stale.exists()
    assert live.exists() and other_user.exists() and unrelated.exists()
    assert shm.sweep(tmp_path, quiet=True) == (1, 1000)   # its holder is gone: now it goes too
    assert not live.exists()


WORKER = textwrap.dedent("""
    import os
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    import torch.distributed as dist
    dist.barrier()
    if dist.get_rank() == 0:
        port = os.environ["MASTER_PORT"]
        mine = sorted(n for n in os.listdir("/dev/shm") if n.startswith("deepspeed_allreduce_buffer_") and
                      n.split("_")[-2] == port)
        print("buffers:", " ".join(mine), flush=True)
    dist.barrier()
""")


@pytest.mark.slow
def test_a_two_rank_deepspeed_job_leaves_no_buffer_behind(tmp_path, monkeypatch):
    """The real op: a 2-rank DeepSpeed job on CPU makes one buffer per rank (printed by rank 0 while it runs) and,
    launched through runs.run_logged like every job, none of them is left afterwards."""
    from rlhf_overlay.runtime.runs import free_port, run_logged, runtime_env
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = str(free_port())
    # LOCAL_SIZE: what DeepSpeed's launcher sets and its op reads to decide all ranks share this machine
    env = dict(runtime_env(cpu=True), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", LOCAL_SIZE="2")
    cmd = [PY, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", port, str(script)]
    rc = run_logged(cmd, tmp_path, env=env)
    log = (tmp_path / "training.log").read_text()
    assert rc == 0, log[-3000:]
    line = next(line for line in log.splitlines() if line.startswith("buffers:"))
    made = line.split()[1:]
    if not made:
        pytest.skip("this DeepSpeed build made no shared-memory buffers (its CPU comm op is not in use here)")
    assert len(made) == 2, line
    left = [n for n in os.listdir("/dev/shm") if n in made]
    assert left == [], f"left in /dev/shm: {left}"
