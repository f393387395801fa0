"""DeepSpeed-Chat step 3: PPO with LoRA on LLaMA2 (`make ppo-llama2`).

Runs our step-3 overlay (upstream/DeepSpeedExamples/.../step3_rlhf_finetuning/main.py) with the `deepspeed`
launcher. The run folder gets actor/ (the tuned policy, LoRA merged: loads with AutoModelForCausalLM),
critic/ (DeepSpeed-Chat reward-model layout), tensorboard/ (ppo/reward_mean, ppo/kl, ppo/policy_loss,
ppo/value_loss, ppo/response_length + upstream's reward/actor_loss/critic_loss), ppo_results.json,
training.log (also shown in the terminal), command.txt and config.json.

Critic: CRITIC= a reward model from `make rm-llama2` (its run folder or its model/ folder). Without CRITIC and
without ACTOR (the embedded default) a tiny reward model is trained first into <run>/reward_model/ (~1 min);
with ACTOR but no CRITIC the run stops and says how to train one.

    # CPU, embedded tiny LLaMA: trains the tiny RM, then a few PPO steps with LoRA (a couple of minutes):
    make ppo-llama2
    make ppo-llama2 CRITIC=runs/rm-llama2-20261123-120000        # reuse a tiny RM trained before

    # your own SFT model, reward model and prompts (JSON/JSONL rows with "prompt"):
    make ppo-llama2 ACTOR=/models/llama2-sft CRITIC=runs/my-rm DATA=/data/prompts OUTPUT=runs/my-ppo

    # one GPU node, the upstream LLaMA2-7B LoRA recipe (ZeRO-3, hybrid engine, LoRA 64, Dahoas/rm-static),
    # with num_padding_at_beginning 0 (the upstream script passed OPT's 1):
    make ppo-llama2 ACTOR=/models/llama2-7b-sft CRITIC=runs/rm-7b NUM_GPUS=8

    # several nodes (DeepSpeed hostfile lines `host slots=8`; OUTPUT on shared storage):
    make ppo-llama2 ACTOR=... CRITIC=... HOSTFILE=/job/hostfile NUM_GPUS=8 OUTPUT=/shared/runs/ppo

Anything after `--` goes to main.py unchanged (e.g. `-- --print_answers`).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from rlhf_overlay.dschat_jobs import reward_model as dschat_reward_model
from rlhf_overlay.dschat_jobs.launch import (health_flags, ConfigError, DSChatConfig, check_common, check_model_folder, cpu_adjust,
                                        launch, local_data_files, looks_local, plan_run, tiny_paths,
                                        validate_local_data)
from rlhf_overlay.dschat_jobs.reward_model import RewardModelConfig
from rlhf_overlay import settings
from rlhf_overlay.dschat_jobs import tiny_scale
from rlhf_overlay.dschat_jobs import resume as dschat_resume
from rlhf_overlay.errors import main_guard

KIND = "ppo-llama2"
MODULE = "rlhf_overlay.dschat_jobs.ppo"
STEP_FOLDER = "training/step3_rlhf_finetuning"


@dataclass
class PPOConfig(DSChatConfig):
    actor: str = field(default="", metadata={"help": "SFT actor folder or hub id (ACTOR; empty: the embedded tiny "
                                                     "LLaMA, recipe tiny)"})
    critic: str = field(default="", metadata={"help": "reward model of make rm-llama2: its run folder or model/ "
                                                      "(CRITIC; empty: train the tiny one first)"})
    data: str = field(default="", metadata={"help": "prompts: dataset name, .json/.jsonl file or folder with "
                                                    "train/eval files (DATA; empty: the recipe's)"})
    lora_dim: int | None = field(default=None, metadata={"help": "LoRA rank of actor and critic, 0 = full fine-tuning "
                                                                 "(default: the recipe's, 8 tiny, 64 7B)"})
    data_split: str = field(default="", metadata={"help": "phase shares a,b,c (default: 0,0,1 for local files, the "
                                                          "recipe's otherwise)"})
    epochs: int | None = field(default=None, metadata={"help": "passes over the prompts (default: the recipe's)"})
    batch_size: int | None = field(default=None, metadata={"help": "per-device generation and training batch size "
                                                                   "(default: the recipe's)"})
    max_prompt_len: int | None = field(default=None, metadata={"help": "prompt tokens (default: the recipe's)"})
    max_answer_len: int | None = field(default=None, metadata={"help": "generated tokens (default: the recipe's)"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after N PPO steps, 0 = all prompts (default: "
                                                                  "the recipe's)"})
    hybrid_engine: bool | None = field(default=None, metadata={"help": "DeepSpeed hybrid engine, GPU only (default: "
                                                                       "the recipe's on GPU)"})
    max_kl_per_token: float = field(default=1.0, metadata={"help": "health: KL(actor || reference) per answer token "
                                                                   "above this (nats) is unhealthy"})
    max_degenerate: float = field(default=0.5, metadata={"help": "health: share of empty or looping answers above "
                                                                 "this is unhealthy"})
    max_undecodable: float = field(default=0.2, metadata={"help": "health: share of answers with undecodable tokens "
                                                                  "above this is unhealthy"})
    max_reward_drop: float = field(default=1.0, metadata={"help": "health: reward mean falling by more than this many "
                                                                  "start-of-run per-sample reward stds is a collapse"})

    def validate(self) -> None:
        """All checks in one place; each error names the field and the value it got."""
        check_common(self)
        for name in ("max_prompt_len", "max_answer_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}={value!r}: must be >= 1")
        if self.actor:
            check_model_folder(self.actor, "actor")
        if self.critic:
            resolve_critic(self.critic)
        elif self.actor:
            raise ConfigError(
                f"critic is empty but actor={self.actor!r}: PPO needs a reward model trained for this actor's "
                f"tokenizer; train one with `make rm-llama2 MODEL={self.actor} DATA=<preference data>` and pass "
                f"CRITIC=<that run folder>")
        if self.data:
            local_data_files(self.data)


def resolve_critic(critic: str) -> Path | str:
    """A step-2 output folder (config.json + pytorch_model.bin), given as the rm-llama2 run folder or its model/."""
    if not looks_local(critic):
        return critic   # a hub id: DeepSpeed-Chat downloads it (it must be in the step-2 layout)
    path = Path(critic).expanduser().resolve()
    if (path / "model" / "pytorch_model.bin").is_file():
        path = path / "model"
    if not path.is_dir():
        raise ConfigError(f"critic={critic!r}: no such folder; pass a run folder of `make rm-llama2` (or its model/)")
    if not (path / "pytorch_model.bin").is_file() or not (path / "config.json").is_file():
        from rlhf_overlay.runtime.preflight import DESCRIBE, NOT_A_MODEL, folder_kind
        kind = folder_kind(path)
        what = f"it is {DESCRIBE[kind]}" if kind != NOT_A_MODEL else "no config.json + pytorch_model.bin (in it or in " \
                                                                      "its model/)"
        raise ConfigError(f"critic={critic!r}: {what} — the critic must be a reward model saved by `make rm-llama2`, "
                          f"not a plain base model")
    return path


# Upstream training_scripts/llama2/run_llama2_7b_lora.sh at the pin, except --num_padding_at_beginning 0
# (it passed OPT's 1).
LLAMA2_7B = dict(data="Dahoas/rm-static", data_split="2,4,4", batch_size=1, generation_batches=1, ppo_epochs=1,
                 max_prompt_len=256, max_answer_len=256, actor_lr=9.65e-6, critic_lr=5e-6, weight_decay=0.1,
                 epochs=1, num_warmup_steps=100, zero_stage=3, hybrid_engine=True, offload_reference_model=True,
                 gradient_checkpointing=True, lora_dim=64, lora_module_name="layers.", only_optimize_lora=False,
                 actor_dropout="0.0", max_steps=0, checkpoint_every=0, checkpoint_minutes=30.0)
# The embedded tiny LLaMA on CPU: LoRA-only actor and critic with gradient checkpointing (the combination
# patch 0002 fixes), 40 PPO steps of 4 prompts (the tiny prompts are at most 13 tokens), actor LoRA lr 2e-3: upstream's
# 5e-4 left the reward flat (8 and 60 steps); 5e-3, or 1e-3 over 100 steps, let the KL per answer token run past 0.5
# (DeepSpeed-Chat's KL coefficient is a fixed 0.1). Trade-off table in the README. Only the LoRA weights train, so
# the LoRA lr is the actor's lr; actor_lr / critic_lr reach no trained weight here.
TINY = dict(data="", data_split="0,0,1", batch_size=4, generation_batches=1, ppo_epochs=1, max_prompt_len=16,
            max_answer_len=16, actor_lr=1e-5, critic_lr=1e-5, weight_decay=0.0, epochs=1, num_warmup_steps=0,
            zero_stage=0, hybrid_engine=False, offload_reference_model=False, gradient_checkpointing=True,
            lora_dim=8, lora_module_name="layers.", only_optimize_lora=True, actor_dropout="0.0", max_steps=40,
            actor_lora_lr=2e-3, checkpoint_every=10, checkpoint_minutes=30.0)


def resolve(cfg: PPOConfig, cuda: bool) -> dict:
    """The settings this run will use: the recipe, then the user's values, then CPU adjustments."""
    recipe = cfg.recipe or ("llama2-7b" if cfg.actor else "tiny")
    r = dict(LLAMA2_7B if recipe == "llama2-7b" else TINY)
    if cfg.recipe_at_tiny_scale:
        recipe, r = tiny_scale.start(KIND, cfg, LLAMA2_7B)
    r["recipe"] = recipe
    for name in ("data", "data_split", "zero_stage", "lora_dim", "epochs", "batch_size", "max_prompt_len",
                 "max_answer_len", "max_steps", "hybrid_engine"):
        value = getattr(cfg, name)
        if value not in (None, ""):
            r[name] = value
    if not cfg.data_split and cfg.data and local_data_files(cfg.data) is not None:
        r["data_split"] = "0,0,1"   # the user's own prompt files: all of them feed this step
    if not cuda:
        if cfg.hybrid_engine:
            raise ConfigError("hybrid_engine=True: the DeepSpeed hybrid engine needs a GPU; drop it on CPU")
        if r["hybrid_engine"]:
            r["cpu_notes"] = ["hybrid engine off: DeepSpeed's hybrid engine needs a GPU"]
        if r["offload_reference_model"]:
            r.setdefault("cpu_notes", []).append("--offload_reference_model dropped: nothing to offload to on CPU")
        r["hybrid_engine"] = False
        r["offload_reference_model"] = False
    dschat_resume.resolve_schedule(r, cfg)
    r = cpu_adjust(r, cfg, cuda)
    return tiny_scale.finish(KIND, r, cfg, cuda, LLAMA2_7B) if cfg.recipe_at_tiny_scale else r


def main_py_args(r: dict, actor: str, critic: str, data: str, output_dir: Path, data_cache: str,
                 tensorboard_dir: Path) -> list[str]:
    """Arguments of step 3's main.py for resolved settings `r`."""
    args = ["--data_path", data, "--data_split", r["data_split"], "--data_output_path", data_cache,
            "--actor_model_name_or_path", actor, "--critic_model_name_or_path", critic,
            "--num_padding_at_beginning", "0",
            "--per_device_generation_batch_size", str(r["batch_size"]),
            "--per_device_training_batch_size", str(r["batch_size"]),
            "--generation_batches", str(r["generation_batches"]), "--ppo_epochs", str(r["ppo_epochs"]),
            "--max_answer_seq_len", str(r["max_answer_len"]), "--max_prompt_seq_len", str(r["max_prompt_len"]),
            "--actor_learning_rate", str(r["actor_lr"]), "--critic_learning_rate", str(r["critic_lr"]),
            "--actor_weight_decay", str(r["weight_decay"]), "--critic_weight_decay", str(r["weight_decay"]),
            "--num_train_epochs", str(r["epochs"]), "--lr_scheduler_type", "cosine",
            "--gradient_accumulation_steps", "1", "--num_warmup_steps", str(r["num_warmup_steps"]),
            "--actor_dropout", r["actor_dropout"], "--deepspeed", "--seed", str(r["seed"]),
            "--actor_zero_stage", str(r["zero_stage"]), "--critic_zero_stage", str(r["zero_stage"]),
            "--dtype", r["dtype"], "--output_dir", str(output_dir), "--tensorboard_path", str(tensorboard_dir)]
    if r["gradient_checkpointing"]:
        args += ["--actor_gradient_checkpointing", "--critic_gradient_checkpointing"]
    if r["offload_reference_model"]:
        args.append("--offload_reference_model")
    if r["hybrid_engine"]:
        args.append("--enable_hybrid_engine")
    if r["lora_dim"]:
        args += ["--actor_lora_dim", str(r["lora_dim"]), "--critic_lora_dim", str(r["lora_dim"]),
                 "--actor_lora_module_name", r["lora_module_name"],
                 "--critic_lora_module_name", r["lora_module_name"]]
        if r["only_optimize_lora"]:
            args.append("--only_optimize_lora")
        if r.get("actor_lora_lr"):   # else upstream's default (5e-4), as the llama2-7b LoRA script leaves it
            args += ["--actor_lora_learning_rate", str(r["actor_lora_lr"])]
    if r["max_steps"]:
        args += ["--max_steps", str(r["max_steps"])]
    return args


def build_parser():
    return settings.build_parser(PPOConfig, prog=f"python -m {MODULE}",
                                 description="DeepSpeed-Chat step 3: LLaMA2 PPO with LoRA (make ppo-llama2).",
                                 epilog=__doc__)


config_from_args = partial(settings.config_from_args, PPOConfig)


def run(cfg: PPOConfig, argv_for_record: list[str] | None = None, given: set[str] | None = None) -> int:
    """PPO as `cfg` says (training the tiny reward model first when no critic is given); returns the exit code.
    With cfg.resume, `given` names the settings given now (default: those that differ from the defaults)."""
    from rlhf_overlay.runtime.runs import has_cuda
    cfg, resume_dir = dschat_resume.take_resume(cfg, given, KIND)   # RESUME=<run>: the run's settings
    cfg.validate()
    cuda = has_cuda()
    r = resolve(cfg, cuda)
    actor, data = cfg.actor, cfg.data or r["data"]
    if not actor or not data:
        tiny = tiny_paths()
        actor = actor or str(tiny["model"])
        data = data or str(tiny["prompts"])
    n_rows = validate_local_data(data, need_pairs=False)
    from rlhf_overlay.runtime import preflight   # upstream tree, ACTOR, CRITIC, DATA, OUTPUT: before anything is created
    checked = preflight.dschat(KIND, cfg, r, [("ACTOR", cfg.actor, (preflight.CAUSAL_LM,)),
                                              ("CRITIC", cfg.critic, (preflight.DSCHAT_CRITIC,))])
    actor, data = preflight.absolute(checked, "ACTOR", actor), preflight.absolute(checked, "DATA", data)
    critic = str(resolve_critic(cfg.critic)) if cfg.critic else ""
    if resume_dir is not None:  # the frozen models are made anew from their folders: they must be the run's
        critic = critic or str(resume_dir / "reward_model" / "model")   # the tiny reward model the run trained first
        dschat_resume.check_models_unchanged(resume_dir, {"ACTOR": actor, "CRITIC": critic})
    plan = plan_run(KIND, cfg, r, STEP_FOLDER, resume_dir=resume_dir)
    run_dir = plan.run_dir

    rm_cfg = None
    if not critic:
        # The embedded default: train the tiny reward model for the tiny actor first, inside this run folder.
        rm_cfg = RewardModelConfig(model=actor, output=str(run_dir / "reward_model"), overwrite=cfg.overwrite,
                                   recipe="tiny", dtype=cfg.dtype, num_gpus=cfg.num_gpus, seed=cfg.seed,
                                   on_unhealthy=cfg.on_unhealthy, dry_run=cfg.dry_run)
        critic = str(run_dir / "reward_model" / "model")

    partial = run_dir / ".ppo.partial"   # main.py writes actor/, critic/, ppo_results.json here; moved on success
    cmd = plan.launcher + ["main.py"] + main_py_args(
        r, actor, critic, data, partial, plan.data_cache, run_dir / "tensorboard") + dschat_resume.main_py_flags(
        r, run_dir, plan.resume_from) + health_flags(cfg, r) + list(cfg.extra)
    offline = not any(x and not looks_local(x) for x in (actor, critic, data))
    resolved = dict(r, actor=actor, critic=critic, critic_trained_here=rm_cfg is not None or (
                    resume_dir is not None and not cfg.critic), data=data,
                    data_rows=n_rows, run_dir=str(run_dir), master_port=plan.port, launch_command=cmd,
                    launch_cwd=str(plan.cwd), extra=list(cfg.extra), hf_hub_offline=offline,
                    resume_from=plan.resume_from)
    if rm_cfg is not None:
        if cfg.dry_run:
            print(f"# first: the tiny reward model ({dschat_reward_model.MODULE})")
        else:
            print(f"[{KIND}] no CRITIC given: training the tiny reward model first into {run_dir / 'reward_model'}",
                  flush=True)
        rc = dschat_reward_model.run(rm_cfg)
        if rc != 0:
            print(f"[{KIND}] the reward model failed (exit code {rc}); see {run_dir / 'reward_model' / 'training.log'}",
                  file=sys.stderr, flush=True)
            return rc
    if not cfg.dry_run:  # size + mtime of the actor's and critic's files: a resume checks it reloads the same models
        resolved["model_fingerprints"] = dschat_resume.fingerprints({"ACTOR": actor, "CRITIC": critic})
    summary = (f"recipe {r['recipe']}, actor {actor}, critic {critic}, data {data}, dtype {r['dtype']}, "
               f"ZeRO {r['zero_stage']}, LoRA {r['lora_dim']}")
    rc = launch(KIND, MODULE, cfg, plan, cmd, resolved, argv_for_record, offline, summary)
    if rc == 0 and partial.is_dir():  # actor/ and critic/ appear only when complete (each moved by one rename)
        for entry in sorted(partial.iterdir()):
            os.replace(entry, run_dir / entry.name)
        partial.rmdir()
    results = run_dir / "ppo_results.json"
    if rc == 0 and not cfg.dry_run and results.is_file():
        steps = json.loads(results.read_text()).get("ppo/steps")
        print(f"[{KIND}] done: {steps} PPO steps; actor in {run_dir / 'actor'}, critic in {run_dir / 'critic'}",
              flush=True)
        rc = judge_run(run_dir, tiny=r["recipe"] == "tiny" and not (cfg.actor or cfg.critic or cfg.data))
    return rc


def judge_run(run_dir: Path, tiny: bool) -> int:
    """The three numbers of the run (reward first -> last, fluency, KL per answer token at the end) from its
    tensorboard scalars, recorded in ppo_results.json; the embedded tiny default is judged by them (exit 1 naming
    what failed), a run on your own actor / critic / data only measured (rlhf_overlay.runtime.verdict)."""
    from rlhf_overlay.runtime import verdict
    result = verdict.judge(verdict.dschat_steps(run_dir / "tensorboard"), window=3, tiny=tiny,
                           full_length=TINY["max_steps"])
    verdict.record(run_dir / "ppo_results.json", result)
    return verdict.report(result, KIND, log=run_dir / "training.log")


@main_guard
def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return run(config_from_args(ns), argv_for_record=[sys.executable, "-m", MODULE, *(sys.argv[1:] if argv is None
                                                                                   else argv)],
               given=set(ns.settings_given))


if __name__ == "__main__":
    sys.exit(main())
