"""The reward-model worker: runs in each training process that `python -m rlhf_overlay.trlx_jobs.reward_model` starts
(plain python, torchrun or DeepSpeed's launcher), reads the run's config.json and trains with the HF Trainer.

Pairs become (chosen, rejected) token ids ending with eos (rlhf_overlay.trlx_jobs.value_head); the loss is
-log sigmoid(r_chosen - r_rejected); eval accuracy = share of pairs whose chosen answer scores higher. Checkpoints,
RESUME and SIGINT/SIGTERM: rlhf_overlay.runtime.hf_checkpoints; NaN/inf guards: rlhf_overlay.runtime.health. Rank 0
writes reward_model/ (only when complete) and metrics.json.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rlhf_overlay.trlx_jobs.common import ConfigError, write_json
from rlhf_overlay.trlx_jobs.reward_model import RewardModelConfig, load_train_eval, resolve_data_files
from rlhf_overlay.trlx_jobs.value_head import (decoder_layers, encode_texts, join_prompt_response, new_reward_model,
                                               pad_batch, save_reward_model)


def _pair_dataset(pairs, tokenizer, cfg: RewardModelConfig):
    from torch.utils.data import Dataset

    chosen = encode_texts(tokenizer, [join_prompt_response(p, c, cfg.separator) for p, c, _ in pairs], cfg.max_length)
    rejected = encode_texts(tokenizer, [join_prompt_response(p, r, cfg.separator) for p, _, r in pairs], cfg.max_length)
    keep = [i for i in range(len(pairs)) if chosen[i] != rejected[i]]  # identical after truncation: no signal

    class PairDataset(Dataset):
        def __len__(self):
            return len(keep)

        def __getitem__(self, i):
            return {"chosen": chosen[keep[i]], "rejected": rejected[keep[i]]}

    return PairDataset(), len(pairs) - len(keep)


def warn_overlong(cfg: RewardModelConfig, tokenizer) -> None:
    """Print one warning per data file whose prompt + answer + eos is longer than max_length (cut on the left)."""
    from rlhf_overlay.data.preference_data import overlong_warning, preference_rows_with_lines

    def texts(r):
        return [(f"prompt + {k}", join_prompt_response(r["prompt"], r[k], cfg.separator)) for k in ("chosen", "rejected")]

    for file in dict.fromkeys(f for f in resolve_data_files(cfg.data, cfg.eval_data) if f is not None):
        w = overlong_warning(file, preference_rows_with_lines(file), texts,
                             lambda ts: [len(ids) for ids in encode_texts(tokenizer, ts, 10 ** 9)], cfg.max_length,
                             "left")
        if w:
            print(w, flush=True)


def _collator(pad_id: int):
    def collate(items):
        c_ids, c_mask = pad_batch([it["chosen"] for it in items], pad_id)
        r_ids, r_mask = pad_batch([it["rejected"] for it in items], pad_id)
        return {"chosen_input_ids": c_ids, "chosen_attention_mask": c_mask,
                "rejected_input_ids": r_ids, "rejected_attention_mask": r_mask}

    return collate


def worker_main(run_dir: Path) -> int:
    """Runs inside each training process (started by `main` through a launcher)."""
    import torch
    import transformers
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from rlhf_overlay.trlx_jobs.common import CommonScalars

    run_dir = Path(run_dir)
    resolved = json.loads((run_dir / "config.json").read_text())
    cfg = RewardModelConfig(**resolved["reward_model"])
    from rlhf_overlay.runtime import checkpoints as ck
    from rlhf_overlay.runtime import hf_checkpoints
    from rlhf_overlay.runtime import status
    stop = ck.StopRequest().install()  # SIGINT / SIGTERM: a checkpoint at the next optimizer step, then stop
    resume_from = resolved.get("resume_from")
    model_path, precision = resolved["model_path"], resolved["precision"]
    ds_config = resolved.get("deepspeed_config")
    cuda = torch.cuda.is_available()
    main_proc = int(os.environ.get("RANK", "0")) == 0
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    from rlhf_overlay.runtime.waits import dist_timeout, roll_call

    timeout = dist_timeout(cuda)  # RLHF_DIST_TIMEOUT: rendezvous and every collective (gloo/NCCL)
    if distributed:
        roll_call(timeout)  # a rank that never arrives is named, instead of a silent wait in the process group
    transformers.set_seed(cfg.seed)
    transformers.logging.set_verbosity_error()

    train_pairs, eval_pairs, _ = load_train_eval(cfg)
    model, tokenizer = new_reward_model(model_path, seed=cfg.seed)
    if cfg.unfrozen_fraction < 1:
        layers = decoder_layers(model.trunk)
        if layers is None:
            raise ConfigError(f"unfrozen_fraction={cfg.unfrozen_fraction}: cannot find the decoder layers of "
                              f"{type(model.trunk).__name__} to freeze; pass --unfrozen-fraction 1")
        n_train = max(1, int(cfg.unfrozen_fraction * len(layers)))
        for layer in layers[: len(layers) - n_train]:
            layer.requires_grad_(False)
    if main_proc:
        warn_overlong(cfg, tokenizer)   # once per file: which line, how many tokens are cut, from which side
    train_ds, dropped_train = _pair_dataset(train_pairs, tokenizer, cfg)
    eval_ds, dropped_eval = _pair_dataset(eval_pairs, tokenizer, cfg)
    if len(train_ds) == 0 or len(eval_ds) == 0:
        raise ConfigError(f"no usable pairs (train {len(train_ds)}, eval {len(eval_ds)}): chosen and rejected are "
                          f"identical after tokenization/truncation to max_length={cfg.max_length}")
    if main_proc and (dropped_train or dropped_eval):
        print(f"note: skipped {dropped_train} train / {dropped_eval} eval pair(s) whose chosen and rejected texts "
              f"are identical after truncation to {cfg.max_length} tokens", flush=True)

    args = TrainingArguments(
        output_dir=hf_checkpoints.output_dir(run_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        logging_steps=cfg.logging_steps,
        logging_dir=str(run_dir / "tensorboard" / "hf"),
        report_to=["tensorboard"],
        eval_strategy="steps" if cfg.eval_steps else "epoch",
        eval_steps=cfg.eval_steps or None,
        save_strategy="no",             # checkpoints: rlhf_overlay.runtime.hf_checkpoints decides when, and names them
        save_safetensors=False,          # the trunk's tied embeddings are shared tensors, which safetensors refuses
        remove_unused_columns=False,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        deepspeed=ds_config,
        # CPU: gloo for torchrun/DeepSpeed process groups (accelerate picks no CPU backend for DeepSpeed)
        ddp_backend="gloo" if not cuda and (distributed or ds_config is not None) else None,
        use_cpu=not cuda and ds_config is None,
        ddp_timeout=timeout,
        seed=cfg.seed,
        dataloader_num_workers=0,
        disable_tqdm=not main_proc,
        label_names=[],
    )

    scalars = CommonScalars(run_dir, enabled=main_proc)
    from rlhf_overlay.runtime.rank_report import RankReport

    rank_report = RankReport("rm")  # RANK_REPORT=1: the pairs this rank trained on and its optimizer state

    checkpoints = hf_checkpoints.callback(run_dir, ck.Schedule(cfg.checkpoint_every, cfg.checkpoint_minutes,
                                                               cfg.keep_checkpoints),
                                          stop, bool(resume_from), scalars, lambda: trainer)
    from rlhf_overlay.runtime.health import hf_callback
    health = hf_callback(cfg.on_unhealthy == "stop", scalars)   # NaN/inf in loss / gradient norm

    class CommonNames(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            scalars.log({"rm/loss": logs.get("loss"), "rm/acc": logs.get("eval_accuracy"),
                         "rm/eval_loss": logs.get("eval_loss")}, state.global_step)

    class RewardTrainer(Trainer):
        def _load_rng_state(self, checkpoint):
            # transformers 4.44 reads the RNG file with torch.load's default, which torch >= 2.6 makes weights_only:
            # the numpy RNG state inside (arrays) is then refused; allow exactly those types
            import numpy as np
            with torch.serialization.safe_globals([np.core.multiarray._reconstruct, np.ndarray, np.dtype,
                                                   type(np.dtype(np.uint32))]):
                return super()._load_rng_state(checkpoint)

        def _save_checkpoint(self, model, trial, metrics=None):
            super()._save_checkpoint(model, trial, metrics=metrics)   # into checkpoints/.hf-writing/checkpoint-N
            hf_checkpoints.commit(self, run_dir, cfg.keep_checkpoints)  # ... renamed to checkpoints/step-N

        def compute_loss(self, model, inputs, return_outputs=False):
            if model.training:
                rank_report.add_samples(inputs["chosen_input_ids"], tokenizer.pad_token_id)
            out = model(**inputs)
            return (out["loss"], out) if return_outputs else out["loss"]

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad():
                out = model(**inputs)
            scores = torch.stack([out["chosen_scores"], out["rejected_scores"]], dim=-1).detach()
            labels = torch.zeros(scores.shape[0], device=scores.device)
            return out["loss"].detach(), scores, labels

    def compute_metrics(p):
        import numpy as np

        s = np.asarray(p.predictions).reshape(-1, 2)
        return {"accuracy": float((s[:, 0] > s[:, 1]).mean()), "margin": float((s[:, 0] - s[:, 1]).mean())}

    trainer = RewardTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                            data_collator=_collator(tokenizer.pad_token_id), compute_metrics=compute_metrics,
                            callbacks=[CommonNames(), checkpoints, health])
    before = None
    if cfg.eval_before == "yes" and not resume_from:  # a resumed run measured it when it started
        before = trainer.evaluate(metric_key_prefix="eval")
        scalars.log({"rm/acc": before["eval_accuracy"], "rm/eval_loss": before["eval_loss"]}, 0)
        if main_proc:
            print(f"eval accuracy before training: {before['eval_accuracy']:.3f} on {len(eval_ds)} pairs", flush=True)
    t0 = time.time()
    if resume_from and main_proc:
        print(f"resumed from step {ck.read_state(Path(resume_from))['global_step']} ({resume_from})", flush=True)
    result = trainer.train(resume_from_checkpoint=resume_from)
    if health.reason is not None:  # ON_UNHEALTHY=stop: checkpoint written, no reward model exported
        if main_proc:
            st = status.write_status(run_dir, state="failed", reason=health.reason)
            print(f"stopped: {health.reason} (ON_UNHEALTHY=stop); newest checkpoint {st.get('checkpoint')}", flush=True)
        scalars.close()
        return 3
    if checkpoints.stopped_at is not None:  # SIGINT / SIGTERM: the checkpoint is written, stop in every rank
        if main_proc:
            st = status.write_status(run_dir, state="interrupted", reason=f"stopped by {stop.signal or 'a signal on another rank'} "
                                     f"after step {checkpoints.stopped_at}")
            print(f"interrupted after step {checkpoints.stopped_at}; checkpoint {st.get('checkpoint')}\n"
                  f"resume with: {st.get('resume_command')}", flush=True)
        scalars.close()
        return stop.exit_code() if stop.signal else 143
    train_seconds = time.time() - t0
    engine = trainer.model_wrapped if hasattr(trainer.model_wrapped, "zero_optimization_stage") else trainer.optimizer
    rank_report.add_optimizer("rm", engine, model=model)
    rank_report.write()
    after = trainer.evaluate(metric_key_prefix="eval")
    if main_proc:
        out_dir = run_dir / "reward_model"
        with status.final_folder(out_dir) as partial:  # reward_model/ appears only when complete
            save_reward_model(model, tokenizer, partial, {
                "base_model": model_path, "arch": cfg.arch, "max_length": cfg.max_length, "separator": cfg.separator,
                "eval_accuracy": after["eval_accuracy"], "score_position": "last non-pad token (eos appended)",
            })
        steps = max(1, result.global_step)
        metrics = {
            "eval_accuracy": after["eval_accuracy"], "eval_margin": after["eval_margin"],
            "eval_loss": after["eval_loss"], "eval_accuracy_before": before["eval_accuracy"] if before else None,
            "chance_accuracy": 0.5, "train_loss": result.training_loss, "train_pairs": len(train_ds),
            "eval_pairs": len(eval_ds), "steps": result.global_step, "train_seconds": round(train_seconds, 2),
            "seconds_per_step": round(train_seconds / steps, 4),
            "pairs_per_step": cfg.batch_size * cfg.grad_accum * int(os.environ.get("WORLD_SIZE", "1")),
            "reward_model": str(out_dir),
        }
        write_json(run_dir / "metrics.json", metrics)
    scalars.close()
    return 0
