"""What both trlx launchers (reward_model.run, ppo.run) do around their own work, in the order they do it:

    cfg, resume_dir = take_resume(cfg, argv, given, ...)   # RESUME=<run>: the run's settings, changes named
    refuse_under_launcher(module, how)                     # they start their own launcher
    check_ranks(cfg, cuda, gpu_count)                      # NUM_GPUS / HOSTFILE slots fit this machine
    record_run(run_dir, module, argv, resolved, resume_from)   # command.txt + config.json (a resume appends)
    rc = start_workers(run_dir, kind, module, steps, resumed, what, lambda: run_logged(cmd, run_dir, env=env))
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from rlhf_overlay.errors import ConfigError
from rlhf_overlay.trlx_jobs.common import write_json


def take_resume(cfg, argv: Sequence[str] | None, given: set[str] | None, cls, build_parser: Callable, **kwargs):
    """(config, run folder to continue or None). With RESUME the run's own settings come back, except those `given`
    by a flag or a --config file (default: parsed from argv); a change that matters is refused, naming it."""
    if not cfg.resume:
        return cfg, None
    from rlhf_overlay.trlx_jobs.checkpoints import resume_config

    if given is None:
        given = set(build_parser().parse_args(list(argv if argv is not None else sys.argv[1:])).settings_given)
    cfg, resume_dir, changed = resume_config(cfg, given, cls, **kwargs)
    if changed:
        print(f"resume: changed settings {', '.join(changed)}", flush=True)
    return cfg, resume_dir


def refuse_under_launcher(module: str, how: str) -> None:
    """The entry modules start their own launcher; started by one (LOCAL_RANK set, not our worker), they refuse."""
    if os.environ.get("LOCAL_RANK") is not None and os.environ.get("RLHF_OVERLAY_WORKER") is None:
        raise ConfigError(f"started under a distributed launcher: run `python -m {module}` {how}")


def check_ranks(cfg, cuda: bool, gpu_count: int | None = None) -> None:
    """NUM_GPUS (or, without it, this machine's HOSTFILE slots) must fit the GPUs here; refused before anything."""
    from rlhf_overlay.runtime.runs import rank_count_problem

    problem = rank_count_problem(cfg.num_processes or None, cuda, gpu_count, what="num_processes (NUM_GPUS)")
    if not problem and cfg.hostfile and not cfg.num_processes and Path(cfg.hostfile).is_file():
        from rlhf_overlay.runtime.hostfile import local_slots_problem

        problem = local_slots_problem(cfg.hostfile, cuda, gpu_count)
    if problem:
        raise ConfigError(problem)


def record_run(run_dir: Path, module: str, argv: Sequence[str] | None, resolved: dict, resume_from=None) -> None:
    """command.txt and config.json of a new run; a resumed run appends this command and says where it continues."""
    from rlhf_overlay.runtime.runs import record_invocation
    from rlhf_overlay.trlx_jobs.checkpoints import append_command

    invocation = [sys.executable, "-m", module, *(argv if argv is not None else sys.argv[1:])]
    if resume_from is None:
        record_invocation(run_dir, invocation, resolved)
        return
    resolved["resume_from"] = str(resume_from)
    write_json(run_dir / "config.json", resolved)
    append_command(run_dir, invocation)
    print(f"resuming {run_dir} from {Path(resume_from).name}", flush=True)


def start_workers(run_dir: Path, kind: str, module: str, total_steps: int | None, resumed: bool, what: str,
                  run_workers: Callable[[], int]) -> int:
    """Run the workers under the run's status.json (Ctrl-C still reaches training.log and status.json); a failure
    is one `error:` line naming the log, and the resume command when a checkpoint exists. Returns the exit code."""
    from rlhf_overlay.runtime import status

    status.start(run_dir, kind, module, total_steps, resumed=resumed)
    with status.interrupt_finishes(run_dir):
        rc = run_workers()
    st = status.finish(run_dir, rc)   # completed, or failed / interrupted with the exit code or signal
    if rc != 0:
        print(f"error: {what} {st['state']} ({status.describe_exit(rc)[0]}); see {run_dir / 'training.log'}",
              file=sys.stderr)
        if st.get("checkpoint"):
            print(f"resume with: {st['resume_command']}", file=sys.stderr)
    return rc
