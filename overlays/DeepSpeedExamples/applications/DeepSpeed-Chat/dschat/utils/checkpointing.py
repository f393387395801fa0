# rlhf-overlay: NEW file (not in upstream DeepSpeed-Chat). Resumable checkpoints for the step-2 (reward model, DPO) and
# step-3 (PPO) main.py (patches 0020, 0021, 0023): DeepSpeedExamples #850 asks for a resume after a crash; upstream
# saves only the final model.
"""Resumable checkpoints for DeepSpeed-Chat training loops: `<run>/checkpoints/step-<N>/`, whole or absent.

A checkpoint is DeepSpeed's own `engine.save_checkpoint` of every trained engine (weights, optimizer and LR
scheduler state, ZeRO shards of every rank; one DeepSpeed tag per engine: `model`, or `actor`, `critic` and
`actor_ema`), the RNG states of every rank (`rng-rank<r>.pt`: python, numpy, torch, the accelerator's), a rank's own
loop state if it has one (`state-rank<r>.pt`, e.g. PPO's fallback experience) and, written last by rank 0,
`trainer_state.json`: the step, the data position (epoch and the next batch of every loader; the samplers are
deterministic per epoch), the tensorboard step and the loop's own values (PPO: reward averages, counters). It is written into
`checkpoints/.tmp-step-<N>/` and renamed when complete (rlhf_overlay.runtime.checkpoints), so a folder killed
half-written is never used; the newest --keep_checkpoints stay.

    ckpt = Checkpointer(args)                           # reads the resumed state (if any) before anything is built
    writer = SummaryWriter(path, purge_step=ckpt.purge_step)
    ...deepspeed.initialize...
    state = ckpt.resume({"model": engine})              # loads the engines; {} for a fresh run
    for step, batch in ckpt.batches(train_dataloader, epoch):   # skips what the resumed epoch already trained
        ...train...                                              # (a tuple of loaders: their batches zipped)
        ckpt.step_boundary(total_steps, epoch, step + 1, tensorboard_step, extra)  # save when due / asked to stop

SIGINT / SIGTERM (a scheduler's notice) make every rank write a checkpoint at the next step boundary and stop with
status.json `interrupted` and the resume command. A loop that must stop for a reason of its own (e.g. a health
guard) passes `stop_reason=`: checkpoint, status.json `failed` with that reason, exit 3, on every rank.
"""
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rlhf_overlay.runtime import checkpoints as ck
from rlhf_overlay.runtime import status


def add_arguments(parser):
    group = parser.add_argument_group("resumable checkpoints (rlhf-overlay)")
    group.add_argument("--checkpoint_dir", type=str, default=None,
                       help="the run folder's checkpoints/ folder; resumable checkpoints go to "
                       "<checkpoint_dir>/step-<N> (default: none are written)")
    group.add_argument("--checkpoint_every", type=int, default=0,
                       help="write a checkpoint every N optimizer steps (0: by time only)")
    group.add_argument("--checkpoint_minutes", type=float, default=0.0,
                       help="also write one when this many minutes passed since the last (0: by steps only)")
    group.add_argument("--keep_checkpoints", type=int, default=2,
                       help="complete checkpoints kept, newest first")
    group.add_argument("--resume_from", type=str, default=None,
                       help="a complete checkpoint folder (<run>/checkpoints/step-<N>) to continue from")
    return parser


def _rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _world_size():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def rng_state():
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if acc.device_name() != "cpu":
        state["accelerator"] = acc.get_rng_state()
    return state


def set_rng_state(state):
    from deepspeed.accelerator import get_accelerator
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "accelerator" in state:
        get_accelerator().set_rng_state(state["accelerator"])


_REPLAYED = set()  # C++ Adam instances whose step state was replayed in this process


def replay_adam_steps(engine):
    """Make the C++ state of DeepSpeed's CPU Adam what the uninterrupted run had. It keeps beta1^t and beta2^t and
    updates them by one multiplication per step (csrc/includes/cpu_adam.h, IncrementStep); a fresh instance asked
    for step t computes pow(beta, t) instead, which differs in the last bits of a float, and so would the bias
    correction of every later step (measured: weights 1.5e-8 apart after 40 more steps). Replaying steps 1..t on a
    one-element dummy tensor repeats the multiplications. Concerns FusedAdam on the CPU accelerator (one C++
    instance per process and AdamW mode, shared by all engines) and DeepSpeedCPUAdam (offload); GPU FusedAdam
    recomputes pow() every step and needs nothing. Returns the number of steps replayed."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO / bf16 wrappers hold the torch optimizer
    dummy = [torch.zeros(1) for _ in range(4)]  # grads, params, exp_avg, exp_avg_sq
    if isinstance(opt, DeepSpeedCPUAdam):
        key = ("cpu_adam", opt.opt_id)

        def call(step, group, beta1, beta2):
            opt.ds_opt_adam.adam_update(opt.opt_id, step, 0.0, beta1, beta2, group["eps"], 0.0,
                                        group["bias_correction"], dummy[1], dummy[0], dummy[2], dummy[3])
    elif isinstance(opt, FusedAdam) and get_accelerator().device_name() == "cpu":
        key = ("fused_adam", opt.adam_w_mode)

        def call(step, group, beta1, beta2):
            opt.multi_tensor_adam(2048 * 32, opt._dummy_overflow_buf, [[t] for t in dummy], 0.0, beta1, beta2,
                                  group["eps"], step, opt.adam_w_mode, 1 if group["bias_correction"] else 0, 0.0)
    else:
        return 0
    steps = max((int(st["step"]) for st in opt.state.values() if "step" in st), default=0)
    if key in _REPLAYED or not steps:
        return 0
    _REPLAYED.add(key)
    for step in range(1, steps + 1):  # in the order step() makes its calls: every group at each step
        for group in opt.param_groups:
            if group["params"]:
                call(step, group, *group["betas"])
    return steps


def _fail(message):
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


class Checkpointer:
    """Checkpoints of one training loop; inert (every method a no-op) without --checkpoint_dir."""

    def __init__(self, args):
        self.enabled = bool(args.checkpoint_dir)
        self.state = {}
        self.engines = {}
        self.rank_state = None  # this rank's own loop state of the resumed checkpoint (step_boundary's rank_state)
        self._rng = None
        if not self.enabled:
            if args.resume_from:
                _fail("--resume_from needs --checkpoint_dir (the run folder's checkpoints/ folder)")
            return
        ck_dir = Path(args.checkpoint_dir)
        if ck_dir.name != ck.CHECKPOINTS:
            _fail(f"--checkpoint_dir {ck_dir}: must be a run folder's {ck.CHECKPOINTS}/ folder")
        self.run_dir = ck_dir.parent
        ck.validate_schedule(args.checkpoint_every, args.checkpoint_minutes, args.keep_checkpoints)
        self.schedule = ck.Schedule(args.checkpoint_every, args.checkpoint_minutes, args.keep_checkpoints)
        self.stop = ck.StopRequest().install()
        self.resume_from = Path(args.resume_from) if args.resume_from else None
        if self.resume_from is not None:
            if not (self.resume_from / ck.STATE_FILE).is_file():
                _fail(f"--resume_from {self.resume_from}: not a complete checkpoint (no {ck.STATE_FILE})")
            self.state = ck.read_state(self.resume_from)
            if self.state.get("world_size") != _world_size():
                _fail(f"--resume_from {self.resume_from}: written by {self.state.get('world_size')} ranks, this run "
                      f"has {_world_size()}; ZeRO shards and data positions are per rank, so resume with the same "
                      f"number of ranks (NUM_GPUS / HOSTFILE)")

    @property
    def resumed(self):
        return bool(self.state)

    @property
    def purge_step(self):
        """For SummaryWriter: points a killed run logged after its checkpoint are hidden, so no step has two."""
        return self.state["tensorboard_step"] + 1 if self.state else None

    def resume(self, engines):
        """Remember the engines to checkpoint; on a resume load them (each rank its ZeRO shard) and this rank's RNG
        states (applied when the training data iterator of the resumed epoch exists, see batches()). Returns the
        resumed trainer state ({} for a fresh run)."""
        self.engines = dict(engines)
        if not self.enabled or not self.resumed:
            return {}
        for tag, engine in self.engines.items():
            trained = engine.optimizer is not None  # e.g. PPO's EMA copy has no optimizer
            path, _ = engine.load_checkpoint(str(self.resume_from), tag=tag, load_optimizer_states=trained,
                                             load_lr_scheduler_states=trained)
            if path is None:
                _fail(f"--resume_from {self.resume_from}: DeepSpeed found no checkpoint of {tag!r} there")
            if trained:
                replay_adam_steps(engine)
        self._rng = torch.load(self.resume_from / f"rng-rank{_rank()}.pt", weights_only=False)
        own = self.resume_from / f"state-rank{_rank()}.pt"
        self.rank_state = torch.load(own, weights_only=False) if own.is_file() else None
        if _rank() == 0:
            print(f"resumed from step {self.state['step']} ({self.resume_from})", flush=True)
        return self.state

    @property
    def start_epoch(self):
        return int(self.state.get("epoch", 0))

    def batches(self, loader, epoch):
        """enumerate(loader) — or enumerate(zip(*loader)) for a tuple of loaders, made in that order — starting at the
        resumed batch in the resumed epoch. The resumed RNG states are applied after the epoch's iterators are made
        (making one draws a seed from the torch RNG), so the rest of the run draws exactly what the uninterrupted
        run drew."""
        loaders = loader if isinstance(loader, tuple) else (loader,)
        its = [iter(x) for x in loaders]
        start = int(self.state.get("batch", 0)) if self.resumed and epoch == self.start_epoch else 0
        for _ in range(start):
            for it in its:
                next(it)
        if self._rng is not None:
            set_rng_state(self._rng)
            self._rng = None
        return enumerate(zip(*its) if isinstance(loader, tuple) else its[0], start)

    def step_boundary(self, step, epoch, next_batch, tensorboard_step, extra=None, rank_state=None,
                      stop_reason=None):
        """After step `step`; training continues at batch `next_batch` of `epoch`. Writes a checkpoint when due, when
        a signal asked to stop, or when `stop_reason` is given (every rank takes part; `extra` goes into
        trainer_state.json, this rank's `rank_state` into state-rank<r>.pt), then stops if asked: interrupted (a
        signal) or failed with `stop_reason` (exit 3; the caller passes the same reason on every rank)."""
        if not self.enabled:
            return
        due, stop, failed = ck.agree([self.schedule.due(step), self.stop.signal is not None, stop_reason is not None],
                                     device=self._device())
        if due or stop or failed:
            self.save(step, {"epoch": epoch, "batch": next_batch, "tensorboard_step": tensorboard_step,
                             "extra": extra or {}}, rank_state)
        if failed:
            reason = stop_reason or "stopped by another rank"
            if _rank() == 0:
                st = status.write_status(self.run_dir, state="failed", last_step=step, reason=reason)
                print(f"stopped after step {step}: {reason}; checkpoint {st.get('checkpoint')}\n"
                      f"resume with: {st.get('resume_command')}", flush=True)
            _barrier()
            sys.stdout.flush()
            raise SystemExit(3)
        if stop:
            sig = self.stop.signal or "a signal on another rank"
            if _rank() == 0:
                st = status.write_status(self.run_dir, state="interrupted", last_step=step,
                                         reason=f"stopped by {sig} after step {step}")
                print(f"interrupted by {sig} after step {step}; checkpoint {st.get('checkpoint')}\n"
                      f"resume with: {st.get('resume_command')}", flush=True)
            _barrier()
            sys.stdout.flush()
            raise SystemExit(self.stop.exit_code() if self.stop.signal else 143)

    def _device(self):
        from deepspeed.accelerator import get_accelerator
        name = get_accelerator().device_name()
        return torch.device(name, get_accelerator().current_device()) if name != "cpu" else torch.device("cpu")

    def save(self, step, position, rank_state=None):
        t0 = time.time()
        rank = _rank()
        tmp = ck.tmp_dir(self.run_dir, step)
        if rank == 0:
            if tmp.exists():
                import shutil
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        for tag, engine in self.engines.items():
            engine.save_checkpoint(str(tmp), tag=tag, save_latest=False)
        torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
        if rank_state is not None:
            torch.save(rank_state, tmp / f"state-rank{rank}.pt")
        _barrier()
        if rank == 0:
            ck.write_state(tmp, dict(position, step=step, world_size=_world_size(), engines=sorted(self.engines),
                                     time=time.time()))
            final = ck.commit(self.run_dir, step, self.schedule.keep)
            status.write_status(self.run_dir, state="running", last_step=step, checkpoint=str(final))
            print(f"checkpoint: step {step} -> {final} ({time.time() - t0:.3f} s)", flush=True)
        _barrier()
        self.schedule.saved()
