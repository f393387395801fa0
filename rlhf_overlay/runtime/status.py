"""`<run>/status.json`: what state a run folder is in, so a killed run can be told apart from a finished one.

    {"state": "running" | "completed" | "failed" | "interrupted",
     "target": "ppo-bloom", "last_step": 20, "total_steps": 40,
     "checkpoint": "<run>/checkpoints/step-20" | null,     newest complete checkpoint
     "resume_command": "make ppo-bloom RESUME=<run>",      the exact command that continues the run
     "exit_code": 1, "signal": "SIGTERM", "reason": "...", "updated": "2026-11-29T12:00:00"}

Written atomically (temporary file + rename) by the launching process (running at start, completed / failed with
the exit code or signal at the end) and by the training workers (each checkpoint, an interruption, a health stop).
A folder whose status is not `completed` is incomplete: a new run into it is refused unless OVERWRITE=1.
`final_folder()` gives the model folders the same property: they appear only once completely written.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import signal
from pathlib import Path

STATUS = "status.json"
STATES = ("running", "completed", "failed", "interrupted")
# make targets whose run folders resume with `make <target> RESUME=<run>`
MAKE_TARGETS = ("ppo-smoke-test", "ppo-bloom", "ppo-gptj", "rm-bloom", "rm-gptj", "rm-llama2", "ppo-llama2",
                "dpo-llama2")


def read_status(run_dir: Path) -> dict | None:
    """The run's status, or None when the folder has none (a run from before status.json, or not a run)."""
    try:
        data = json.loads((Path(run_dir) / STATUS).read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"state": "unknown", "reason": f"{STATUS} is not valid JSON"}
    return data if isinstance(data, dict) else {"state": "unknown", "reason": f"{STATUS} is not an object"}


def write_status(run_dir: Path, **fields) -> dict:
    """Update fields of status.json (read, merge, write a temporary file, rename) and return the new status."""
    path = Path(run_dir) / STATUS
    data = read_status(run_dir) or {}
    if data.get("state") == "unknown":
        data = {}
    data.update(fields)
    if data.get("state") not in STATES:
        raise ValueError(f"status state {data.get('state')!r} is not one of {STATES}")
    data["updated"] = _dt.datetime.now().isoformat(timespec="seconds")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return data


def resume_command(target: str, run_dir: Path, module: str | None = None) -> str:
    """The command that continues this run: the make target when there is one, else the entry module."""
    import shlex
    if target in MAKE_TARGETS:
        return f"make {target} RESUME={shlex.quote(str(run_dir))}"
    return f"python -m {module} --resume {shlex.quote(str(run_dir))}"


def describe_exit(rc: int) -> tuple[str, str | None]:
    """(`exit code 1` / `killed by signal SIGKILL`, signal name or None) for a subprocess return code. Launchers
    (torchrun, DeepSpeed) report a killed worker as 128 + signal; plain subprocesses as -signal."""
    sig = None
    if rc < 0:
        sig = -rc
    elif rc > 128 and rc - 128 in {s.value for s in signal.Signals}:
        sig = rc - 128
    if sig is not None:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return (f"killed by signal {name}" if rc < 0 else f"exit code {rc} ({name})"), name
    return f"exit code {rc}", None


def finish(run_dir: Path, rc: int, log_name: str = "training.log") -> dict:
    """After the training process ended: completed (rc 0), interrupted (the workers said so), else failed with the
    exit code / signal, also as the last line of training.log (not only on the terminal)."""
    run_dir = Path(run_dir)
    cur = read_status(run_dir) or {}
    if rc == 0:
        return write_status(run_dir, state="completed", exit_code=0, signal=None)
    text, sig = describe_exit(rc)
    # stopped by Ctrl-C / a scheduler's SIGTERM = interrupted (whether or not a last checkpoint could be written)
    state = "interrupted" if cur.get("state") == "interrupted" or sig in ("SIGINT", "SIGTERM") else "failed"
    if state == "failed" and cur.get("reason") and cur.get("state") == "failed":
        text = f"{text}: {cur['reason']}"       # e.g. a health stop the worker recorded
    status = write_status(run_dir, state=state, exit_code=rc, signal=sig,
                          reason=cur.get("reason") if cur.get("state") in ("failed", "interrupted") else text)
    line = f"run {state}: {text}"
    if status.get("checkpoint") and status.get("resume_command"):
        line += f"; resume from {Path(status['checkpoint']).name} with: {status['resume_command']}"
    with open(run_dir / log_name, "a") as f:
        f.write(f"\n[rlhf-overlay] {line}\n")
    return status


def incomplete_reason(run_dir: Path) -> str | None:
    """Why a run folder holds an incomplete run (None if it holds a completed run, or no run we know of)."""
    st = read_status(run_dir)
    if st is None or st.get("state") == "completed":
        return None
    what = st.get("state", "unknown")
    step = st.get("last_step")
    where = f" at step {step}" if step else ""
    how = (f"resume it with: {st['resume_command']}" if st.get("checkpoint") and st.get("resume_command")
           else "it has no complete checkpoint to resume from")
    return f"it holds an incomplete run ({what}{where}); {how}"


@contextlib.contextmanager
def final_folder(path: Path, enabled: bool = True):
    """Write a final model folder under a temporary name and rename it into place when the block completes, so
    `policy/`, `model/`, `reward_model/`... are either whole or absent. Yields the temporary path. With
    `enabled=False` (ranks other than the writer) yields the temporary path and renames nothing."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    if enabled:
        if tmp.exists():
            shutil.rmtree(tmp)
    yield tmp
    if enabled and tmp.exists():
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)


def start(run_dir: Path, target: str, module: str, total_steps: int | None = None, resumed: bool = False,
          resumable: bool = True) -> dict:
    """Mark a run folder as running (before its training processes start); a resume keeps the checkpoint fields.
    `resumable=False`: a target without resumable checkpoints (no resume command)."""
    fields = dict(state="running", target=target, total_steps=total_steps, pid=os.getpid(), exit_code=None,
                  signal=None, reason=None,
                  resume_command=resume_command(target, Path(run_dir), module) if resumable else None)
    if not resumed:
        fields.update(last_step=0, checkpoint=None, started=_dt.datetime.now().isoformat(timespec="seconds"))
    return write_status(run_dir, **fields)


@contextlib.contextmanager
def interrupt_finishes(run_dir: Path):
    """Ctrl-C while the training processes run: they stopped at a step boundary (or died); record how it ended in
    training.log and status.json before the KeyboardInterrupt goes on to print its one line."""
    try:
        yield
    except KeyboardInterrupt:
        before = (read_status(run_dir) or {}).get("state")
        st = finish(run_dir, 130)
        if before != "interrupted" and st.get("checkpoint") and st.get("resume_command"):  # the workers did not say it
            print(f"resume with: {st['resume_command']}", flush=True)
        raise
