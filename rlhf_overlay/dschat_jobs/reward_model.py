"""DeepSpeed-Chat step 2: train a LLaMA2 reward model (`make rm-llama2`).

Runs our step-2 overlay (upstream/DeepSpeedExamples/.../step2_reward_model_finetuning/main.py) with the
`deepspeed` launcher and writes one run folder: model/ (config.json, pytorch_model.bin, tokenizer files: the
DeepSpeed-Chat reward-model layout, which step 3 loads as critic; weights are `rwtransformer.*` + `v_head.weight`),
tensorboard/ (train/loss, eval/acc, eval/reward_score, rm/loss, rm/acc), model/eval_results.json, training.log
(also shown in the terminal), command.txt (this command) and config.json (resolved settings + launch command).

    # CPU, embedded tiny LLaMA + tiny preference data (about a minute):
    make rm-llama2
    python -m rlhf_overlay.dschat_jobs.reward_model --output runs/rm-tiny

    # your own model folder and data (JSON/JSONL rows: prompt, chosen, rejected; a folder with
    # train.jsonl + eval.jsonl, or one file), on CPU or GPU:
    make rm-llama2 MODEL=/models/llama2-sft DATA=/data/prefs OUTPUT=runs/my-rm

    # one GPU node, the upstream LLaMA2-7B recipe (ZeRO-3 + offload, Dahoas/rm-static, 2,4,4 split):
    make rm-llama2 MODEL=meta-llama/Llama-2-7b-hf NUM_GPUS=8
    make rm-llama2 MODEL=meta-llama/Llama-2-7b-hf LORA_DIM=128     # upstream run_llama2_7b_lora.sh

    # several nodes (DeepSpeed hostfile lines `host slots=8`; OUTPUT on shared storage):
    make rm-llama2 MODEL=meta-llama/Llama-2-7b-hf HOSTFILE=/job/hostfile NUM_GPUS=8 OUTPUT=/shared/runs/rm

Anything after `--` goes to main.py unchanged (e.g. `-- --eval_interval 50`).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

# Shared with the other DeepSpeed-Chat entry modules (ppo, dpo); re-exported here for callers and tests.
from rlhf_overlay.dschat_jobs.launch import (DTYPES, RECIPES, ConfigError, DSChatConfig, check_common,  # noqa: F401
                                        check_data_split, check_model_folder, check_upstream, cpu_adjust,
                                        health_flags, step2_main_py_args, free_port, launch, launch_env, launcher_prefix, local_data_files,
                                        looks_local, plan_run, tiny_paths, validate_local_data)
from rlhf_overlay import settings
from rlhf_overlay.dschat_jobs import tiny_scale
from rlhf_overlay.dschat_jobs import resume as dschat_resume
from rlhf_overlay.errors import main_guard
from rlhf_overlay.settings import to_argv as config_to_argv  # noqa: F401  (re-exported: tests, callers)

KIND = "rm-llama2"
MODULE = "rlhf_overlay.dschat_jobs.reward_model"
STEP_FOLDER = "training/step2_reward_model_finetuning"


@dataclass
class RewardModelConfig(DSChatConfig):
    model: str = field(default="", metadata={"help": "base model folder or hub id (MODEL; empty: the embedded tiny LLaMA, "
                                                     "recipe tiny)"})
    data: str = field(default="", metadata={"help": "preference data: dataset name, .json/.jsonl file or folder with "
                                                    "train/eval files (DATA; empty: the recipe's)"})
    lora_dim: int | None = field(default=None, metadata={"help": "LoRA rank, 0 = full fine-tuning (LORA_DIM; default: "
                                                                 "the recipe's)"})
    data_split: str = field(default="", metadata={"help": "phase shares a,b,c (default: 0,1,0 for local files, the "
                                                          "recipe's otherwise)"})
    epochs: int | None = field(default=None, metadata={"help": "training epochs (default: the recipe's)"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after N optimizer steps, 0 = all epochs "
                                                                  "(default: the recipe's)"})
    batch_size: int | None = field(default=None, metadata={"help": "per-device train and eval batch size (default: "
                                                                   "the recipe's)"})
    max_seq_len: int | None = field(default=None, metadata={"help": "prompt + answer tokens (default: the recipe's)"})
    learning_rate: float | None = field(default=None, metadata={"help": "learning rate (default: the recipe's)"})
    eval_interval: int | None = field(default=None, metadata={"help": "evaluate every N steps, 0 = only per epoch "
                                                                      "(default: the recipe's)"})

    def validate(self) -> None:
        """All checks in one place; each error names the field and the value it got."""
        check_common(self)
        if self.model:
            check_model_folder(self.model, "model")
        if self.data:
            local_data_files(self.data)   # the path exists; rows are validated in run(), once


# ---------------------------------------------------------------------------------------------- recipes
# Values of the upstream scripts at the pin, training_scripts/llama2/run_llama2_7b.sh (LoRA: _lora.sh adds
# --lora_dim 128 --lora_module_name "layers."), with --num_padding_at_beginning 0 as there.
LLAMA2_7B = dict(data="Dahoas/rm-static", data_split="2,4,4", batch_size=8, eval_batch_size=8, max_seq_len=512,
                 learning_rate=9.65e-6, weight_decay=0.1, epochs=1, max_steps=0, zero_stage=3, offload=True,
                 gradient_checkpointing=True, lora_dim=0, lora_module_name="layers.", eval_interval=0, eval_iters=100,
                 print_interval=10, num_warmup_steps=0, checkpoint_every=0, checkpoint_minutes=30.0)
# The embedded tiny LLaMA on CPU: the first MAX_STEPS batches of its 4000 pairs, evaluated every 20 steps on
# 160 held-out pairs (the tiny data's longest pair is 30 tokens).
TINY = dict(data="", data_split="0,1,0", batch_size=8, eval_batch_size=16, max_seq_len=48, learning_rate=5e-4,
            weight_decay=0.0, epochs=1, max_steps=60, zero_stage=0, offload=False, gradient_checkpointing=False,
            lora_dim=0, lora_module_name="layers.", eval_interval=20, eval_iters=10, print_interval=10,
            num_warmup_steps=0, checkpoint_every=20, checkpoint_minutes=30.0)


def resolve(cfg: RewardModelConfig, cuda: bool) -> dict:
    """The settings this run will use: the recipe, then the user's values, then CPU adjustments."""
    recipe = cfg.recipe or ("llama2-7b" if cfg.model else "tiny")
    r = dict(LLAMA2_7B if recipe == "llama2-7b" else TINY)
    if cfg.recipe_at_tiny_scale:
        recipe, r = tiny_scale.start(KIND, cfg, LLAMA2_7B)
    r["recipe"] = recipe
    for name in ("data", "data_split", "zero_stage", "lora_dim", "epochs", "max_steps", "batch_size", "max_seq_len",
                 "learning_rate", "eval_interval"):
        value = getattr(cfg, name)
        if value not in (None, ""):
            r[name] = value
    if not cfg.data_split and cfg.data and local_data_files(cfg.data) is not None:
        r["data_split"] = "0,1,0"   # the user's own files: all of them train this step (train/eval files split)
    dschat_resume.resolve_schedule(r, cfg)
    r = cpu_adjust(r, cfg, cuda)
    return tiny_scale.finish(KIND, r, cfg, cuda, LLAMA2_7B) if cfg.recipe_at_tiny_scale else r


main_py_args = step2_main_py_args   # step 2's main.py takes exactly the shared step-2 arguments


def build_parser():
    return settings.build_parser(RewardModelConfig, prog=f"python -m {MODULE}",
                                 description="DeepSpeed-Chat step 2: LLaMA2 reward model (make rm-llama2).",
                                 epilog=__doc__)


config_from_args = partial(settings.config_from_args, RewardModelConfig)


def run(cfg: RewardModelConfig, argv_for_record: list[str] | None = None, given: set[str] | None = None) -> int:
    """Train a reward model as `cfg` says; returns the launcher's exit code. Raises ConfigError/RunDirError.
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
    n_rows = validate_local_data(data, need_pairs=True)
    from rlhf_overlay.runtime import preflight   # upstream tree, MODEL, DATA, OUTPUT: before anything is created
    checked = preflight.dschat(KIND, cfg, r, [("MODEL", cfg.model, (preflight.CAUSAL_LM,))])
    model, data = preflight.absolute(checked, "MODEL", model), preflight.absolute(checked, "DATA", data)
    plan = plan_run(KIND, cfg, r, STEP_FOLDER, resume_dir=resume_dir)
    model_dir = plan.run_dir / "model"
    partial = plan.run_dir / ".model.partial"   # main.py writes here; renamed to model/ once the run succeeded
    cmd = plan.launcher + ["main.py"] + main_py_args(
        r, model, data, partial, plan.data_cache, plan.run_dir / "tensorboard") + dschat_resume.main_py_flags(
        r, plan.run_dir, plan.resume_from) + health_flags(cfg, r) + list(cfg.extra)
    offline = not any(x and not looks_local(x) for x in (model, data))
    resolved = dict(r, model=model, data=data, data_rows=n_rows, run_dir=str(plan.run_dir), model_dir=str(model_dir),
                    master_port=plan.port, launch_command=cmd, launch_cwd=str(plan.cwd), extra=list(cfg.extra),
                    hf_hub_offline=offline, resume_from=plan.resume_from)
    summary = (f"recipe {r['recipe']}, model {model}, data {data}, dtype {r['dtype']}, ZeRO {r['zero_stage']}, "
               f"LoRA {r['lora_dim']}")
    rc = launch(KIND, MODULE, cfg, plan, cmd, resolved, argv_for_record, offline, summary)
    if rc == 0 and partial.is_dir():  # model/ appears only when complete (a killed run leaves .model.partial)
        os.replace(partial, model_dir)
    results = model_dir / "eval_results.json"
    if rc == 0 and not cfg.dry_run and results.is_file():
        acc = json.loads(results.read_text()).get("eval/acc")
        print(f"[{KIND}] done: eval accuracy {acc:.3f}; reward model in {model_dir}", flush=True)
    return rc


@main_guard
def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return run(config_from_args(ns), argv_for_record=[sys.executable, "-m", MODULE, *(sys.argv[1:] if argv is None
                                                                                   else argv)],
               given=set(ns.settings_given))


if __name__ == "__main__":
    sys.exit(main())
