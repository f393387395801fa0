"""rlhf_overlay.runtime.waits: a killed run never hangs the next one.

- torch's extension-build `lock` left by a killed run is removed with a warning (unit + a real DeepSpeed-Chat
  target); a lock held by a live build is waited for with a message and the run goes on once it is released; a
  build that never ends stops the wait at RLHF_LOCK_TIMEOUT with the advice;
- a rank that never joins stops the job with a message naming it, within RLHF_DIST_TIMEOUT;
- our own locks (run folder, tiny assets, setup engine) and HF datasets' cache lock are kernel locks: a live holder
  is named, a killed holder leaves nothing behind.
Bounds below are generous "finished at all" limits (subprocess timeouts), not timings.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from rlhf_overlay import PROJECT_ROOT

from rlhf_overlay.runtime import runs

from rlhf_overlay.runtime import waits
from rlhf_overlay.paths import cache_dir

PY = sys.executable


def env_with(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), OMP_NUM_THREADS="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def fake_op(root: Path, name: str = "fused_adam", built: bool = False) -> Path:
    """An extension folder like torch makes: build.ninja naming a source, optionally the .so newer than it."""
    folder = root / name
    folder.mkdir(parents=True)
    src = root / f"{name}.cpp"
    src.write_text("// source\n")
    (folder / "build.ninja").write_text(f"build {name}.o: compile {src}\nbuild {name}.so: link {name}.o\n")
    if built:
        so = folder / f"{name}.so"
        so.write_bytes(b"\x7fELF")
        os.utime(so, (time.time() + 5, time.time() + 5))
    return folder


# A live build, as torch does it: FileBaton.try_acquire() creates `lock` and keeps it open until release().
HOLDER = r"""
import sys, time
from torch.utils.file_baton import FileBaton
baton = FileBaton(sys.argv[1])
assert baton.try_acquire()
print("holding", flush=True)
sys.stdin.readline()          # released when the test writes a line
baton.release()
"""


def start_holder(lock: Path) -> subprocess.Popen:
    p = subprocess.Popen([PY, "-c", HOLDER, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "holding"
    return p


def check_cmd(root: Path) -> list[str]:
    return [PY, "-m", "rlhf_overlay.runtime.waits", "extensions", str(root)]


# ------------------------------------------------------------------------------------- extension locks
def test_stale_lock_removed_with_one_warning(tmp_path):
    built = fake_op(tmp_path, "fused_adam", built=True)
    unbuilt = fake_op(tmp_path, "cpu_adam")          # killed during its first build: no .so
    for f in (built, unbuilt):
        (f / "lock").touch()
    r = subprocess.run(check_cmd(tmp_path), env=env_with(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: removed stale")]
    assert len(warnings) == 2, r.stderr
    assert str(built / "lock") in r.stderr and "newer than its sources" in r.stderr
    assert str(unbuilt / "lock") in r.stderr and "no process on this machine builds there" in r.stderr
    assert not (built / "lock").exists() and not (unbuilt / "lock").exists()
    assert (built / "fused_adam.so").exists()   # only the lock goes


def test_live_build_is_waited_for_then_the_run_proceeds(tmp_path):
    lock = fake_op(tmp_path, built=True) / "lock"   # even with a current .so, a live holder means "building"
    holder = start_holder(lock)
    try:
        waiter = subprocess.Popen(check_cmd(tmp_path), env=env_with(), stderr=subprocess.PIPE, text=True)
        first = waiter.stderr.readline()
        assert "waiting for torch extension build of 'fused_adam'" in first, first
        assert f"pid {holder.pid}" in first and f"rm {lock}" in first and "RLHF_LOCK_TIMEOUT" in first
        assert waiter.poll() is None                 # still waiting while the build holds the lock
        holder.stdin.write("done\n")
        holder.stdin.flush()
        assert waiter.wait(timeout=120) == 0, waiter.stderr.read()
        assert "removed stale" not in waiter.stderr.read()   # a released lock is gone, nothing to clean
    finally:
        holder.kill()
        holder.wait()


def test_builder_killed_during_the_wait_leaves_a_lock_that_is_then_cleared(tmp_path):
    lock = fake_op(tmp_path) / "lock"
    holder = start_holder(lock)
    waiter = subprocess.Popen(check_cmd(tmp_path), env=env_with(), stderr=subprocess.PIPE, text=True)
    assert "waiting for" in waiter.stderr.readline()
    holder.send_signal(signal.SIGKILL)               # like scancel: the baton stays on disk
    holder.wait()
    assert lock.exists()
    assert waiter.wait(timeout=120) == 0
    rest = waiter.stderr.read()
    assert f"warning: removed stale torch extension lock {lock}" in rest, rest
    assert not lock.exists()


def test_build_that_never_ends_stops_at_the_limit_with_advice(tmp_path):
    folder = fake_op(tmp_path)
    (folder / "lock").touch()
    # ninja / the compiler run with their working folder in the op folder: that alone counts as a build
    compiler = subprocess.Popen(["sleep", "300"], cwd=folder)
    try:
        r = subprocess.run(check_cmd(tmp_path), env=env_with(RLHF_LOCK_TIMEOUT=2), capture_output=True, text=True,
                           timeout=120)
    finally:
        compiler.kill()
        compiler.wait()
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: gave up after") and f"pid {compiler.pid} (sleep 300)" in last, last
    assert f"rm {folder / 'lock'}" in last and "RLHF_LOCK_TIMEOUT=2" in last
    assert (folder / "lock").exists()                # a live build's lock is never removed


def test_bad_timeout_is_one_clear_error(tmp_path):
    r = subprocess.run(check_cmd(tmp_path), env=env_with(RLHF_LOCK_TIMEOUT="soon"), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == ("error: RLHF_LOCK_TIMEOUT='soon': give a number of seconds > 0 "
                                                      "(e.g. RLHF_LOCK_TIMEOUT=1800)")


@pytest.mark.upstream
@pytest.mark.slow
def test_stale_lock_does_not_hang_a_deepspeed_chat_run(dschat_dir, tiny_assets, tmp_path):
    """The issue's case: a DeepSpeed-Chat run killed while loading its JIT op left `fused_adam/lock`; the next
    `make rm-llama2` removes it with a warning and trains (without the check it waits in torch's baton forever)."""
    ext = tmp_path / "torch_extensions"
    real = cache_dir() / "torch_extensions" / "fused_adam"
    if real.is_dir():
        shutil.copytree(real, ext / "fused_adam", ignore=shutil.ignore_patterns("lock"))  # keeps mtimes
    else:
        (ext / "fused_adam").mkdir(parents=True)     # no cached build: the run builds it (~2 min)
    lock = ext / "fused_adam" / "lock"
    lock.touch()
    out = tmp_path / "rm"
    r = subprocess.run([PY, "-m", "rlhf_overlay.dschat_jobs.reward_model", "--output", str(out), "--max-steps", "2"],
                       env=env_with(TORCH_EXTENSIONS_DIR=ext), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert f"warning: removed stale torch extension lock {lock}" in r.stderr
    assert (out / "model").is_dir() and not lock.exists()


# ------------------------------------------------------------------------------------- distributed
NEVER_JOINS = r"""
import os, sys
if os.environ["RANK"] == "1":
    sys.exit(0)                       # this rank never arrives (its node never started the worker)
from rlhf_overlay.trlx_jobs.common import cpu_deepspeed_backend_fix
cpu_deepspeed_backend_fix()           # what every trlx PPO worker does before trlx builds its Accelerator
print("process group ready", flush=True)
"""


def two_ranks(tmp_path: Path, worker: str, timeout: int) -> subprocess.CompletedProcess:
    """`worker` (python source) as 2 CPU ranks under torchrun, RLHF_DIST_TIMEOUT=3 s."""
    from rlhf_overlay.runtime.runs import free_port
    script = tmp_path / "worker.py"
    script.write_text(worker)
    cmd = [PY, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(script)]
    return subprocess.run(cmd, env=env_with(RLHF_DIST_TIMEOUT=3, CUDA_VISIBLE_DEVICES=""), capture_output=True,
                          text=True, timeout=timeout)


def test_rank_that_never_joins_is_named_within_the_timeout(tmp_path):
    r = two_ranks(tmp_path, NEVER_JOINS, timeout=300)
    assert r.returncode != 0 and "process group ready" not in r.stdout
    assert "distributed rendezvous: rank(s) 1 of 2 never arrived within 3 s (RLHF_DIST_TIMEOUT)" in r.stderr, \
        r.stderr[-3000:]
    assert "arrived: 0 (" in r.stderr


def test_deepspeed_chat_rank_that_never_arrives_is_named(dschat_dir, tiny_assets, tmp_path):
    """DeepSpeed-Chat's step 2 as DeepSpeed's launcher starts rank 0 of 2 (patch 0019: run_checks.roll_call before
    deepspeed.init_distributed); rank 1 never starts. Rank 0 stops after RLHF_DIST_TIMEOUT naming rank 1, instead of
    torch's anonymous "1/2 clients joined" (the subprocess timeout would catch a hang)."""
    import shlex
    from rlhf_overlay.runtime.runs import free_port, runtime_env
    dry = subprocess.run([PY, "-m", "rlhf_overlay.dschat_jobs.reward_model", "--dry-run", "--output",
                          str(tmp_path / "run")], env=env_with(), capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr[-2000:]
    launch = shlex.split(dry.stdout.strip().splitlines()[-1])
    step = Path(dry.stdout.strip().splitlines()[-2].split("(in ", 1)[1].rstrip(")"))
    main_args = launch[launch.index("main.py") + 1:]
    port = free_port()
    env = dict(runtime_env(cpu=True), RLHF_DIST_TIMEOUT="3", WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", LOCAL_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(dschat_dir)])
    r = subprocess.run([PY, "main.py", "--local_rank", "0", *main_args], cwd=step, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0
    assert "distributed rendezvous: rank(s) 1 of 2 never arrived within 3 s (RLHF_DIST_TIMEOUT)" in r.stderr, \
        (r.stdout + r.stderr)[-3000:]
    assert "Traceback" not in r.stderr


LATER_GROUP = r"""
import os, sys, time
import torch.distributed as dist
from rlhf_overlay.trlx_jobs.common import cpu_deepspeed_backend_fix
cpu_deepspeed_backend_fix()             # roll call + the world group with RLHF_DIST_TIMEOUT
group = dist.new_group([0, 1])          # how DeepSpeed makes its data-parallel groups: no timeout given
if dist.get_rank() == 1:
    time.sleep(600)                     # a peer that stops answering (hung, not dead: its sockets stay open)
    sys.exit(0)
try:
    dist.barrier(group=group)
except Exception as e:
    print("later group gave up:", type(e).__name__, str(e).splitlines()[0][:200], flush=True)
    sys.exit(3)
print("barrier passed", flush=True)
"""


def test_a_group_made_after_the_roll_call_is_bounded_too(tmp_path):
    """DeepSpeed's own groups (new_group without a timeout) wait RLHF_DIST_TIMEOUT for a hung peer, not torch's
    30-minute default: rank 0 gives up on its own while rank 1 is still asleep (the subprocess timeout would
    catch a hang)."""
    r = two_ranks(tmp_path, LATER_GROUP, timeout=240)
    assert "later group gave up:" in r.stdout, (r.stdout + r.stderr)[-3000:]
    assert "Timed out waiting 3000ms" in r.stdout, "the group's own timeout is RLHF_DIST_TIMEOUT (3 s)"
    assert "barrier passed" not in r.stdout


def test_rank_zero_that_never_comes_is_named(tmp_path):
    from rlhf_overlay.trlx_jobs.common import free_port
    env = env_with(RLHF_DIST_TIMEOUT=2, WORLD_SIZE=2, RANK=1, LOCAL_RANK=1, MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=free_port())
    r = subprocess.run([PY, "-c", "from rlhf_overlay.runtime.waits import roll_call; roll_call()"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "rank 1 could not reach rank 0 at 127.0.0.1:" in r.stderr and "rank 0 never arrived" in r.stderr


def test_launch_environment_carries_the_timeouts(monkeypatch):
    monkeypatch.delenv("RLHF_DIST_TIMEOUT", raising=False)
    monkeypatch.delenv("DEEPSPEED_TIMEOUT", raising=False)
    cpu = runs.runtime_env(cpu=True)
    assert cpu["RLHF_DIST_TIMEOUT"] == "300" and cpu["DEEPSPEED_TIMEOUT"] == "5"   # DeepSpeed reads minutes
    monkeypatch.setenv("RLHF_DIST_TIMEOUT", "90")
    assert waits.dist_env({}, cuda=True) == {"RLHF_DIST_TIMEOUT": "90", "DEEPSPEED_TIMEOUT": "2"}
    monkeypatch.delenv("RLHF_DIST_TIMEOUT")
    assert waits.dist_timeout(cuda=True) == 1800


# ------------------------------------------------------------------------------------- our kernel locks
HOLD_RUN_DIR = r"""
import sys
from rlhf_overlay.runtime.runs import prepare_run_dir
prepare_run_dir("test", output=sys.argv[1])
print("holding", flush=True)
sys.stdin.readline()
"""


@contextlib.contextmanager
def holding(script: str, arg) -> Iterator[subprocess.Popen]:
    """A process that runs `script` (it takes a lock on `arg`, prints `holding`, waits), once it holds the lock;
    SIGKILLed at the end of the block, so what it held is freed only by its death."""
    holder = subprocess.Popen([PY, "-c", script, str(arg)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=env_with())
    try:
        assert holder.stdout.readline().strip() == "holding"
        yield holder
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_run_folder_in_use_is_refused_naming_the_holder_and_freed_when_it_dies(tmp_path):
    out = tmp_path / "run"
    with holding(HOLD_RUN_DIR, out) as holder:
        with pytest.raises(runs.RunDirError, match=rf"is in use by a running job \(pid {holder.pid} \("):
            runs.prepare_run_dir("test", output=out, overwrite=True)
    assert runs.prepare_run_dir("test", output=out) == out.resolve()   # dead holder: nothing stale to clean
    runs.unlock_run_dir(out.resolve())


HOLD_VIA_LAUNCHER = r"""
import sys
from rlhf_overlay.runtime.runs import prepare_run_dir, run_logged
run = prepare_run_dir("test", output=sys.argv[1])
run_logged([sys.executable, "-c", "import sys, time; print('job started', flush=True); time.sleep(300)"], run)
"""


def test_the_launched_job_keeps_the_run_folder_when_its_parent_is_killed(tmp_path):
    out = tmp_path / "run"
    parent = subprocess.Popen([PY, "-c", HOLD_VIA_LAUNCHER, str(out)], stdout=subprocess.PIPE, text=True,
                              env=env_with())
    assert parent.stdout.readline().strip() == "job started"
    job = [line.split()[0] for line in subprocess.run(["pgrep", "-a", "-P", str(parent.pid)], capture_output=True,
                                                      text=True).stdout.splitlines()]
    assert len(job) == 1
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    try:
        with pytest.raises(runs.RunDirError, match=rf"in use by a running job \(pid {job[0]} \("):
            runs.prepare_run_dir("test", output=out, overwrite=True)
    finally:
        os.kill(int(job[0]), signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:   # the kernel drops the lock as the killed job exits
        try:
            assert runs.prepare_run_dir("test", output=out, overwrite=True) == out.resolve()
            break
        except runs.RunDirError:
            assert time.monotonic() < deadline, "the lock outlived its holder"
            time.sleep(0.1)
    runs.unlock_run_dir(out.resolve())


def test_refused_output_gets_no_lock_file(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "model.bin").write_text("x")
    with pytest.raises(runs.RunDirError, match="is not empty"):
        runs.prepare_run_dir("test", output=out)
    assert sorted(p.name for p in out.iterdir()) == ["model.bin"]


HOLD_FLOCK = r"""
import sys
from rlhf_overlay.runtime.waits import acquire_flock
f = open(sys.argv[1], "a+")
acquire_flock(f, "test lock")
print("holding", flush=True)
sys.stdin.readline()
"""


def test_our_lock_names_its_live_holder_and_gives_up_at_the_limit(tmp_path):
    path = tmp_path / ".build.lock"
    with holding(HOLD_FLOCK, path) as holder:
        import io
        log = io.StringIO()
        with open(path, "a+") as f, pytest.raises(waits.WaitTimeout, match=rf"held by pid {holder.pid} on "):
            waits.acquire_flock(f, "the tiny-asset build lock", timeout=1, log=log)
        assert log.getvalue().startswith(f"waiting for the tiny-asset build lock (held by pid {holder.pid}")
    with open(path, "a+") as f:
        waits.acquire_flock(f, "the tiny-asset build lock", timeout=1)   # the kernel dropped the dead holder's lock


def test_tiny_asset_build_waits_for_a_live_builder_then_stops_naming_it(tmp_path, monkeypatch):
    from rlhf_overlay.data.tiny_assets import LOCK_FILE, AssetsError, ensure_tiny_assets
    tmp_path.mkdir(exist_ok=True)
    with holding(HOLD_FLOCK, tmp_path / LOCK_FILE) as holder:
        monkeypatch.setenv("RLHF_LOCK_TIMEOUT", "1")
        with pytest.raises(AssetsError, match=rf"tiny-asset build lock .* \(held by pid {holder.pid} on "):
            ensure_tiny_assets(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]   # nothing was built while it waited


def test_setup_engine_waits_for_a_live_engine_then_gives_up_with_its_name(tmp_path, monkeypatch):
    from rlhf_overlay import paths
    from rlhf_overlay.engine import setup_engine
    monkeypatch.setattr(paths, "UPSTREAM_DIR", tmp_path)
    held = setup_engine.engine_lock()
    try:
        script = ("import sys; from rlhf_overlay import paths; from rlhf_overlay.engine import setup_engine; from pathlib import Path; "
                  f"paths.UPSTREAM_DIR = Path({str(tmp_path)!r}); sys.exit(setup_engine.main(['verify']))")
        r = subprocess.run([PY, "-c", script], env=env_with(RLHF_LOCK_TIMEOUT=1), capture_output=True, text=True,
                           timeout=120)
    finally:
        held.close()
    assert r.returncode == 2
    assert f"waiting for the setup engine lock {tmp_path / '.setup-engine.lock'} (held by pid {os.getpid()}" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: gave up after")


HOLD_DATASETS_LOCK = r"""
import sys
from datasets.utils._filelock import FileLock
lock = FileLock(sys.argv[1])
lock.acquire()
print("holding", flush=True)
sys.stdin.readline()
"""


def test_hf_datasets_cache_lock_is_a_kernel_lock_that_dies_with_its_holder(tmp_path):
    """datasets 4.8.5 locks its cache with filelock's FileLock = UnixFileLock (fcntl.flock) on Linux."""
    from datasets.utils._filelock import FileLock
    from filelock import Timeout, UnixFileLock
    assert issubclass(FileLock, UnixFileLock)
    path = str(tmp_path / "cache_builder.lock")
    with holding(HOLD_DATASETS_LOCK, path):
        with pytest.raises(Timeout):
            FileLock(path, timeout=0.5).acquire()
    lock = FileLock(path, timeout=5)
    lock.acquire()                                   # the file is still there, the lock is not
    lock.release()
