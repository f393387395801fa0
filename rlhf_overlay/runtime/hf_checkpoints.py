"""Checkpoints and resume for the HF-Trainer reward models (rm-bloom, rm-gptj: rlhf_overlay.trlx_jobs.reward_model).

The Trainer's own machinery does the work: `_save_checkpoint` (weights, optimizer, scheduler, DeepSpeed/ZeRO shards,
the RNG states of every rank, trainer_state.json with the step) and `train(resume_from_checkpoint=...)` (which also
skips the batches of the current epoch that were already trained on). What this adds: the checkpoint is written
under a temporary name and renamed to `<run>/checkpoints/step-<N>` once every rank is done (the Trainer writes
`checkpoint-<N>` in place), CHECKPOINT_EVERY / CHECKPOINT_MINUTES / KEEP_CHECKPOINTS, SIGINT/SIGTERM -> checkpoint
at the next optimizer step and stop, status.json, and tensorboard that continues without duplicated points.
"""
from __future__ import annotations

import os
from pathlib import Path

from rlhf_overlay.runtime import checkpoints as ck
from rlhf_overlay.runtime import status
WRITING = ".hf-writing"  # the Trainer's output_dir: its checkpoint-<N> is renamed away once complete


def output_dir(run_dir: Path) -> str:
    return str(ck.checkpoints_dir(run_dir) / WRITING)


def commit(trainer, run_dir: Path, keep: int) -> None:
    """After Trainer._save_checkpoint on every rank: rename checkpoint-<N> into checkpoints/step-<N> (main rank)."""
    acc = trainer.accelerator
    acc.wait_for_everyone()
    step = trainer.state.global_step
    if acc.is_main_process:
        src = Path(output_dir(run_dir)) / f"checkpoint-{step}"
        tmp = ck.tmp_dir(run_dir, step)
        if tmp.exists():
            import shutil
            shutil.rmtree(tmp)
        os.replace(src, tmp)
        final = ck.commit(run_dir, step, keep)
        status.write_status(run_dir, state="running", last_step=step, checkpoint=str(final))
        print(f"checkpoint: step {step} -> {final}", flush=True)
    acc.wait_for_everyone()


def callback(run_dir: Path, schedule: ck.Schedule, stop: ck.StopRequest, resuming: bool, scalars, get_trainer):
    """A TrainerCallback: checkpoint when due or asked to stop (all ranks agree), stop after it, and on a resume
    restart the tensorboard writers after the checkpoint's step (purge_step) so no step has two points."""
    from transformers import TrainerCallback

    class Checkpoints(TrainerCallback):
        stopped_at = None

        def on_train_begin(self, args, state, control, **kw):
            if not (resuming and state.is_world_process_zero):
                return
            from torch.utils.tensorboard import SummaryWriter

            purge = state.global_step + 1
            for cb in get_trainer().callback_handler.callbacks:
                writer = getattr(cb, "tb_writer", None)
                if writer is not None:
                    log_dir = writer.log_dir
                    writer.close()
                    cb.tb_writer = SummaryWriter(log_dir=log_dir, purge_step=purge)
            if scalars.writer is not None:
                scalars.writer.close()
                scalars.writer = SummaryWriter(log_dir=scalars.writer.log_dir, purge_step=purge)

        def on_step_end(self, args, state, control, **kw):
            due, stopping = ck.agree([schedule.due(state.global_step), stop.signal is not None], device=args.device)
            if due or stopping:
                control.should_save = True
            if stopping:
                control.should_training_stop = True
                self.stopped_at = state.global_step
            return control

        def on_save(self, args, state, control, **kw):
            schedule.saved()

    return Checkpoints()


def resume_point(run_dir: Path) -> Path:
    """The checkpoint a resume continues from (half-written ones are removed, never used)."""
    from rlhf_overlay.trlx_jobs.checkpoints import resolve_resume
    return resolve_resume(run_dir)
