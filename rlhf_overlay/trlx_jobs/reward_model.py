"""Value-head reward model for any causal LM trunk (BLOOM, GPT-J, LLaMA, ...): `make rm-bloom`, `make rm-gptj`.

One scalar per text, read from a linear value head on the trunk's hidden state at the last non-pad token; trained
with the pairwise loss -log sigmoid(r_chosen - r_rejected) on preference JSONL rows {prompt, chosen, rejected}
(the seed's misspelt `choosen` is accepted with a warning). HF Trainer; DeepSpeed optional. Tokenizer, pad and eos
come from the model folder (pad falls back to eos; eos is appended to every text, so the score is read on it).

CPU, embedded tiny models (no download, ~1 min):
    make rm-bloom                                   # tiny BLOOM + embedded preference data -> runs/rm-bloom-<time>/
    make rm-gptj OUTPUT=runs/my-rm OVERWRITE=1
    python -m rlhf_overlay.trlx_jobs.reward_model --arch bloom --max-steps 20
Own model and data (one GPU; ZeRO-2 by default on GPU, the seed recipe's 30% top layers trained):
    make rm-bloom MODEL=/models/bloom-1b1-sft DATA=/data/ranking      # folder with train.jsonl [+ eval.jsonl]
    python -m rlhf_overlay.trlx_jobs.reward_model --model /models/gpt-j-sft --data pairs.jsonl --eval-data val.jsonl
Several GPUs / nodes (torchrun on one node; the DeepSpeed launcher with a hostfile of `host slots=N` lines):
    make rm-bloom MODEL=/models/bloom-7b1-sft DATA=/data/ranking NUM_GPUS=8
    make rm-gptj MODEL=/models/gpt-j-sft DATA=/data/ranking HOSTFILE=/etc/hostfile ZERO_STAGE=2

Output folder: reward_model/ (trunk in HF format + tokenizer + value_head.safetensors + reward_model.json; load it
with rlhf_overlay.trlx_jobs.value_head.load_reward_model), metrics.json (eval accuracy before/after, chance 0.5), tensorboard/ (rm/loss, rm/acc,
rm/eval_loss; the HF Trainer's own scalars under tensorboard/hf), training.log, command.txt, config.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from rlhf_overlay import settings
from rlhf_overlay.errors import main_guard
from rlhf_overlay.trlx_jobs.common import ConfigError, RunSettings, bad, tiny_model_path


@dataclass
class RewardModelConfig(RunSettings):
    arch: str = field(default="bloom", metadata={"help": "bloom | gptj | llama: picks the embedded tiny default model and the run name"})
    model: str = field(default="", metadata={"help": "base/SFT model folder or hub id (MODEL); empty = the embedded tiny model of --arch"})
    data: str = field(default="", metadata={"help": "preference JSONL file, or folder with train.jsonl [+ eval.jsonl] (DATA); empty = embedded data"})
    eval_data: str = field(default="", metadata={"help": "eval JSONL; default: DATA/eval.jsonl, else the last --eval-fraction of the training rows"})
    eval_fraction: float = field(default=0.1, metadata={"help": "share of a single DATA file held out for eval when there is no eval file"})
    output: str = field(default="", metadata={"help": "run folder (OUTPUT); empty = a new runs/rm-<arch>-<time>"})
    separator: str = field(default="\n", metadata={"help": "text put between prompt and response (the seed's '\\n')"})
    max_length: int = field(default=0, metadata={"help": "tokens per prompt+response+eos, truncated on the left; 0 = 128 tiny / 550 (seed) own model"})
    epochs: float = field(default=0.0, metadata={"help": "passes over the training pairs; 0 = 1 tiny / 2 (seed) own model"})
    max_steps: int = field(default=-1, metadata={"help": "stop after this many optimizer steps (-1 = run the epochs)"})
    batch_size: int = field(default=0, metadata={"help": "pairs per process per step; 0 = 16 tiny / 4 own model"})
    grad_accum: int = field(default=0, metadata={"help": "gradient accumulation steps; 0 = 1 tiny / 4 (seed) own model"})
    lr: float = field(default=0.0, metadata={"help": "learning rate; 0 = 1e-3 tiny / 1e-5 (seed) own model"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=-1, metadata={"help": "linear warm-up steps; -1 = 0 tiny / 100 (seed) own model"})
    unfrozen_fraction: float = field(default=0.0, metadata={"help": "share of the top decoder layers trained (rest frozen); 0 = 1.0 tiny / 0.3 (seed) own model"})
    eval_steps: int = field(default=0, metadata={"help": "evaluate every N steps; 0 = 50 tiny / once per epoch own model"})
    logging_steps: int = field(default=0, metadata={"help": "log the training loss every N steps (0 = 5 tiny / 10 own model)"})
    eval_before: str = field(default="auto", metadata={"help": "auto | yes | no: also measure eval accuracy before training (auto = tiny default only)"})
    precision: str = field(default="auto", metadata={"help": "auto | fp32 | bf16 | fp16 (auto: fp32 on CPU, bf16 on GPU if supported else fp16; CPU never fp16)"})
    zero_stage: int = field(default=-1, metadata={"help": "DeepSpeed ZeRO stage (ZERO_STAGE); -1 = none on CPU, 2 on GPU; ignored with --deepspeed"})
    offload: bool = field(default=False, metadata={"help": "DeepSpeed: offload optimizer states to CPU (the seed recipe for 7B)"})
    deepspeed: str = field(default="", metadata={"help": "your own DeepSpeed JSON config (overrides --zero-stage); needs a launcher, which we start"})
    seed: int = field(default=0, metadata={"help": "random seed (data order, value-head init)"})
    allow_arch: bool = field(default=False, metadata={"help": "train a MODEL whose architecture is not --arch anyway (ALLOW_ARCH=1)"})
    checkpoint_every: int = field(default=-1, metadata={"help": "resumable checkpoint into <run>/checkpoints/step-N every N optimizer steps (CHECKPOINT_EVERY); 0 = by time only; -1 = 100 tiny / 0 own model"})
    on_unhealthy: str = field(default="auto", metadata={"help": "stop | warn on NaN/inf in the loss or gradient norm (ON_UNHEALTHY; rlhf_overlay.runtime.health); auto = warn tiny / stop own model"})

    def resolve(self) -> "RewardModelConfig":
        """Fill every `auto`/0 default (tiny default vs. the seed recipe for own models), then validate."""
        c = dataclasses.replace(self)
        t = c.tiny
        c.max_length = c.max_length or (128 if t else 550)
        c.epochs = c.epochs or (1.0 if t else 2.0)
        c.batch_size = c.batch_size or (16 if t else 4)
        c.grad_accum = c.grad_accum or (1 if t else 4)
        c.lr = c.lr or (1e-3 if t else 1e-5)
        c.warmup_steps = (0 if t else 100) if c.warmup_steps < 0 else c.warmup_steps
        c.unfrozen_fraction = c.unfrozen_fraction or (1.0 if t else 0.3)
        c.logging_steps = c.logging_steps or (5 if t else 10)
        c.eval_steps = c.eval_steps or (50 if t else 0)
        if c.eval_before == "auto":   # (not under DeepSpeed: see validate)
            c.eval_before = "yes" if t and c.zero_stage <= 0 and not c.deepspeed else "no"
        c.resolve_run(checkpoint_every_tiny=100)
        c.validate()
        return c

    def validate(self) -> None:
        self.check_arch()
        if self.max_length < 8:
            bad("max_length", self.max_length, "must be >= 8 tokens")
        if self.epochs <= 0 and self.max_steps <= 0:
            bad("epochs", self.epochs, "must be > 0 (or set max_steps)")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                bad(name, getattr(self, name), "must be >= 1")
        if self.max_steps == 0 or self.max_steps < -1:
            bad("max_steps", self.max_steps, "must be >= 1, or -1 for the epochs")
        if not self.lr > 0:
            bad("lr", self.lr, "must be > 0")
        if not 0 < self.unfrozen_fraction <= 1:
            bad("unfrozen_fraction", self.unfrozen_fraction, "must be in (0, 1]")
        if not 0 < self.eval_fraction < 1:
            bad("eval_fraction", self.eval_fraction, "must be in (0, 1)")
        if self.eval_before not in ("yes", "no", "auto"):
            bad("eval_before", self.eval_before, "must be auto, yes or no")
        if self.eval_before == "yes" and (self.zero_stage > 0 or self.deepspeed):
            bad("eval_before", self.eval_before, "cannot be yes under DeepSpeed: the HF Trainer's evaluate() before "
                "train() starts DeepSpeed for inference (ZeRO-1/2 refuse it, ZeRO-3 then trains with no engine)")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            bad("precision", self.precision, "must be auto, fp32, bf16 or fp16")
        if self.zero_stage not in (-1, 0, 1, 2):
            bad("zero_stage (ZERO_STAGE)", self.zero_stage, "must be 0, 1 or 2 (or empty for the default); ZeRO-3 "
                "partitions the weights and the reward-model export does not gather them")
        if self.deepspeed and not Path(self.deepspeed).is_file():
            bad("deepspeed", self.deepspeed, "file does not exist")
        self.check_inputs("data", "eval_data")
        self.validate_run()


MODULE = "rlhf_overlay.trlx_jobs.reward_model"
# Settings a resume (RESUME=<run>) may change; everything else must be the run's.
RM_MAY_CHANGE = {"max_steps", "epochs", "checkpoint_every", "checkpoint_minutes", "keep_checkpoints", "eval_steps",
                 "logging_steps", "on_unhealthy"}


# ---------------------------------------------------------------------------------------------- data
def resolve_data_files(data: str, eval_data: str) -> tuple[Path, Path | None]:
    """(train file, eval file or None = hold out a share of train); a folder holds train.jsonl|.json [+ eval]."""
    if data:
        p = Path(data).expanduser().resolve()
    else:
        from rlhf_overlay.data.tiny_assets import ensure_tiny_assets

        p = ensure_tiny_assets() / "data" / "preference"
    from rlhf_overlay.data.preference_data import resolve_data_file

    ev = resolve_data_file(Path(eval_data).expanduser().resolve()) if eval_data else None
    if p.is_dir():
        if ev is None and any((p / f"eval{suffix}").is_file() for suffix in (".jsonl", ".json")):
            ev = resolve_data_file(p, "eval")
        return resolve_data_file(p, "train"), ev
    return resolve_data_file(p), ev


def load_pairs(path: Path, split: str) -> list[tuple[str, str, str]]:
    """Validated (prompt, chosen, rejected) rows; errors name file:line (rlhf_overlay.data.preference_data)."""
    from rlhf_overlay.data.preference_data import load_preference_rows

    rows = load_preference_rows(path, split=split)
    out = []
    for r in rows:
        get = r.get if isinstance(r, dict) else (lambda k, _r=r: getattr(_r, k))
        out.append((get("prompt"), get("chosen"), get("rejected")))
    return out


def load_train_eval(cfg: RewardModelConfig) -> tuple[list, list, dict]:
    train_file, eval_file = resolve_data_files(cfg.data, cfg.eval_data)
    train = load_pairs(train_file, "train")
    if eval_file is not None:
        ev = load_pairs(eval_file, "eval")
        src = {"train": str(train_file), "eval": str(eval_file)}
    else:  # one file: a held-out share, the same rows for every run and rank (rlhf_overlay.data.preference_data)
        from rlhf_overlay.data.preference_data import split_held_out

        train, ev = split_held_out(train, cfg.eval_fraction, file=train_file)
        src = {"train": str(train_file), "eval": f"{train_file} ({len(ev)} of its rows held out, not trained on)"}
    return train, ev, src


# ---------------------------------------------------------------------------------------------- launch
def deepspeed_config(cfg: RewardModelConfig, precision: str) -> dict | None:
    """The DeepSpeed JSON for this run (None = no DeepSpeed): the user's file, or ZeRO-`zero_stage` with HF 'auto'
    values (fp16/bf16 follow --precision; optimizer offload with --offload, as the seed's ds_config_bloom.json)."""
    if cfg.deepspeed:
        return json.loads(Path(cfg.deepspeed).read_text())
    if cfg.zero_stage <= 0:
        return None
    zero: dict = {"stage": cfg.zero_stage, "allgather_partitions": True, "allgather_bucket_size": 5e8,
                  "reduce_scatter": True, "reduce_bucket_size": 5e8, "overlap_comm": False, "contiguous_gradients": True}
    if cfg.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "zero_optimization": zero, "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": precision == "bf16"}, "fp16": {"enabled": precision == "fp16"},
    }


def resolve_precision(precision: str, cuda: bool) -> str:
    if precision == "auto":
        if not cuda:
            return "fp32"
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and not cuda:
        raise ConfigError("precision='fp16' needs a GPU: fp16 training is not supported on CPU (use fp32 or bf16)")
    return precision


# ---------------------------------------------------------------------------------------------- CLI
def build_parser(arch_default: str = "bloom") -> argparse.ArgumentParser:
    """One flag per RewardModelConfig field (rlhf_overlay.settings: help from the field, --config FILE), --dry-run."""
    p = settings.build_parser(
        RewardModelConfig, prog="python -m rlhf_overlay.trlx_jobs.reward_model",
        description="Train a value-head reward model (pairwise loss) on preference JSONL. " + __doc__.split("\n\n")[1],
        epilog=__doc__.split("\n\n", 2)[2], defaults={"arch": arch_default})
    p.add_argument("--dry-run", action="store_true",
                   help="check everything, print the resolved settings and the launch command; run and create nothing")
    p.add_argument("--worker", metavar="RUN_DIR", help=argparse.SUPPRESS)
    return p


def config_from_args(ns: argparse.Namespace) -> RewardModelConfig:
    return settings.config_from_args(RewardModelConfig, ns)


@main_guard   # UserError (bad flag, setting, data row, folder) -> `error: ...`, exit 2; Ctrl-C -> one line, 130
def main(argv: Sequence[str] | None = None, arch_default: str = "bloom") -> int:
    ns = build_parser(arch_default).parse_args(argv)
    if ns.worker:
        from rlhf_overlay.runtime.dist_exit import end_process_group
        from rlhf_overlay.trlx_jobs.rm_worker import worker_main
        return end_process_group(worker_main(Path(ns.worker)))  # no SIGABRT from a group torn down at exit
    return run(config_from_args(ns), argv, dry_run=ns.dry_run, given=set(ns.settings_given))


def run(cfg: RewardModelConfig, argv: Sequence[str] | None = None, worker=None, dry_run: bool = False,
        given: set[str] | None = None) -> int:
    """Validate, prepare the run folder, launch the workers; `worker(run_dir)` instead runs them in this process
    (rlhf_overlay.tools.seed_launch: the seed's `deepspeed train_reward_model_*.py` started the ranks already).
    `given`: the settings set by a flag or --config file (a RESUME keeps the run's others); default: from argv."""
    from rlhf_overlay.runtime.runs import RunDirError, has_cuda, prepare_run_dir, run_logged, runtime_env
    from rlhf_overlay.trlx_jobs.checkpoints import open_resume_dir, resolve_resume
    from rlhf_overlay.trlx_jobs.common import needs_hub, trainer_command
    from rlhf_overlay.trlx_jobs.launcher import (check_ranks, record_run, refuse_under_launcher, start_workers,
                                                 take_resume)

    cfg, resume_dir = take_resume(cfg, argv, given, RewardModelConfig, build_parser, key="reward_model",
                                  what="a reward-model run (make rm-bloom / rm-gptj)", may_change=RM_MAY_CHANGE)
    cfg = cfg.resolve()
    refuse_under_launcher(MODULE, "(or `make rm-bloom`) directly; it starts its own launcher (NUM_GPUS / HOSTFILE)")
    cuda = has_cuda()
    precision = resolve_precision(cfg.precision, cuda)
    if cfg.zero_stage < 0:
        cfg.zero_stage = 2 if cuda else 0
    ds = deepspeed_config(cfg, precision)
    if ds is not None and not cuda:
        from rlhf_overlay.trlx_jobs.common import deepspeed_cpu_problem

        problem = deepspeed_cpu_problem(ds, f"deepspeed={cfg.deepspeed}" if cfg.deepspeed else "zero_stage")
        if problem:
            raise ConfigError(problem)
    check_ranks(cfg, cuda)
    if cfg.num_processes == 0:
        if cuda:
            import torch

            cfg.num_processes = max(1, torch.cuda.device_count())
        else:
            cfg.num_processes = 1
    if cfg.hostfile:
        from rlhf_overlay.runtime.hostfile import deepspeed_launcher_flags

        deepspeed_launcher_flags(cfg.hostfile)  # format and reachability, before anything is created
    from rlhf_overlay.runtime import preflight   # MODEL (kind, --arch, weights), DATA, OUTPUT: before anything is created
    checked = preflight.trlx(f"rm-{cfg.arch}", cfg, False, [("MODEL", cfg.model, (preflight.CAUSAL_LM,), cfg.arch)])
    # a folder as checked (a run folder -> the model inside it), a hub id as given, else the embedded tiny model
    model_path = preflight.absolute(checked, "MODEL", cfg.model) if cfg.model else tiny_model_path(cfg.arch)
    # Validate every data row here, before any process starts: a bad row fails with file:line.
    train, ev, sources = load_train_eval(cfg)
    if dry_run:
        run_dir = resume_dir or Path(cfg.output or f"runs/rm-{cfg.arch}-<time>").expanduser().absolute()
        cmd = trainer_command(MODULE, ["--worker", str(run_dir)],
                              num_processes=cfg.num_processes, deepspeed=ds is not None, hostfile=cfg.hostfile or None)
        settings.print_dry_run(f"rm-{cfg.arch}", {
            "reward_model": dataclasses.asdict(cfg), "model_path": model_path, "precision": precision,
            "deepspeed_config": ds, "data": sources, "train_pairs": len(train), "eval_pairs": len(ev),
            "hf_hub_offline": not needs_hub(model_path)}, cmd)
        return 0
    try:
        run_dir = (prepare_run_dir(f"rm-{cfg.arch}", output=cfg.output or None, overwrite=cfg.overwrite)
                   if resume_dir is None else open_resume_dir(resume_dir))
    except RunDirError as e:
        raise ConfigError(str(e)) from None
    resolved = {"reward_model": dataclasses.asdict(cfg), "model_path": model_path, "precision": precision,
                "deepspeed_config": ds, "data": sources, "train_pairs": len(train), "eval_pairs": len(ev)}
    record_run(run_dir, MODULE, argv, resolved, resolve_resume(run_dir) if resume_dir is not None else None)
    print(f"reward model ({cfg.arch}{', embedded tiny model' if cfg.tiny else ''}): {model_path}\n"
          f"data: {len(train)} train / {len(ev)} eval pairs (train: {sources['train']}; eval: {sources['eval']})\n"
          f"run folder: {run_dir}  (log: {run_dir / 'training.log'})", flush=True)
    cmd = trainer_command(MODULE, ["--worker", str(run_dir)],
                          num_processes=cfg.num_processes, deepspeed=ds is not None, hostfile=cfg.hostfile or None)
    env = runtime_env(cpu=not cuda, offline=not needs_hub(model_path))  # online only for a hub id
    env["RLHF_OVERLAY_WORKER"] = "1"
    if ds is not None:
        from rlhf_overlay.runtime.waits import check_torch_extensions
        check_torch_extensions(env["TORCH_EXTENSIONS_DIR"])  # a stale op-build lock would hang DeepSpeed silently
    env.setdefault("WANDB_DISABLED", "true")
    if cfg.hostfile:
        from rlhf_overlay.runtime.hostfile import remote_env

        env = remote_env(env, run_dir)  # what the ranks that DeepSpeed's launcher starts over ssh need
    rc = start_workers(run_dir, f"rm-{cfg.arch}", MODULE, None, resume_dir is not None, "reward model training",
                       lambda: worker(run_dir) if worker is not None else run_logged(cmd, run_dir, env=env))
    if rc != 0:
        return rc
    m = json.loads((run_dir / "metrics.json").read_text())
    before = f"{m['eval_accuracy_before']:.3f} -> " if m.get("eval_accuracy_before") is not None else ""
    print(f"eval accuracy: {before}{m['eval_accuracy']:.3f} on {m['eval_pairs']} pairs (chance 0.500); "
          f"{m['steps']} steps, {m['seconds_per_step']:.3f} s/step\nreward model: {m['reward_model']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
