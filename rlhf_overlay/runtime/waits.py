"""Bounded waits: a run killed earlier (scancel, Ctrl-C, OOM) never hangs the next one silently.

Every place a run can wait on someone else goes through here, and every wait has a limit and says what it waits
for and how to clear it:

- torch's cpp_extension "baton" (`<TORCH_EXTENSIONS_DIR>/<op>/lock`): a bare file that means "someone is building
  this op"; it records no owner and torch waits for it to vanish in a sleep loop with no limit. A run killed while
  DeepSpeed JIT-built an op leaves it behind, and every later DeepSpeed run on the machine hangs. Before each
  DeepSpeed run (and in `make setup`) `check_torch_extensions()` looks at each such lock:
    * a live process on this machine holds it (the builder keeps the lock file open) or works in the op folder
      (ninja, the compiler): a build is in progress -> wait, a message every 30 s, stop after RLHF_LOCK_TIMEOUT;
    * otherwise it is stale -> removed with one warning line naming it. On a network file system a build on
      another node is invisible here, so there the lock must also be provably stale: the op's .so is newer than
      every source in its build.ninja, or the lock is older than any build takes (MAX_BUILD_SECONDS).
- our own locks (run folder, tiny-asset build, setup engine) are kernel locks (fcntl.flock): they die with their
  holder, so there is nothing stale to clean; `acquire_flock()` waits for a live holder with a message and a limit.
- distributed rendezvous and collectives: `dist_timeout()` is the gloo/NCCL timeout every launch and process-group
  init uses, and `roll_call()` names the rank that never arrived.

Knobs (environment, seconds):
  RLHF_LOCK_TIMEOUT   how long a run waits for a lock a live process holds (extension build, tiny-asset build,
                      setup engine) before it stops with advice. Default 1800 (a CUDA op build takes minutes).
  RLHF_DIST_TIMEOUT   rendezvous + every collective (gloo/NCCL process-group timeout, DeepSpeed's init_distributed,
                      accelerate's InitProcessGroupKwargs, HF Trainer's ddp_timeout, torchrun's rendezvous).
                      Default 300 on CPU, 1800 on GPU (see DIST_TIMEOUT_* below).

    python -m rlhf_overlay.runtime.waits extensions [DIR] [--timeout S]   # check/clear the extension locks now
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

from rlhf_overlay.errors import ArgumentParser, UserError, main_guard

LOCK_TIMEOUT_ENV = "RLHF_LOCK_TIMEOUT"
DIST_TIMEOUT_ENV = "RLHF_DIST_TIMEOUT"
LOCK_TIMEOUT_DEFAULT = 1800.0
# CPU: our ranks start in seconds and a tiny step takes milliseconds, so a rank missing for 5 minutes is gone.
# GPU: start-up loads multi-GB checkpoints from shared storage, NCCL sets up lazily at the first collective, and
# ranks legitimately wait at a barrier while rank 0 saves a 7B model; 30 min is torch's own gloo default.
DIST_TIMEOUT_CPU = 300
DIST_TIMEOUT_GPU = 1800
MAX_BUILD_SECONDS = 2 * 3600   # no op build takes this long; an older lock is stale even when nothing can be checked
REPORT_EVERY = 30.0            # seconds between "still waiting" messages
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "fuse.sshfs")


class WaitTimeout(UserError, TimeoutError):
    """A wait reached its limit; the message says what was awaited and how to clear it."""


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or math.isinf(value):
        raise UserError(f"{name}={raw!r}: give a number of seconds > 0 (e.g. {name}={int(default)})")
    return value


def lock_timeout() -> float:
    return _env_seconds(LOCK_TIMEOUT_ENV, LOCK_TIMEOUT_DEFAULT)


def dist_timeout(cuda: bool | None = None) -> int:
    """Seconds for rendezvous and every collective: RLHF_DIST_TIMEOUT, else 300 on CPU / 1800 on GPU."""
    if cuda is None:
        from rlhf_overlay.runtime.runs import has_cuda
        cuda = has_cuda()
    return int(math.ceil(_env_seconds(DIST_TIMEOUT_ENV, DIST_TIMEOUT_GPU if cuda else DIST_TIMEOUT_CPU)))


def dist_env(env: dict, cuda: bool) -> dict:
    """Put the distributed timeout into a launch environment: RLHF_DIST_TIMEOUT for our workers (roll call,
    accelerate, HF Trainer) and DEEPSPEED_TIMEOUT (whole minutes, read by deepspeed.init_distributed) for the
    upstream DeepSpeed-Chat scripts."""
    seconds = dist_timeout(cuda) if DIST_TIMEOUT_ENV not in env else int(math.ceil(float(env[DIST_TIMEOUT_ENV])))
    env[DIST_TIMEOUT_ENV] = str(seconds)
    env.setdefault("DEEPSPEED_TIMEOUT", str(max(1, math.ceil(seconds / 60))))
    return env


def _say(log: TextIO | None, text: str) -> None:
    print(text, file=log or sys.stderr, flush=True)


def wait_until(ready: Callable[[], bool], what: Callable[[], str], advice: str, timeout: float,
               log: TextIO | None = None, poll: float = 0.5) -> float:
    """Poll `ready()` until it is true; say what is awaited at once and every REPORT_EVERY s; after `timeout` s
    raise WaitTimeout with the advice. Returns the seconds waited."""
    start = time.monotonic()
    next_report = start
    while not ready():
        now = time.monotonic()
        if now - start >= timeout:
            raise WaitTimeout(f"gave up after {now - start:.0f} s waiting for {what()}. {advice} "
                              f"(limit: {LOCK_TIMEOUT_ENV}={timeout:.0f} s)")
        if now >= next_report:
            _say(log, f"waiting for {what()} ({now - start:.0f} s so far, limit {timeout:.0f} s via "
                      f"{LOCK_TIMEOUT_ENV}). {advice}")
            next_report = now + REPORT_EVERY
        time.sleep(poll)
    return time.monotonic() - start


# ------------------------------------------------------------------------------- torch extension batons
def extensions_root(env: dict | None = None) -> Path:
    """The TORCH_EXTENSIONS_DIR a run uses (runs.runtime_env sets <cache>/rlhf-overlay/torch_extensions)."""
    env = os.environ if env is None else env
    if env.get("TORCH_EXTENSIONS_DIR"):
        return Path(env["TORCH_EXTENSIONS_DIR"]).expanduser()
    from rlhf_overlay.paths import cache_dir
    return cache_dir() / "torch_extensions"


def _cmdline(pid: str) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    text = " ".join(raw.replace(b"\0", b" ").decode(errors="replace").split())  # one line, even for `python -c`
    return text if len(text) <= 100 else text[:97] + "..."


def folder_users(folder: Path | None, lock: Path | None = None) -> tuple[list[str], bool]:
    """Processes on this machine that hold `lock` open (torch's builder keeps its baton open while it builds) or
    whose working folder is inside `folder` (ninja and the compiler run there): ["pid (command)", ...], and
    whether some processes could not be inspected (other users' processes). folder=None: only `lock`."""
    inside = str(Path(os.path.realpath(folder))) if folder else None
    lock_path = os.path.realpath(lock) if lock else None
    users, hidden, me = [], False, str(os.getpid())
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd") if inside else ""
            if inside and (cwd == inside or cwd.startswith(inside + os.sep)):
                users.append(f"pid {pid} ({_cmdline(pid)})")
                continue
            if lock_path:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    try:
                        if os.readlink(f"/proc/{pid}/fd/{fd}") == lock_path:
                            users.append(f"pid {pid} ({_cmdline(pid)})")
                            break
                    except OSError:
                        continue
        except FileNotFoundError:
            continue  # the process ended while we looked
        except PermissionError:
            hidden = True
    return users, hidden


def build_is_current(folder: Path) -> bool:
    """The op's shared object exists and is newer than every source its build.ninja compiles."""
    ninja = folder / "build.ninja"
    libs = list(folder.glob("*.so"))
    if not ninja.is_file() or not libs:
        return False
    sources = []
    for line in ninja.read_text(errors="replace").splitlines():
        parts = line.split()
        # `build x.o: compile /abs/src.cpp` / `build x.cuda.o: cuda_compile /abs/src.cu`
        if len(parts) >= 4 and parts[0] == "build" and parts[2].endswith("compile"):
            sources.append(Path(parts[3].replace("$ ", " ").replace("$:", ":")))
    try:
        newest_source = max(s.stat().st_mtime for s in sources) if sources else None
    except OSError:
        return False  # a source is gone: the next load rebuilds
    return newest_source is not None and max(lib.stat().st_mtime for lib in libs) >= newest_source


def on_network_fs(path: Path) -> bool:
    best, fstype = "", ""
    real = os.path.realpath(path)
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return False
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3:
            mount = parts[1].replace("\\040", " ")
            if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                best, fstype = mount, parts[2]
    return fstype in NETWORK_FS or fstype.startswith("fuse.sshfs")


def _lock_state(lock: Path) -> tuple[str, str]:
    """('gone' | 'stale' | 'busy', why) for one extension lock. "Stale" is confirmed a moment later: torch's
    release() closes the lock before it deletes it, and that instant must not look like a dead builder."""
    state = _lock_state_once(lock)
    if state[0] == "stale":
        time.sleep(0.5)
        state = _lock_state_once(lock)
    return state


def _lock_state_once(lock: Path) -> tuple[str, str]:
    try:
        st = lock.stat()
    except FileNotFoundError:
        return "gone", ""
    age = time.time() - st.st_mtime
    folder = lock.parent
    users, hidden = folder_users(folder, lock)
    if users:
        return "busy", "a build in progress: " + "; ".join(users)
    if build_is_current(folder):
        return "stale", f"no process builds there and {folder.name}'s .so is newer than its sources"
    if age > MAX_BUILD_SECONDS:
        return "stale", f"no process builds there and the lock is {age / 3600:.1f} h old"
    if on_network_fs(folder):
        return "busy", ("no build on this machine, but the folder is on a network file system, where another "
                        "node may be building")
    if hidden and st.st_uid != os.getuid():  # our own builders are always visible; another user's may not be
        return "busy", f"no visible build, but the lock belongs to uid {st.st_uid}, whose processes cannot be inspected"
    return "stale", "no process on this machine builds there"


def _remove_stale(lock: Path, why: str, log: TextIO | None) -> None:
    with contextlib.suppress(FileNotFoundError):
        lock.unlink()
        _say(log, f"warning: removed stale torch extension lock {lock} ({why}; left by a killed run)")


def check_torch_extensions(root: str | os.PathLike | None = None, timeout: float | None = None,
                           log: TextIO | None = None) -> None:
    """Clear stale `lock` batons under the extension folder, wait (bounded, with messages) for real builds."""
    root = Path(root) if root else extensions_root()
    if not root.is_dir():
        return
    timeout = lock_timeout() if timeout is None else timeout
    for lock in sorted(root.glob("*/lock")):
        state, why = _lock_state(lock)
        if state == "stale":
            _remove_stale(lock, why, log)
        elif state == "busy":
            def done(lock=lock) -> bool:
                nonlocal state, why
                state, why = _lock_state(lock)
                if state == "stale":
                    _remove_stale(lock, why, log)
                return state != "busy"

            wait_until(done, lambda: f"torch extension build of {lock.parent.name!r} (lock {lock}; {why})",
                       f"It ends by itself when the build finishes; if no build is really running, remove the lock "
                       f"(rm {lock}) and start again.", timeout, log, poll=1.0)


# ------------------------------------------------------------------------------- our kernel locks
def _holder(path: Path) -> str:
    try:
        text = Path(path).read_text(errors="replace").strip()
    except OSError:
        text = ""
    return text or "another process"


def _stamp(f) -> None:
    """Write who holds the lock into the lock file (read by whoever waits for it)."""
    try:
        os.ftruncate(f.fileno(), 0)
        os.pwrite(f.fileno(), f"pid {os.getpid()} on {socket.gethostname()}: {_cmdline(str(os.getpid()))}\n".encode(), 0)
    except OSError:
        pass  # a read-only lock file: the lock still works, only the holder's name is missing


def try_flock(f) -> bool:
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    _stamp(f)
    return True


def acquire_flock(f, what: str, advice: str = "", timeout: float | None = None, log: TextIO | None = None) -> None:
    """Take an exclusive kernel lock on the open file `f`. A lock a live process holds is waited for (a message
    naming the holder at once and every 30 s) up to RLHF_LOCK_TIMEOUT; a dead holder's lock is already gone."""
    if try_flock(f):
        return
    timeout = lock_timeout() if timeout is None else timeout
    wait_until(lambda: try_flock(f), lambda: f"{what} (held by {_holder(Path(f.name))})",
               advice or "It is released when that process ends.", timeout, log)


# ------------------------------------------------------------------------------- distributed rendezvous
_STORES: list = []


def roll_call(timeout: float | None = None, prefix: str = "rlhf_overlay/roll_call") -> None:
    """Before a process group is made: every rank signs in at MASTER_ADDR:MASTER_PORT and waits until all have.
    A rank that has not arrived after the timeout is named (with who did arrive), instead of torch's anonymous
    "1/2 clients joined". Uses a TCPStore on the launcher's rendezvous port, without waiting for workers, so the
    process group made afterwards (same port, multi-tenant) is unaffected; once all are there, every process group
    made later gets the same timeout (bound_process_groups). No-op for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return
    import datetime

    from torch.distributed import TCPStore

    rank = int(os.environ["RANK"])
    addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
    timeout = dist_timeout() if timeout is None else timeout
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"   # torchrun's agent serves the store
    hint = (f"A rank that never arrives is a node whose launcher did not start (e.g. `make ppo-join` not run there), "
            f"a process that crashed at start-up (see its log), or a node that cannot reach {addr}:{port} "
            f"(firewall, wrong MASTER_ADDR). Raise {DIST_TIMEOUT_ENV} (now {timeout:.0f} s) if ranks start slowly.")
    start = time.monotonic()
    try:
        store = TCPStore(addr, port, world, rank == 0 and not agent, datetime.timedelta(seconds=timeout),
                         wait_for_workers=False, multi_tenant=True)
    except Exception as e:  # the server (rank 0 or the torchrun agent) never came up
        raise WaitTimeout(f"distributed rendezvous: rank {rank} could not reach rank 0 at {addr}:{port} within "
                          f"{timeout:.0f} s ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); rank 0 "
                          f"never arrived. {hint}") from None
    _STORES.append(store)  # rank 0 serves it: it must outlive the others' roll call (torch's store then reuses it)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    key = lambda r: f"{prefix}/{attempt}/{r}"  # noqa: E731
    store.set(key(rank), f"{socket.gethostname()} pid {os.getpid()}")
    missing = set(range(world))
    while True:
        missing = {r for r in missing if not store.check([key(r)])}
        if not missing:
            bound_process_groups(timeout)
            return
        if time.monotonic() - start > timeout:
            arrived = sorted(set(range(world)) - missing)
            where = ", ".join(f"{r} ({store.get(key(r)).decode(errors='replace')})" for r in arrived[:8])
            names = ", ".join(map(str, sorted(missing)[:16])) + (" ..." if len(missing) > 16 else "")
            raise WaitTimeout(f"distributed rendezvous: rank(s) {names} of {world} never arrived within "
                              f"{timeout:.0f} s ({DIST_TIMEOUT_ENV}); arrived: {where}. {hint}")
        time.sleep(0.2)


def bound_process_groups(seconds: float) -> None:
    """Every process group this process makes from now on gets `seconds` as its timeout, not only the world group.

    torch gives the world group the timeout its creator passes (accelerate, HF Trainer's ddp_timeout, DeepSpeed's
    DEEPSPEED_TIMEOUT), but `torch.distributed.new_group()` without a timeout — how DeepSpeed makes its data-,
    expert- and sequence-parallel groups — falls back to the module default, 30 minutes for gloo and 10 for NCCL:
    a collective on such a group whose peer died would hang that long. torch has no public setter for that
    default; `new_group` reads the module globals `default_pg_timeout` / `default_pg_nccl_timeout` of
    torch.distributed.distributed_c10d (torch 2.13, `_get_default_timeout`), so those are set here."""
    import datetime

    import torch.distributed.distributed_c10d as c10d

    bound = datetime.timedelta(seconds=float(seconds))
    c10d.default_pg_timeout = bound
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        c10d.default_pg_nccl_timeout = bound


# ------------------------------------------------------------------------------- command line
@main_guard   # LockError and bad flags -> `error: ...`, exit 2
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m rlhf_overlay.runtime.waits", description=__doc__.split("\n\n")[0],
                       epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    ext = sub.add_parser("extensions", help="clear stale torch extension locks, wait for builds in progress")
    ext.add_argument("root", nargs="?", default="", help="extension folder (default: TORCH_EXTENSIONS_DIR or "
                                                         "<cache>/rlhf-overlay/torch_extensions)")
    ext.add_argument("--timeout", type=float, default=None, help=f"seconds (default: {LOCK_TIMEOUT_ENV} or 1800)")
    a = p.parse_args(argv)
    check_torch_extensions(a.root or None, a.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
