"""Checkpoints and resume for trlx PPO (trlx's resume PR #482 was never merged; trlx only saves, at fixed iteration
counts, and its learn() always starts at iteration 0).

`learn(trainer, ctl)` is trlx's AccelerateRLTrainer.learn loop (same order of operations, so a run with it trains
exactly as trlx does) with a step boundary after each PPO step's updates, before the next rollouts: there the run
writes a checkpoint when due (or when SIGINT/SIGTERM asked it to stop) and stops on request. A resumed run loads the
checkpoint and continues with that step's rollouts, so from there it repeats the uninterrupted run operation for
operation. A checkpoint = trlx's own `trainer.save` (accelerate `save_state`: weights incl. value head and reference
head, optimizer, scheduler, ZeRO shards with DeepSpeed, python/numpy/torch RNG of every process) + the state trlx
keeps outside it, written by the main process into trainer_state.json / trainer_state.pt: iteration and
minibatch counters, the KL controller's coefficient, trlx's running reward moments, the prompt position (epoch and
batch of `EpochPrompts`), the overlay's own state (reward normalisation, per-step metrics) and the tensorboard step.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import torch

from rlhf_overlay.runtime import checkpoints as ck
from rlhf_overlay.runtime import status
class EpochSampler(torch.utils.data.Sampler):
    """Shuffles with its own generator seeded by (seed, epoch): the order of any epoch can be recreated without the
    global RNG (trlx's RandomSampler draws its seed from the global torch RNG whenever an epoch starts)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self):
        return self.n


class EpochPrompts:
    """An endless prompt iterator (trlx's infinite_dataloader) whose position is (epoch, batch) and can be restored."""

    def __init__(self, loader, sampler: EpochSampler):
        self.loader, self.sampler = loader, sampler
        self.epoch, self.index = 0, 0
        self._it = None

    def state(self) -> dict:
        return {"epoch": self.epoch, "batch": self.index, "seed": self.sampler.seed}

    def restore(self, st: dict) -> None:
        self.epoch, self.index, self._it = int(st["epoch"]), int(st["batch"]), None

    def _start(self):
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(self.epoch)
        else:
            self.sampler.set_epoch(self.epoch)
        self._it = iter(self.loader)
        for _ in range(self.index):  # a restored position: skip the batches this epoch already gave
            next(self._it)

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            if self._it is None:
                self._start()
            try:
                batch = next(self._it)
            except StopIteration:
                self.epoch, self.index, self._it = self.epoch + 1, 0, None
                continue
            self.index += 1
            return batch


def epoch_prompts(trainer, pipeline, seed: int) -> EpochPrompts:
    sampler = EpochSampler(len(pipeline), seed)
    loader = pipeline.create_loader(trainer.config.method.chunk_size, sampler=sampler)
    # a private generator: starting an epoch's iterator draws a base seed from it, not from the global torch RNG
    # (which would then depend on when the iterator was last restarted, e.g. at a resume)
    loader.generator = torch.Generator().manual_seed(seed)
    return EpochPrompts(trainer.accelerator.prepare_data_loader(loader), sampler)


class Control:
    """What learn() needs besides the trainer: where, when, the stop request, and the overlay's own state.
    `get_extra()` / `set_extra(d)` save and restore the overlay's state (main process); `close_step()` finishes the
    step's reporting before a checkpoint; `reopen_scalars(step)` restarts tensorboard writers at a step."""

    def __init__(self, run_dir: Path, schedule: ck.Schedule, stop: ck.StopRequest, resume_from: Path | None,
                 total_steps: int, settings: dict, get_extra=None, set_extra=None, close_step=None,
                 reopen_scalars=None, check_health=None):
        self.run_dir, self.schedule, self.stop, self.resume_from = Path(run_dir), schedule, stop, resume_from
        self.total_steps, self.settings = total_steps, settings
        self.get_extra = get_extra or (lambda: {})
        self.set_extra = set_extra or (lambda d: None)
        self.close_step = close_step or (lambda: None)
        self.reopen_scalars = reopen_scalars or (lambda step: None)
        self.check_health = check_health or (lambda nonfinite_grads: None)  # -> reason to stop, or None
        self.checkpoint_seconds: list[float] = []


def _kl_value(trainer):
    return trainer.kl_ctl.value


def save(trainer, ctl: Control, step: int) -> Path | None:
    """Write checkpoint `step` (every process takes part; the main process renames it into place)."""
    acc = trainer.accelerator
    main = acc.is_main_process
    tmp = ck.tmp_dir(ctl.run_dir, step)
    t0 = time.time()
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    trainer.save(str(tmp))  # trlx's save = accelerate save_state (+ DeepSpeed's save_checkpoint under ZeRO)
    acc.wait_for_everyone()
    final = None
    if main:
        rm = trainer.running_moments
        torch.save({"kl_value": _kl_value(trainer),
                    "running_moments": {k: getattr(rm, k) for k in ("mean", "std", "var", "count")},
                    "ref_mean": trainer.ref_mean, "ref_std": getattr(trainer, "ref_std", None),
                    "extra": ctl.get_extra()}, tmp / "trainer_state.pt")
        ck.write_state(tmp, {"step": step, "iter_count": trainer.iter_count, "mb_count": trainer.mb_count,
                             "nth_evaluation": trainer.nth_evaluation, "prompts": trainer.epoch_prompts.state(),
                             "tensorboard_step": {"ppo": step, "trlx": trainer.iter_count},
                             "world_size": acc.num_processes, "settings": ctl.settings, "time": time.time()})
        final = ck.commit(ctl.run_dir, step, ctl.schedule.keep)
        dt = time.time() - t0
        ctl.checkpoint_seconds.append(dt)
        status.write_status(ctl.run_dir, state="running", last_step=step, checkpoint=str(final))
        print(f"checkpoint: step {step} -> {final} ({dt:.1f} s)", flush=True)
    acc.wait_for_everyone()
    ctl.schedule.saved()
    return final


def load(trainer, ctl: Control) -> int:
    """Restore checkpoint `ctl.resume_from` into the trainer (every process); returns its step."""
    folder = ctl.resume_from
    st = ck.read_state(folder)
    trainer.load(str(folder))  # accelerate load_state: weights, optimizer, scheduler, RNG of this process
    extra = torch.load(folder / "trainer_state.pt", weights_only=False)
    trainer.iter_count, trainer.mb_count = int(st["iter_count"]), int(st["mb_count"])
    trainer.nth_evaluation = int(st["nth_evaluation"])
    trainer.kl_ctl.value = extra["kl_value"]
    for k, v in extra["running_moments"].items():
        setattr(trainer.running_moments, k, v)
    trainer.ref_mean, trainer.ref_std = extra["ref_mean"], extra["ref_std"]
    trainer.epoch_prompts.restore(st["prompts"])
    ctl.set_extra(extra["extra"])
    ctl.reopen_scalars(st["tensorboard_step"])
    return int(st["step"])


def _reopen_trlx_tracker(trainer, iter_count: int) -> None:
    """trlx's tensorboard tracker continues after `iter_count`: points a killed run logged past its checkpoint are
    purged (SummaryWriter purge_step), so no step has two points."""
    from torch.utils.tensorboard import SummaryWriter

    for tracker in getattr(trainer.accelerator, "trackers", []):
        if getattr(tracker, "name", "") == "tensorboard" and hasattr(tracker, "writer"):
            tracker.writer.close()
            tracker.writer = SummaryWriter(tracker.logging_dir, purge_step=iter_count + 1)


def learn(trainer, ctl: Control):
    """trlx's learn loop (accelerate_base_trainer.AccelerateRLTrainer.learn, without ray, save_best and trlx's
    fixed-interval checkpoints) with checkpoints, resume and stop requests at PPO step boundaries."""
    from trlx.pipeline import MiniBatchIterator

    t = trainer
    t.iter_count, t.nth_evaluation = 0, 0
    start = 0
    results = None
    if ctl.resume_from is not None:
        eval_dataloader = t.eval_pipeline.create_loader(t.config.method.chunk_size)
        t.eval_dataloader = t.accelerator.prepare_data_loader(eval_dataloader)
        start = load(t, ctl)
        if t.accelerator.is_main_process:
            _reopen_trlx_tracker(t, t.iter_count)
        msg = f"resumed from step {start} ({ctl.resume_from})"
        print(msg, flush=True)
        t.n_inner_epochs = t.config.method.ppo_epochs
        t.model.eval()  # as after any update (trlx's loop leaves the model in eval mode); a fresh wrapper is not
        t.make_experience(t.config.method.num_rollouts, t.iter_count)  # = post_epoch_callback of step `start`
        t.train_dataloader = t.create_train_dataloader()
        t.total_steps = min(t.config.train.epochs * t.n_inner_epochs * len(t.train_dataloader),
                            t.config.train.total_steps)
    else:
        t.prepare_learning()
        results = t.evaluate()
        t.accelerator.log(results, step=t.iter_count)

    for ppo_step in range(start + 1, t.config.train.epochs + 1):
        for _ in range(t.n_inner_epochs):
            train_dataloader = t.create_train_dataloader()
            for minibatch in MiniBatchIterator(train_dataloader, t.mb_size, t.num_mb):
                forward_time = backward_time = 0.0
                stats_accum = []
                for microbatch in minibatch:
                    with t._accumulate():
                        forward_time -= time.time()
                        loss, stats = t.loss(microbatch)
                        forward_time += time.time()
                        backward_time -= time.time()
                        t.model.train()
                        t.accelerator.backward(loss)
                        t.model.eval()
                        backward_time += time.time()
                        stats_accum.append(stats)
                t.nonfinite_grads = getattr(t, "nonfinite_grads", 0) + _nonfinite_grads(t.model)
                forward_time /= t.num_mb
                backward_time /= t.num_mb
                stats = {key: sum([s[key] for s in stats_accum]) / t.num_mb for key in stats_accum[0]}
                t.opt.step()
                t.opt.zero_grad()
                t.scheduler.step()
                t.iter_count += 1
                stats["time/forward"] = forward_time
                stats["time/backward"] = backward_time
                for group_number, lr in enumerate(t.scheduler.get_last_lr()):
                    stats[f"learning_rate_group_{group_number}"] = lr
                if t.iter_count % t.config.train.eval_interval == 0 or t.iter_count >= t.total_steps:
                    results = t.evaluate()
                    stats.update(results)
                t.accelerator.log(stats, step=t.iter_count)
                if t.iter_count >= t.total_steps:
                    return results
            t.post_backward_callback()
        step_boundary(t, ctl, ppo_step)
        t.post_epoch_callback()
    return results


def _nonfinite_grads(model) -> int:
    """Parameters whose gradient holds NaN/inf (a health signal; 0 under DeepSpeed, whose engine keeps the
    gradients in its own partitions and skips non-finite steps itself)."""
    return sum(1 for p in model.parameters() if p.grad is not None and not bool(torch.isfinite(p.grad).all()))


def _health(trainer, ctl: Control) -> str | None:
    reason = ctl.check_health(getattr(trainer, "nonfinite_grads", 0))
    trainer.nonfinite_grads = 0
    return reason


def _stop_unhealthy(trainer, ctl: Control, step: int, reason: str | None) -> None:
    if trainer.accelerator.is_main_process:
        st = status.write_status(ctl.run_dir, state="failed", reason=reason or "a health guard tripped on another rank")
        print(f"stopped: {st['reason']} (ON_UNHEALTHY=stop; --on-unhealthy warn only warns); newest checkpoint "
              f"{st.get('checkpoint')}", flush=True)
    trainer.accelerator.wait_for_everyone()
    sys.stdout.flush()
    raise SystemExit(3)


def final_health(trainer, ctl: Control) -> bool:
    """The guards on the last step (it has no step boundary); False = stop (ON_UNHEALTHY=stop), nothing exported."""
    reason = _health(trainer, ctl)
    (unhealthy,) = ck.agree([reason is not None], device=trainer.accelerator.device)
    if unhealthy:
        if trainer.accelerator.is_main_process:
            status.write_status(ctl.run_dir, state="failed", reason=reason or "a health guard tripped on another rank")
            print(f"stopped: {reason} (ON_UNHEALTHY=stop); the policy is not exported", flush=True)
        return False
    return True


def step_boundary(trainer, ctl: Control, step: int) -> None:
    """End of PPO step `step`: report it, run the health guards, checkpoint when due, asked to stop or unhealthy,
    and stop when asked or unhealthy (every rank)."""
    ctl.close_step()
    reason = _health(trainer, ctl)
    device = trainer.accelerator.device
    due, stop, unhealthy = ck.agree([ctl.schedule.due(step), ctl.stop.signal is not None, reason is not None],
                                    device=device)
    if due or stop or unhealthy:
        save(trainer, ctl, step)
    if unhealthy:
        _stop_unhealthy(trainer, ctl, step, reason)
    if stop:
        main = trainer.accelerator.is_main_process
        sig = ctl.stop.signal or "a signal on another rank"
        if main:
            st = status.write_status(ctl.run_dir, state="interrupted", last_step=step,
                                     reason=f"stopped by {sig} after step {step}")
            print(f"interrupted by {sig} after step {step}/{ctl.total_steps}; checkpoint {st.get('checkpoint')}\n"
                  f"resume with: {st.get('resume_command')}", flush=True)
        trainer.accelerator.wait_for_everyone()
        sys.stdout.flush()
        raise SystemExit(ctl.stop.exit_code() if ctl.stop.signal else 143)


def resolve_resume(run_dir: Path) -> Path:
    """The checkpoint a resume of `run_dir` continues from (half-written ones are removed and never used)."""
    from rlhf_overlay.errors import ConfigError

    gone = ck.remove_partial(run_dir)
    if gone:
        print(f"resume: ignored and removed half-written checkpoint(s) {', '.join(gone)}", flush=True)
    newest = ck.newest_checkpoint(run_dir)
    if newest is None:
        raise ConfigError(f"RESUME={run_dir}: no complete checkpoint in {ck.checkpoints_dir(run_dir)} (the run stopped "
                          f"before its first one); start it again with OUTPUT={run_dir} OVERWRITE=1")
    return newest[1]


# ---------------------------------------------------------------------------------------------- RESUME=<run>
# Settings a resume may change; everything else must be the run's (it decides what the checkpoint means).
MAY_CHANGE = {"steps", "checkpoint_every", "checkpoint_minutes", "keep_checkpoints", "summary_window", "rm_device",
              "save_optimizer", "eval_every", "on_unhealthy", "max_kl_per_token", "max_degenerate", "max_undecodable",
              "max_reward_drop"}
_IGNORED = {"resume", "output", "overwrite"}
MAKE_NAMES = {"model": "MODEL", "data": "DATA", "rm": "RM", "reward": "REWARD", "zero_stage": "ZERO_STAGE",
              "num_processes": "NUM_GPUS", "hostfile": "HOSTFILE", "arch": "the make target",
              "steps": "--steps", "checkpoint_every": "CHECKPOINT_EVERY", "checkpoint_minutes": "CHECKPOINT_MINUTES",
              "keep_checkpoints": "KEEP_CHECKPOINTS", "on_unhealthy": "ON_UNHEALTHY"}


def resume_config(cfg, given, cls, key: str = "ppo", what: str = "a trlx PPO run", may_change=None):
    """For RESUME=<run>: the run's own settings (config.json[key]) with the settings `given` now (names set by a flag
    or --config file: the parser's settings_given); refuses a change that matters, naming the setting. Returns
    (config, run folder, changed settings)."""
    import dataclasses
    import json

    from rlhf_overlay.errors import ConfigError

    run_dir = Path(cfg.resume).expanduser().resolve()
    try:
        resolved = json.loads((run_dir / "config.json").read_text())
        old = resolved[key]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"RESUME={cfg.resume}: not the run folder of {what} (no config.json with its settings in "
                          f"{run_dir})") from None
    from rlhf_overlay.runtime.checkpoints import check_resume_folder
    check_resume_folder(cfg, run_dir)
    fields = dataclasses.fields(cls)
    new = dict(old)
    for name in set(given) & {f.name for f in fields}:
        new[name] = getattr(cfg, name)
    new_cfg = cls(**{k: v for k, v in new.items() if k in {f.name for f in fields}}).resolve()
    old_cmp = {k: v for k, v in old.items() if k not in _IGNORED}
    new_cmp = {k: v for k, v in dataclasses.asdict(new_cfg).items() if k not in _IGNORED and k in old}
    changed = ck.check_resume_settings(old_cmp, new_cmp, MAY_CHANGE if may_change is None else may_change, MAKE_NAMES)
    new_cfg.resume, new_cfg.output, new_cfg.overwrite = str(run_dir), "", False
    return new_cfg, run_dir, changed


def open_resume_dir(run_dir: Path) -> Path:
    """Take the resumed run folder (refused while another process runs in it) and announce it like prepare_run_dir."""
    import os

    from rlhf_overlay.runtime import runs
    lock = getattr(runs, "lock_run_dir", None)  # the run folder's kernel lock, when this tree has it
    if lock is not None:
        try:
            lock(run_dir)
        except runs.RunDirError as e:
            from rlhf_overlay.errors import ConfigError
            raise ConfigError(str(e)) from None
    announce = os.environ.get("RLHF_OVERLAY_RUN_DIRS_FILE")
    if announce:
        with open(announce, "a") as f:
            f.write(f"{run_dir}\n")
    return run_dir


def append_command(run_dir: Path, argv) -> None:
    """command.txt keeps every invocation of the run: the first, then each resume."""
    import datetime as _dt
    import shlex

    path = Path(run_dir) / "command.txt"
    old = path.read_text() if path.is_file() else ""
    line = "cd " + shlex.quote(os.getcwd()) + " && " + shlex.join([str(a) for a in argv])
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    tmp = path.with_name(".command.txt.tmp")
    tmp.write_text(old + f"# resumed {stamp}:\n{line}\n")
    os.replace(tmp, path)
