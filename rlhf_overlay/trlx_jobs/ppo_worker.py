"""The PPO worker: runs in each process that `python -m rlhf_overlay.trlx_jobs.ppo` starts (plain python, or
accelerate launch), reads the run's config.json and trains with trlx.

trlx's AcceleratePPOTrainer, subclassed to report every PPO step (rlhf_overlay.trlx_jobs.ppo_steps), to draw prompts
in an order a resume can recreate, and to checkpoint / resume / stop at PPO step boundaries
(rlhf_overlay.trlx_jobs.checkpoints). The reward (rlhf_overlay.trlx_jobs.ppo_reward) runs on the main process. The
policy is exported as a plain HF model into <run>/policy/ (only when complete); rank 0 writes metrics.json.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from rlhf_overlay.trlx_jobs.common import write_json
from rlhf_overlay.trlx_jobs.ppo import PPORunConfig, load_prompts
from rlhf_overlay.trlx_jobs.ppo_reward import make_reward_fn, rm_device, strip_eos
from rlhf_overlay.trlx_jobs.ppo_steps import AnswerKL, StepRecorder


def build_trl_config(cfg: PPORunConfig, resolved: dict, run_dir: Path, tokenizer_extra: dict):
    from trlx.data.configs import ModelConfig, OptimizerConfig, SchedulerConfig, TokenizerConfig, TrainConfig, TRLConfig
    from trlx.models.modeling_ppo import PPOConfig

    per_round = cfg.optimizer_steps_per_round
    total = cfg.steps * per_round
    return TRLConfig(
        train=TrainConfig(
            seq_length=cfg.seq_length, epochs=cfg.steps + 1, total_steps=total, batch_size=cfg.batch_size,
            checkpoint_interval=(cfg.checkpoint_every * per_round) if cfg.checkpoint_every else total,
            eval_interval=(cfg.eval_every * per_round) if cfg.eval_every else total,
            pipeline="PromptPipeline", trainer="OverlayPPOTrainer", tracker="tensorboard",
            logging_dir=str(run_dir / "tensorboard" / "trlx"), project_name="trlx",
            checkpoint_dir=str(run_dir / "checkpoints"), save_best=False, save_optimizer=cfg.save_optimizer,
            seed=cfg.seed,
        ),
        model=ModelConfig(model_path=resolved["policy_path"], num_layers_unfrozen=cfg.num_layers_unfrozen),
        tokenizer=TokenizerConfig(tokenizer_path=resolved["policy_path"], padding_side="left",
                                  truncation_side="left", tokenizer_extra_configs=tokenizer_extra),
        optimizer=OptimizerConfig(name="adamw", kwargs={"lr": cfg.lr, "betas": [0.9, 0.999], "eps": 1.0e-8,
                                                        "weight_decay": 0.01 if not cfg.tiny else 0.0}),
        scheduler=SchedulerConfig(name="cosine_annealing", kwargs={"T_max": max(1, total), "eta_min": cfg.lr}),
        method=PPOConfig(
            name="PPOConfig", num_rollouts=cfg.rollouts, chunk_size=cfg.chunk_size, ppo_epochs=cfg.ppo_epochs,
            init_kl_coef=cfg.init_kl_coef, target=cfg.kl_target or None, horizon=cfg.kl_horizon, gamma=cfg.gamma,
            lam=cfg.lam, cliprange=cfg.cliprange, cliprange_value=cfg.cliprange_value, vf_coef=cfg.vf_coef,
            scale_reward=None, ref_mean=None, ref_std=None, cliprange_reward=cfg.cliprange_reward,
            gen_kwargs={"max_new_tokens": cfg.max_new_tokens, "do_sample": True, "top_k": cfg.top_k, "top_p": 1.0,
                        "temperature": cfg.temperature},
        ),
    )



def checkpoint_control(run_dir: Path, cfg: PPORunConfig, resolved: dict, recorder, scalars, get_reward_fn, stop):
    """The worker's side of checkpoints (rlhf_overlay.trlx_jobs.checkpoints): when, and what of the overlay's own state
    (per-step metrics, reward normalisation, tensorboard step) goes into a checkpoint and comes back on RESUME."""
    from rlhf_overlay.runtime.checkpoints import Schedule
    from rlhf_overlay.trlx_jobs.checkpoints import Control

    def get_extra():
        if recorder is None:
            return {}
        m = get_reward_fn().moments
        return {"steps": recorder.steps, "moments": [m.n, m.mean, m.m2]}

    def set_extra(d):
        if recorder is None or not d:
            return
        recorder.steps = d["steps"]
        m = get_reward_fn().moments
        m.n, m.mean, m.m2 = d["moments"]
        samples = run_dir / "samples.jsonl"  # lines a killed run wrote after its checkpoint go
        if samples.is_file():
            keep = [ln for ln in samples.read_text().splitlines(True)
                    if ln.strip() and json.loads(ln).get("step", 0) <= len(recorder.steps)]
            tmp = samples.with_name(".samples.jsonl.tmp")
            tmp.write_text("".join(keep))
            os.replace(tmp, samples)

    def reopen_scalars(steps):
        if scalars.writer is not None:  # points logged after the checkpoint by a killed run are purged
            from torch.utils.tensorboard import SummaryWriter

            scalars.writer.close()
            scalars.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=int(steps["ppo"]) + 1)

    from rlhf_overlay.runtime.health import HealthGuard, nonfinite_count

    guard = HealthGuard({k: getattr(cfg, k) for k in ("max_kl_per_token", "max_degenerate", "max_undecodable",
                                                      "max_reward_drop")}, window=cfg.summary_window, log=scalars.log)

    def check_health(nonfinite_grads: int):
        """The health guards on the step just closed (main process): warning lines; the reason when the run must
        stop (ON_UNHEALTHY=stop), else None."""
        if recorder is None or not recorder.steps:
            return None
        if len(guard.history) != len(recorder.steps) - 1:   # a resumed run: the guard continues the run's history
            guard.restore(recorder.steps[:-1])
        step = recorder.steps[-1]
        step["nonfinite"] = (step.get("nonfinite", 0) + nonfinite_grads
                             + nonfinite_count([step.get("policy_loss"), step.get("value_loss")]))
        lines = guard.check(step)
        step["health"] = lines
        for line in lines:
            print(f"[health] WARNING {line}", flush=True)
        return lines[0].split("; likely causes")[0] if lines and cfg.on_unhealthy == "stop" else None

    return Control(run_dir, Schedule(cfg.checkpoint_every, cfg.checkpoint_minutes, cfg.keep_checkpoints), stop,
                   Path(resolved["resume_from"]) if resolved.get("resume_from") else None, cfg.steps,
                   settings={k: resolved.get(k) for k in ("policy_path", "rm_path", "data")},
                   get_extra=get_extra, set_extra=set_extra,
                   close_step=recorder.close_step if recorder is not None else None, reopen_scalars=reopen_scalars,
                   check_health=check_health)



def worker_main(run_dir: Path) -> int:
    """Runs in each process (plain python, or started by accelerate launch)."""
    from rlhf_overlay.trlx_jobs.common import CommonScalars, check_world_size, cpu_deepspeed_backend_fix, import_trlx

    run_dir = Path(run_dir)
    resolved = json.loads((run_dir / "config.json").read_text())
    cfg = PPORunConfig(**resolved["ppo"])
    from rlhf_overlay.runtime.checkpoints import StopRequest
    stop = StopRequest().install()  # SIGINT / SIGTERM: a checkpoint at the next PPO step boundary, then stop
    cpu_deepspeed_backend_fix()
    trlx = import_trlx()
    import transformers
    from transformers import AutoTokenizer
    from trlx.trainer import register_trainer
    from trlx.trainer.accelerate_ppo_trainer import AcceleratePPOTrainer
    from trlx.utils import logging as trlx_logging

    transformers.logging.set_verbosity_error()
    trlx_logging.set_verbosity(trlx_logging.WARNING)
    trlx_logging.disable_progress_bar()
    main_proc = int(os.environ.get("RANK", "0")) == 0

    tok = AutoTokenizer.from_pretrained(resolved["policy_path"])
    tokenizer_extra = {} if tok.pad_token is not None else {"pad_token": tok.eos_token}
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    scalars = CommonScalars(run_dir, enabled=main_proc)
    from rlhf_overlay.runtime.rank_report import RankReport

    rank_report = RankReport("ppo")
    recorder = StepRecorder(run_dir, cfg.steps, scalars, tty=resolved.get("tty", False)) if main_proc else None
    timings = {"eval_seconds": 0.0}
    answer_kl = AnswerKL(tok.pad_token_id)

    from rlhf_overlay.trlx_jobs import checkpoints as trlx_checkpoints
    control = checkpoint_control(run_dir, cfg, resolved, recorder, scalars, lambda: reward_fn, stop)

    @register_trainer
    class OverlayPPOTrainer(AcceleratePPOTrainer):
        """trlx's PPO trainer plus per-step reporting (rewards as scored, KL, losses, timings)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            check_world_size(self.accelerator.num_processes)  # no silent single-process ranks

        def add_prompt_pipeline(self, pipeline):
            super().add_prompt_pipeline(pipeline)
            # prompts in an order recreated from (seed, epoch) at a saved position, so a resume draws what the
            # uninterrupted run would have drawn
            self.epoch_prompts = trlx_checkpoints.epoch_prompts(self, pipeline, cfg.seed)
            self.prompt_iterator = self.epoch_prompts
            if rank_report.enabled:  # RANK_REPORT=1: record the prompts this rank draws (checks the data split)
                prompts = self.prompt_iterator

                def recorded():
                    for batch in prompts:
                        rank_report.add_sample_ids(batch["rank_report_row"])
                        yield batch

                self.prompt_iterator = recorded()

        def make_experience(self, num_rollouts: int = 1024, iter_count: int = 0):
            if recorder is not None:
                recorder.start_rollouts()
            t0 = time.time()
            before = len(self.store.history)
            with answer_kl.recording():
                super().make_experience(num_rollouts, iter_count)
            if recorder is not None:
                recorder.add_answer_kl(*answer_kl.answer_kl(self.store.history[before:]))
                pad = self.tokenizer.pad_token_id
                lengths = [int((el.response_tensor != pad).sum()) for el in self.store.history[before:]]
                recorder.rollouts_done(time.time() - t0, float(self.mean_kl), lengths)

        def evaluate(self):
            t0 = time.time()
            if recorder is not None:
                recorder.phase = "eval"
            try:
                return super().evaluate()
            finally:
                dt = time.time() - t0
                timings["eval_seconds"] += dt
                if recorder is not None:
                    recorder.phase = "rollout"
                    recorder.add_eval_time(dt)

        def learn(self):  # trlx's loop with checkpoints, RESUME and SIGINT/SIGTERM at PPO step boundaries
            return trlx_checkpoints.learn(self, control)

        def loss(self, batch):
            loss, stats = super().loss(batch)
            if recorder is not None:
                recorder.record_losses(stats)
            return loss, stats

    trl_config = build_trl_config(cfg, resolved, run_dir, tokenizer_extra)
    reward_fn = None
    # The reward model lives on the main process only (trlx gathers the samples there to score them).
    import torch

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    policy_device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if main_proc:
        reward_fn = make_reward_fn(cfg, resolved, tok, recorder, rm_device(cfg.rm_device, policy_device))
    else:
        def reward_fn(*a, **k):  # never called off the main process; trlx only needs it to be set
            raise RuntimeError("reward_fn called outside the main process")

    train_rows, eval_rows, _ = load_prompts(resolved["data_arg"])
    eval_rows = eval_rows[: cfg.eval_prompts]
    t0 = time.time()
    # RANK_REPORT=1: each prompt carries its row number (trlx passes extra keys along as metadata)
    row_ids = (lambda i: {"rank_report_row": i}) if rank_report.enabled else (lambda i: {})
    def metric_fn(samples, prompts, outputs, **metadata):  # a fluency column in trlx's eval tables
        from rlhf_overlay.data.synthetic import answer_fluency

        return {"fluency": [answer_fluency(strip_eos(o, tok.eos_token)) for o in outputs]}

    trainer = trlx.train(reward_fn=reward_fn, metric_fn=metric_fn,
                         prompts=[dict(r, **row_ids(i)) for i, r in enumerate(train_rows)],
                         eval_prompts=[dict(r) for r in eval_rows], config=trl_config)
    train_seconds = time.time() - t0
    if recorder is not None:
        recorder.close()
    from rlhf_overlay.trlx_jobs.checkpoints import final_health
    if not final_health(trainer, control):  # the last step tripped a guard with ON_UNHEALTHY=stop: no policy export
        scalars.close()
        return 3
    engine = trainer.model if hasattr(trainer.model, "zero_optimization_stage") else trainer.opt
    rank_report.add_optimizer("policy", engine, model=trainer.model)
    rank_report.write()
    policy_dir = run_dir / "policy"
    from rlhf_overlay.runtime.status import final_folder
    with final_folder(policy_dir, enabled=main_proc) as partial:  # policy/ appears only when complete
        # every rank takes part in save_pretrained (it lists the folder; rank 0 writes): wait until rank 0 cleared an
        # old partial folder, and until no rank still lists it before rank 0 renames it (a 2-rank resume died with
        # FileNotFoundError on rank 1 when rank 0 renamed first)
        trainer.accelerator.wait_for_everyone()
        trainer.save_pretrained(str(partial))
        trainer.accelerator.wait_for_everyone()
    if main_proc:
        steps = recorder.steps
        k = min(cfg.summary_window, max(1, len(steps) // 2))
        first = sum(s["reward_mean"] for s in steps[:k]) / k
        last = sum(s["reward_mean"] for s in steps[-k:]) / k

        def mean(key):
            vals = [s[key] for s in steps if not math.isnan(s[key])]
            return sum(vals) / len(vals) if vals else None

        write_json(run_dir / "metrics.json", {
            "reward_first": first, "reward_last": last, "summary_window": k, "steps": steps,
            "rollout_seconds_mean": mean("rollout_seconds"), "ppo_step_seconds_mean": mean("ppo_step_seconds"),
            "train_seconds": round(train_seconds, 2), "eval_seconds": round(timings["eval_seconds"], 2),
            "policy": str(policy_dir), "reward": cfg.reward, "reward_baseline": resolved["reward_baseline"],
            "checkpoint_seconds": control.checkpoint_seconds, "resumed_from": resolved.get("resume_from"),
        })
    scalars.close()
    return 0
