"""DeepSpeed-Chat DPO: Direct Preference Optimization of an SFT model (`make dpo-llama2`).

Runs our overlay of DeepSpeed-Chat's step2_dpo_finetuning/main.py with the `deepspeed` launcher. The policy
starts from MODEL; the reference is a frozen copy of MODEL. Data: JSON/JSONL rows {prompt, chosen, rejected}
(a folder with train.jsonl + eval.jsonl, or one file), the same as `make rm-llama2`. One run folder gets
model/ (the tuned policy, LoRA merged: an HF model folder that AutoModelForCausalLM and AutoTokenizer load,
plus eval_results.json with the evaluation before and after training), tensorboard/ (train/ and eval/ loss,
acc, reward_margin, chosen_reward, rejected_reward, eval/policy_acc; dpo/loss, dpo/acc, dpo/reward_margin),
training.log (also shown in the terminal), command.txt (this command) and config.json (resolved settings).

Preference accuracy = share of eval pairs whose chosen answer gets the higher implicit reward
beta * log(pi(answer) / pi_ref(answer)); it is 0 before training by construction (policy = reference, every
margin is exactly 0). policy_acc = share where the policy itself gives the chosen answer the higher log-prob,
the model's own preference, meaningful before training too.

    # CPU, embedded tiny LLaMA + tiny preference data (under a minute of training):
    make dpo-llama2
    python -m rlhf_overlay.dschat_jobs.dpo --output runs/dpo-tiny
    make dpo-llama2 LORA_DIM=8                   # LoRA adapters only (merged into model/ on save)

    # your own SFT model folder and data, on CPU or GPU:
    make dpo-llama2 MODEL=/models/llama2-sft DATA=/data/prefs OUTPUT=runs/my-dpo
    python -m rlhf_overlay.dschat_jobs.dpo --model /models/llama2-sft --data /data/prefs.jsonl --beta 0.2

    # one GPU node, the upstream LLaMA2-7B DPO recipe (training_scripts/llama2/run_llama2_7b.sh: ZeRO-3 +
    # offload, Dahoas/rm-static, 2,4,4 split, lr 9.65e-6, batch 8, seq 512):
    make dpo-llama2 MODEL=meta-llama/Llama-2-7b-hf NUM_GPUS=8
    make dpo-llama2 MODEL=meta-llama/Llama-2-7b-hf LORA_DIM=128     # upstream run_llama2_7b_lora.sh

    # several nodes (DeepSpeed hostfile lines `host slots=8`; OUTPUT on shared storage):
    make dpo-llama2 MODEL=meta-llama/Llama-2-7b-hf HOSTFILE=/job/hostfile NUM_GPUS=8 OUTPUT=/shared/runs/dpo

Anything after `--` goes to main.py unchanged (e.g. `-- --label_smoothing 0.1 --gradient_checkpointing`).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_overlay import settings
from rlhf_overlay.dschat_jobs import tiny_scale
from rlhf_overlay.dschat_jobs.launch import (ConfigError, DSChatConfig, check_common, check_model_folder, cpu_adjust,
                                        health_flags, launch, local_data_files, looks_local, plan_run,
                                        step2_main_py_args, tiny_paths, validate_local_data)
from rlhf_overlay.dschat_jobs import resume as dschat_resume
from rlhf_overlay.errors import main_guard

KIND = "dpo-llama2"
MODULE = "rlhf_overlay.dschat_jobs.dpo"
STEP_FOLDER = "training/step2_dpo_finetuning"


@dataclass
class DPOConfig(DSChatConfig):
    model: str = field(default="", metadata={"help": "SFT model folder or hub id: the policy's start and the frozen "
                                                     "reference (MODEL; empty: the embedded tiny LLaMA)"})
    data: str = field(default="", metadata={"help": "preference data: dataset name, .json/.jsonl file or folder with "
                                                    "train/eval files (DATA; empty: the recipe's)"})
    lora_dim: int | None = field(default=None, metadata={"help": "LoRA rank, 0 = full fine-tuning (LORA_DIM; default: "
                                                                 "the recipe's, 0)"})
    only_optimize_lora: bool | None = field(default=None, metadata={"help": "with LoRA, train only the adapters "
                                                                            "(default: tiny yes, llama2-7b no as "
                                                                            "upstream)"})
    data_split: str = field(default="", metadata={"help": "phase shares a,b,c (default: 0,1,0 for local files, the "
                                                          "recipe's otherwise)"})
    epochs: int | None = field(default=None, metadata={"help": "training epochs (default: the recipe's)"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after N optimizer steps, 0 = all epochs "
                                                                  "(default: the recipe's)"})
    batch_size: int | None = field(default=None, metadata={"help": "per-device train batch size in pairs (default: "
                                                                   "the recipe's)"})
    max_seq_len: int | None = field(default=None, metadata={"help": "prompt + answer tokens (default: the recipe's)"})
    learning_rate: float | None = field(default=None, metadata={"help": "learning rate of the model's weights "
                                                                        "(default: the recipe's)"})
    lora_learning_rate: float | None = field(default=None, metadata={"help": "learning rate of the LoRA adapters "
                                                                             "(default: the recipe's)"})
    beta: float | None = field(default=None, metadata={"help": "DPO temperature: strength of the pull towards the "
                                                               "reference (default: 0.1)"})
    eval_interval: int | None = field(default=None, metadata={"help": "evaluate every N steps, 0 = before training "
                                                                      "and per epoch only (default: the recipe's)"})

    def validate(self) -> None:
        """All checks in one place; each error names the field and the value it got."""
        check_common(self)
        if self.beta is not None and not self.beta > 0:
            raise ConfigError(f"beta={self.beta!r}: must be > 0 (typically 0.1 to 0.5; smaller = further from "
                              f"the reference)")
        if self.model:
            check_model_folder(self.model, "model")
        if self.data:
            local_data_files(self.data)   # the path exists; rows are validated in run(), once


# ---------------------------------------------------------------------------------------------- recipes
# Upstream step2_dpo_finetuning/training_scripts/llama2/run_llama2_7b.sh at the pin (LoRA: _lora.sh adds
# --lora_dim 128 --lora_module_name "layers.", no --only_optimize_lora), with main.py's beta 0.1 and evaluation
# of the whole eval split as upstream.
LLAMA2_7B = dict(data="Dahoas/rm-static", data_split="2,4,4", batch_size=8, eval_batch_size=8, max_seq_len=512,
                 learning_rate=9.65e-6, lora_learning_rate=5e-4, weight_decay=0.1, epochs=1, max_steps=0,
                 num_warmup_steps=0, zero_stage=3, offload=True, gradient_checkpointing=True, lora_dim=0,
                 lora_module_name="layers.", only_optimize_lora=False, beta=0.1, eval_interval=0, eval_iters=0,
                 print_interval=10, checkpoint_every=0, checkpoint_minutes=30.0)
# The embedded tiny LLaMA on CPU: 60 steps of 8 pairs (of 4000), evaluated before training, every 20 steps and
# at the end on all 400 held-out pairs (the tiny data's longest pair is 30 tokens). With LoRA only the adapters
# train, at lr 1e-2 (at upstream's 5e-4 the rank-8 adapters barely moved in 60 steps).
TINY = dict(data="", data_split="0,1,0", batch_size=8, eval_batch_size=16, max_seq_len=48, learning_rate=5e-4,
            lora_learning_rate=1e-2, weight_decay=0.0, epochs=1, max_steps=60, num_warmup_steps=0, zero_stage=0,
            offload=False, gradient_checkpointing=False, lora_dim=0, lora_module_name="layers.",
            only_optimize_lora=True, beta=0.1, eval_interval=20, eval_iters=0, print_interval=10,
            checkpoint_every=20, checkpoint_minutes=30.0)


def resolve(cfg: DPOConfig, cuda: bool) -> dict:
    """The settings this run will use: the recipe, then the user's values, then CPU adjustments."""
    recipe = cfg.recipe or ("llama2-7b" if cfg.model else "tiny")
    r = dict(LLAMA2_7B if recipe == "llama2-7b" else TINY)
    if cfg.recipe_at_tiny_scale:
        recipe, r = tiny_scale.start(KIND, cfg, LLAMA2_7B)
    r["recipe"] = recipe
    for name in ("data", "data_split", "zero_stage", "lora_dim", "only_optimize_lora", "epochs", "max_steps",
                 "batch_size", "max_seq_len", "learning_rate", "lora_learning_rate", "beta", "eval_interval"):
        value = getattr(cfg, name)
        if value not in (None, ""):
            r[name] = value
    if not cfg.data_split and cfg.data and local_data_files(cfg.data) is not None:
        r["data_split"] = "0,1,0"   # the user's own files: all of them train this step (train/eval files split)
    dschat_resume.resolve_schedule(r, cfg)
    r = cpu_adjust(r, cfg, cuda)
    return tiny_scale.finish(KIND, r, cfg, cuda, LLAMA2_7B) if cfg.recipe_at_tiny_scale else r


def main_py_args(r: dict, model: str, data: str, output_dir: Path, data_cache: str,
                 tensorboard_dir: Path) -> list[str]:
    """Arguments of the DPO step's main.py for resolved settings `r`: step 2's with DPO's own."""
    lora_own = ("--lora_learning_rate", str(r["lora_learning_rate"])) + (
        ("--only_optimize_lora",) if r["only_optimize_lora"] else ())
    return step2_main_py_args(r, model, data, output_dir, data_cache, tensorboard_dir, own=("--beta", str(r["beta"])),
                              lora_own=lora_own)


def build_parser():
    return settings.build_parser(DPOConfig, prog=f"python -m {MODULE}",
                                 description="DeepSpeed-Chat DPO on LLaMA2 (make dpo-llama2).", epilog=__doc__)


def config_from_args(ns) -> DPOConfig:
    return settings.config_from_args(DPOConfig, ns)


def run(cfg: DPOConfig, argv_for_record: list[str] | None = None, given: set[str] | None = None) -> int:
    """DPO as `cfg` says; returns the launcher's exit code. Raises ConfigError/RunDirError/PreferenceDataError.
    With cfg.resume, `given` names the settings given now (default: those that differ from the defaults)."""
    from rlhf_overlay.runtime.runs import has_cuda
    cfg, resume_dir = dschat_resume.take_resume(cfg, given, KIND)   # RESUME=<run>: the run's settings
    cfg.validate()
    cuda = has_cuda()
    r = resolve(cfg, cuda)
    model, data = cfg.model, cfg.data or r["data"]
    if not model or not data:
        tiny = tiny_paths()
        model = model or str(tiny["model"])
        data = data or str(tiny["preference"])
    n_rows = validate_local_data(data, need_pairs=True)    # file:line of a bad row, before anything starts
    files = local_data_files(data)
    if files and files["train"] == files["eval"] and not cfg.dry_run:
        from rlhf_overlay.data.preference_data import held_out_note
        print(f"[{KIND}] note: {held_out_note(files['train'], n_rows)}", flush=True)
    from rlhf_overlay.runtime import preflight   # upstream tree, MODEL, DATA, OUTPUT: before anything is created
    checked = preflight.dschat(KIND, cfg, r, [("MODEL", cfg.model, (preflight.CAUSAL_LM,))])
    model, data = preflight.absolute(checked, "MODEL", model), preflight.absolute(checked, "DATA", data)
    plan = plan_run(KIND, cfg, r, STEP_FOLDER, resume_dir=resume_dir)
    model_dir = plan.run_dir / "model"
    partial = plan.run_dir / ".model.partial"   # main.py writes here; renamed to model/ once the run succeeded
    cmd = plan.launcher + ["main.py"] + main_py_args(r, model, data, partial, plan.data_cache,
                                                     plan.run_dir / "tensorboard") + dschat_resume.main_py_flags(
        r, plan.run_dir, plan.resume_from) + health_flags(cfg, r) + list(cfg.extra)
    offline = not any(x and not looks_local(x) for x in (model, data))
    resolved = dict(r, model=model, data=data, data_rows=n_rows, run_dir=str(plan.run_dir),
                    model_dir=str(model_dir), master_port=plan.port, launch_command=cmd, launch_cwd=str(plan.cwd),
                    extra=list(cfg.extra), hf_hub_offline=offline, resume_from=plan.resume_from)
    summary = (f"recipe {r['recipe']}, model {model}, data {data}, dtype {r['dtype']}, ZeRO {r['zero_stage']}, "
               f"LoRA {r['lora_dim']}, beta {r['beta']}")
    rc = launch(KIND, MODULE, cfg, plan, cmd, resolved, argv_for_record, offline, summary)
    if rc == 0 and partial.is_dir():  # model/ appears only when complete (a killed run leaves .model.partial)
        os.replace(partial, model_dir)
    if rc == 0 and not cfg.dry_run:
        results_file = model_dir / "eval_results.json"
        if results_file.is_file():
            res = json.loads(results_file.read_text())
            before, after = res["before"], res["after"]
            print(f"[{KIND}] done: preference accuracy {before['acc']:.3f} -> {after['acc']:.3f} (implicit reward; "
                  f"0 before training by construction), policy's own accuracy {before['policy_acc']:.3f} -> "
                  f"{after['policy_acc']:.3f}, reward margin {after['reward_margin']:.3f} on {after['pairs']} eval "
                  f"pairs; model in {model_dir}", flush=True)
    return rc


@main_guard
def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return run(config_from_args(ns), argv_for_record=[sys.executable, "-m", MODULE, *(sys.argv[1:] if argv is None
                                                                                   else argv)],
               given=set(ns.settings_given))


if __name__ == "__main__":
    sys.exit(main())
