"""Resumable checkpoints of the DeepSpeed-Chat targets (`make rm-llama2 RESUME=<run>`, CHECKPOINT_EVERY, ...).

The training loop's side lives in the DeepSpeed-Chat tree (dschat/utils/checkpointing.py, DeepSpeedExamples patch
0020): DeepSpeed's save_checkpoint/load_checkpoint of every engine, every rank's RNG states and the data position,
into `<run>/checkpoints/step-<N>/` (temporary folder + rename; rlhf_overlay.runtime.checkpoints). This module is the
launcher's side: the settings, the main.py flags, and what RESUME=<run> means:

- the run's own settings (config.json "requested") with the flags given now; a change that matters (model, data,
  batch size, ranks, ZeRO stage, seed, ...) is refused naming the setting; MAY_CHANGE may change;
- the same frozen models: ppo-llama2 rebuilds its reference and reward models from ACTOR and CRITIC, so a folder
  whose files changed since the run started (size, modification time) is refused;
- the newest complete checkpoint of the run folder (half-written ones are removed and never used);
- the same run folder: command.txt gets this invocation after the first, config.json says where it continued from.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from rlhf_overlay.errors import ConfigError
from rlhf_overlay.runtime.checkpoints import check_resume_folder

# Settings a resume may change; every other one must be the run's (it decides what the checkpoint means).
# max_steps / epochs: the run may be made longer or shorter (the LR schedule then follows the new length).
MAY_CHANGE = {"max_steps", "epochs", "checkpoint_every", "checkpoint_minutes", "keep_checkpoints", "eval_interval",
              "master_port", "dry_run", "on_unhealthy", "max_kl_per_token", "max_degenerate", "max_undecodable",
              "max_reward_drop"}
IGNORED = {"resume", "output", "overwrite", "extra"}
MAKE_NAMES = {"model": "MODEL", "actor": "ACTOR", "critic": "CRITIC", "data": "DATA", "zero_stage": "ZERO_STAGE", "lora_dim": "LORA_DIM",
              "num_gpus": "NUM_GPUS", "hostfile": "HOSTFILE", "checkpoint_every": "CHECKPOINT_EVERY",
              "checkpoint_minutes": "CHECKPOINT_MINUTES", "keep_checkpoints": "KEEP_CHECKPOINTS"}


def resolve_schedule(r: dict, cfg) -> dict:
    """The checkpoint schedule into the resolved settings `r`: the user's values, else the recipe's."""
    for name in ("checkpoint_every", "checkpoint_minutes"):
        value = getattr(cfg, name)
        if value is not None:
            r[name] = value
    r["keep_checkpoints"] = cfg.keep_checkpoints
    from rlhf_overlay.runtime.checkpoints import validate_schedule
    validate_schedule(r["checkpoint_every"], r["checkpoint_minutes"], r["keep_checkpoints"])
    return r


def main_py_flags(r: dict, run_dir: Path, resume_from: str | None) -> list[str]:
    """The checkpoint flags of a step's main.py (dschat/utils/checkpointing.py)."""
    flags = ["--checkpoint_dir", str(Path(run_dir) / "checkpoints"),
             "--checkpoint_every", str(r["checkpoint_every"]), "--checkpoint_minutes", str(r["checkpoint_minutes"]),
             "--keep_checkpoints", str(r["keep_checkpoints"])]
    if resume_from:
        flags += ["--resume_from", str(resume_from)]
    return flags


def given_fields(cfg) -> set[str]:
    """For a config built in Python (no command line): the fields that differ from their defaults."""
    out = set()
    for f in dataclasses.fields(cfg):
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if getattr(cfg, f.name) != default:
            out.add(f.name)
    return out


def resume_config(cfg, given: set[str] | None, kind: str):
    """RESUME=<run>: the run's own settings with the ones given now (`given`: names of the fields set by a flag or
    a --config file; None = those that differ from the defaults). Refuses a change that matters, naming the setting.
    Returns (config, run folder, changed settings)."""
    run_dir = Path(cfg.resume).expanduser().resolve()
    try:
        old = json.loads((run_dir / "config.json").read_text())["requested"]
        assert isinstance(old, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise ConfigError(f"RESUME={cfg.resume}: not the run folder of a `make {kind}` run (no config.json with its "
                          f"settings in {run_dir})") from None
    check_resume_folder(cfg, run_dir)
    given = given_fields(cfg) if given is None else set(given)
    names = {f.name for f in dataclasses.fields(cfg)}
    new = {k: v for k, v in old.items() if k in names}
    for name in given & names:
        new[name] = getattr(cfg, name)
    from rlhf_overlay.runtime.checkpoints import check_resume_settings
    changed = check_resume_settings({k: v for k, v in old.items() if k not in IGNORED},
                                    {k: v for k, v in new.items() if k not in IGNORED and k in old},
                                    MAY_CHANGE, MAKE_NAMES)
    # output "": the run folder is `run_dir` (taken by open_run, not made anew); extra: main.py arguments, the run's
    # unless given now
    new.update(resume=str(run_dir), output="", overwrite=False, extra=list(cfg.extra or old.get("extra") or []))
    return type(cfg)(**new), run_dir, changed


def fingerprints(models: dict[str, str]) -> dict[str, dict]:
    """{name: {file: [size, mtime_ns]}} of the files directly in each local model folder (hub ids: left out)."""
    out = {}
    for name, path in models.items():
        folder = Path(path).expanduser()
        if folder.is_dir():
            out[name] = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.iterdir())
                         if p.is_file()}
    return out


def check_models_unchanged(run_dir: Path, models: dict[str, str]) -> None:
    """Refuse a resume whose model folders are not what the run started with (config.json "model_fingerprints")."""
    try:
        old = json.loads((Path(run_dir) / "config.json").read_text()).get("model_fingerprints") or {}
    except (OSError, ValueError):
        old = {}
    now = fingerprints(models)
    for name, files in old.items():
        if name in models and now.get(name) != files:
            differ = sorted(set(files) ^ set(now.get(name, {})) | {f for f in set(files) & set(now.get(name, {}))
                                                                   if files[f] != now[name][f]})
            raise ConfigError(f"{name}={models[name]}: the model folder changed since the run started ({', '.join(differ)}"
                              f" differ in size or time); a resume rebuilds the frozen models from it, so it must be "
                              f"the same; start a new run to use this one")


def take_resume(cfg, given: set[str] | None, kind: str):
    """The prologue of a job's run(): with cfg.resume, the run's settings (resume_config, a refused change raises) and
    a line naming the settings that changed; returns (config, run folder or None)."""
    if not cfg.resume:
        return cfg, None
    cfg, run_dir, changed = resume_config(cfg, given, kind)
    if changed:
        print(f"[{kind}] resume: changed settings {', '.join(changed)}", flush=True)
    return cfg, run_dir


def open_run(run_dir: Path) -> tuple[Path, str]:
    """Take the resumed run folder (refused while another process runs in it) and find its newest complete
    checkpoint (half-written ones are removed, and so are step-N folders without trainer_state.json). Returns (run
    folder, checkpoint folder)."""
    import shutil

    from rlhf_overlay.runtime import checkpoints as ck
    from rlhf_overlay.trlx_jobs.checkpoints import open_resume_dir, resolve_resume
    open_resume_dir(run_dir)
    newest = resolve_resume(run_dir)
    complete = {p for _, p in ck.complete_checkpoints(run_dir)}
    incomplete = sorted(p for p in ck.checkpoints_dir(run_dir).glob("step-*") if p.is_dir() and p not in complete)
    for p in incomplete:
        shutil.rmtree(p, ignore_errors=True)
    if incomplete:
        print(f"resume: removed incomplete checkpoint folder(s) without {ck.STATE_FILE}: "
              f"{', '.join(p.name for p in incomplete)}", flush=True)
    return run_dir, str(newest)


def record(run_dir: Path, argv: list[str], resolved: dict) -> None:
    """A resume's record: command.txt gets this invocation after the first; config.json the settings it runs with
    and the checkpoint it continued from."""
    from rlhf_overlay.runtime.runs import _atomic_write_text
    from rlhf_overlay.trlx_jobs.checkpoints import append_command
    append_command(run_dir, argv)
    _atomic_write_text(Path(run_dir) / "config.json",
                       json.dumps(dict(resolved), indent=2, sort_keys=True, default=str) + "\n")
