"""Run folders: one per training run, holding the model, logs, the exact command and the resolved config.

Every training entry point does the same four things, so they live here once:
    run_dir = prepare_run_dir("rm-llama2", output=args.output, overwrite=args.overwrite)
    record_invocation(run_dir, sys.argv, config_dict)
    env = runtime_env()                       # caches, thread counts, CPU accelerator
    rc = run_logged(cmd, run_dir, env=env)    # terminal + run_dir/training.log

A run folder is held for the whole life of the process that prepared it by a kernel lock (fcntl.flock on
`<run>/.run.lock`): a second run into a folder in use is refused naming the holder's pid; the lock goes with its
holder however it ends (exit, exception, Ctrl-C, kill -9), so a killed run never leaves a stale lock.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

from rlhf_overlay.paths import RUNS_DIR, cache_dir
from rlhf_overlay.errors import UserError


class RunDirError(UserError, RuntimeError):
    """A run folder that cannot be used as asked (e.g. it holds a previous run)."""


RUN_LOCK = ".run.lock"
_HELD: dict[Path, tuple[object, int]] = {}  # run folders this process holds: (open lock file, its inode)


def lock_run_dir(run_dir: Path) -> None:
    """Take the run folder's kernel lock for the rest of this process (a no-op if this process holds it already);
    refuse, naming the holder, when another live process holds it. Nothing to clean after a crash: the kernel
    drops the lock when its holder dies."""
    from rlhf_overlay.runtime import waits
    run_dir = Path(run_dir)
    lock = run_dir / RUN_LOCK
    held = _HELD.get(run_dir)
    if held is not None:
        try:
            if lock.stat().st_ino == held[1]:
                return
        except FileNotFoundError:
            pass
        held[0].close()
        del _HELD[run_dir]
    f = open(lock, "a+")
    if not waits.try_flock(f):
        f.close()
        holders, _ = waits.folder_users(None, lock)   # who has it open now (the run, or the launcher it started)
        holder = "; ".join(holders) or lock.read_text(errors="replace").strip() or "another process"
        raise RunDirError(f"OUTPUT={run_dir} is in use by a running job ({holder}). Wait for it to finish (or stop "
                          f"it), or choose another OUTPUT; the folder frees itself when that process ends.")
    _HELD[run_dir] = (f, os.fstat(f.fileno()).st_ino)


def unlock_run_dir(run_dir: Path) -> None:
    """Release a run folder this process holds (normally never needed: exiting releases it)."""
    held = _HELD.pop(Path(run_dir), None)
    if held is not None:
        held[0].close()


def prepare_run_dir(kind: str, output: str | os.PathLike | None = None, overwrite: bool = False,
                    runs_root: Path | None = None) -> Path:
    run_dir = _prepare_run_dir(kind, output, overwrite, runs_root)
    # training_scripts/run.sh passes a file here and reports every run folder once the target succeeded.
    announce = os.environ.get("RLHF_OVERLAY_RUN_DIRS_FILE")
    if announce:
        with open(announce, "a") as f:
            f.write(f"{run_dir}\n")
    # RANK_REPORT=1: every rank of this run (and of runs it starts) writes its facts into <run>/ranks
    # (rlhf_overlay.runtime.rank_report); the first run folder of a job holds them all.
    if os.environ.get("RANK_REPORT", "0") == "1" and not os.environ.get("RLHF_OVERLAY_RANK_REPORT"):
        os.environ["RLHF_OVERLAY_RANK_REPORT"] = str(run_dir / "ranks")
    return run_dir


def _prepare_run_dir(kind: str, output: str | os.PathLike | None, overwrite: bool,
                     runs_root: Path | None) -> Path:
    """Return a folder for this run, creating it.

    With no `output`, a new `runs/<kind>-<YYYYmmdd-HHMMSS>` folder (suffixed -2, -3... if taken).
    An existing non-empty `output` is refused unless `overwrite` is set, so a previous model is never
    silently replaced.
    """
    if output:
        run_dir = Path(output).expanduser().resolve()
        if run_dir.exists() and not run_dir.is_dir():
            raise RunDirError(f"OUTPUT={run_dir} exists and is a file, not a folder; pass another OUTPUT")
        held_before = run_dir in _HELD
        if (run_dir / RUN_LOCK).exists():
            lock_run_dir(run_dir)  # a folder a live run writes into is refused, even with OVERWRITE
        if run_dir.is_dir() and any(p.name != RUN_LOCK for p in run_dir.iterdir()) and not overwrite:
            if not held_before:
                unlock_run_dir(run_dir)
            raise RunDirError(
                f"OUTPUT={run_dir} is not empty ({_holds(run_dir)}). Choose a new OUTPUT, leave OUTPUT "
                f"unset for a fresh folder under runs/, or pass OVERWRITE=1 (--overwrite) to start over there (the old "
                f"contents are moved to a backup folder next to it).")
        if overwrite and run_dir.is_dir() and any(p.name != ".run.lock" for p in run_dir.iterdir()):
            move_aside(run_dir)  # a run folder belongs to one run: nothing of the old one mixes into the new one
        run_dir.mkdir(parents=True, exist_ok=True)
        lock_run_dir(run_dir)
        return run_dir
    root = Path(runs_root) if runs_root else RUNS_DIR
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = root / f"{kind}-{stamp}"
    candidate, n = base, 1
    while True:
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            lock_run_dir(candidate)
            return candidate
        except FileExistsError:
            n += 1
            candidate = base.with_name(f"{base.name}-{n}")


def _holds(run_dir: Path) -> str:
    from rlhf_overlay.runtime.status import incomplete_reason
    return incomplete_reason(run_dir) or "it holds an earlier run"


def move_aside(run_dir: Path) -> Path:
    """OVERWRITE=1: move the folder's old contents to `<folder>.replaced-<time>` next to it (a rename, nothing is
    copied or deleted), say where, and leave `run_dir` absent for the new run."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    backup, n = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}"), 1
    while backup.exists():
        n += 1
        backup = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}-{n}")
    os.replace(run_dir, backup)
    print(f"OVERWRITE=1: the previous contents of {run_dir} were moved to {backup} (delete it when not needed)",
          file=sys.stderr, flush=True)
    return backup


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def record_invocation(run_dir: Path, argv: Sequence[str], config: Mapping, cwd: str | None = None) -> None:
    """Write `command.txt` (paste-able, with the working folder) and `config.json` (the resolved settings)."""
    run_dir = Path(run_dir)
    command = "cd " + shlex.quote(cwd or os.getcwd()) + " && " + shlex.join([str(a) for a in argv])
    _atomic_write_text(run_dir / "command.txt", command + "\n")
    _atomic_write_text(run_dir / "config.json", json.dumps(dict(config), indent=2, sort_keys=True, default=str) + "\n")


def has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # torch missing or broken: treat as CPU, the caller fails later with a real error
        return False


def gpu_count() -> int:
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def rank_count_problem(num: int | None, cuda: bool, gpus: int | None = None, what: str = "NUM_GPUS") -> str | None:
    """Why `num` ranks per node cannot run here (None when they can). On a GPU machine each rank needs its own
    GPU, so more ranks than visible GPUs would fail late, inside the launcher or at the first collective. On a
    CPU machine ranks are processes: more than the cores only share them (allowed)."""
    if num is None:
        return None
    if num < 1:
        return f"{what}={num}: ranks per node must be >= 1"
    if cuda:
        gpus = gpu_count() if gpus is None else gpus
        if num > gpus:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            return (f"{what}={num}: this machine has {gpus} visible GPU(s)"
                    f"{f' (CUDA_VISIBLE_DEVICES={visible})' if visible is not None else ''}; use {what}<={gpus}, "
                    f"or a HOSTFILE to spread the ranks over several nodes")
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (the OS picks it), for a launcher's rendezvous; "" = on every interface."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def runtime_env(base: Mapping[str, str] | None = None, offline: bool = True, cpu: bool | None = None) -> dict:
    """Environment for training subprocesses.

    - caches stay in the user cache folder, not scattered (TORCH_EXTENSIONS_DIR holds DeepSpeed's
      JIT-built CPU Adam, ~80 s to build once);
    - offline (HF_HUB_OFFLINE=1) for the embedded tiny runs, so nothing tries the hub;
    - on CPU: DS_ACCELERATOR=cpu, and OMP_NUM_THREADS=1 unless the user set it — on 2-core machines one
      thread per rank made tiny-model steps ~100x faster than the default oversubscription.
    """
    env = dict(os.environ if base is None else base)
    cache = cache_dir()
    env.setdefault("TORCH_EXTENSIONS_DIR", str(cache / "torch_extensions"))
    env.setdefault("HF_HOME", str(cache / "hf"))
    if offline:
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cpu is None:
        cpu = not has_cuda()
    # RLHF_DIST_TIMEOUT (300 s CPU / 1800 s GPU) for rendezvous and collectives; DEEPSPEED_TIMEOUT (minutes) from it
    from rlhf_overlay.runtime.waits import dist_env
    dist_env(env, cuda=not cpu)
    if cpu:
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("CUDA_VISIBLE_DEVICES", "")
    # Our package must be importable in upstream scripts launched from their own folders.
    from rlhf_overlay import PROJECT_ROOT
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(PROJECT_ROOT), env.get("PYTHONPATH", "")] if p)
    return env


def run_logged(cmd: Sequence[str], run_dir: Path, env: Mapping[str, str] | None = None,
               cwd: str | os.PathLike | None = None, log_name: str = "training.log", on_sigterm=None) -> int:
    """Run `cmd`, streaming its output to the terminal and appending it to `run_dir/log_name`. A SIGTERM to this
    process is passed to the job: `on_sigterm(proc)` when given (a launcher that does not forward it), else to cmd.

    Output is passed through line by line (progress bars that use \\r pass through as they come), so a
    long run shows progress live and the log holds the same text. Returns the exit code.
    """
    log_path = Path(run_dir) / log_name
    from rlhf_overlay.runtime.shm import sweep
    sweep()  # what killed runs left in /dev/shm (RAM) before this one adds its own
    with open(log_path, "ab") as log:
        header = f"$ (cd {cwd or os.getcwd()} && {shlex.join([str(c) for c in cmd])})\n".encode()
        log.write(header)
        log.flush()
        # the launcher shares the run folder's kernel lock: it stays held while the job runs, even if this process
        # is killed first
        held = _HELD.get(Path(run_dir).resolve())
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=dict(env) if env else None,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0,
                                pass_fds=(held[0].fileno(),) if held else ())
        assert proc.stdout is not None

        def pump():
            while True:
                chunk = proc.stdout.read1(65536) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096)
                if not chunk:
                    break
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
                log.write(chunk)
                log.flush()

        # SIGTERM (a scheduler's warning) reaches the job, which checkpoints at its next step boundary and stops
        # (rlhf_overlay.runtime.checkpoints.StopRequest); this process keeps logging until the job has ended.
        import signal
        import threading
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, lambda signum, frame: (on_sigterm or (
                lambda p: p.send_signal(signal.SIGTERM)))(proc))
        try:
            pump()
        except KeyboardInterrupt:
            proc.terminate()   # the same stop request; wait for the job to save and end (Ctrl-C again: stop waiting)
            pump()
            proc.wait()
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        rc = proc.wait()
    from rlhf_overlay.runtime.shm import sweep
    sweep()  # DeepSpeed's CPU comm leaves 69 MB of /dev/shm per rank behind (rlhf_overlay/runtime/shm.py)
    return rc
