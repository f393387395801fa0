"""DeepSpeed-Chat step 2: train a LLaMA2 reward model (`make rm-llama2`).

Runs our step-2 overlay (upstream/DeepSpeedExamples/.../step2_reward_model_finetuning/main.py) with the
`deepspeed` launcher and writes one run folder: model/ (config.json, pytorch_model.bin, tokenizer files: the
DeepSpeed-Chat reward-model layout, which step 3 loads as critic; weights are `rwtransformer.*` + `v_head.weight`),
tensorboard/ (train/loss, eval/acc, eval/reward_score, rm/loss, rm/acc), model/eval_results.json, training.log
(also shown in the terminal), command.txt (this command) and config.json (resolved settings + launch command).

    # CPU, embedded tiny LLaMA + tiny preference data (about a minute):
    make rm-llama2
    python -m rlhf_overlay.dschat_reward_model --output runs/rm-tiny

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

import argparse
import json
import os
import shlex
import socket
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

KIND = "rm-llama2"
MODULE = "rlhf_overlay.dschat_reward_model"
STEP_FOLDER = "training/step2_reward_model_finetuning"
RECIPES = ("tiny", "llama2-7b")
DTYPES = ("bf16", "fp32", "fp16")
DATA_SUFFIXES = (".jsonl", ".json")


class ConfigError(ValueError):
    """A setting that cannot work; the message names the field, the value and what to do."""


@dataclass
class RewardModelConfig:
    model: str = ""                   # base model folder or hub id (empty = embedded tiny LLaMA, recipe tiny)
    data: str = ""                    # preference data: dataset name, .json/.jsonl file or folder (empty = recipe's)
    output: str = ""                  # run folder (empty = new runs/rm-llama2-<time>)
    overwrite: bool = False           # allow writing into a non-empty output folder
    recipe: str = ""                  # tiny | llama2-7b (empty = tiny without model, llama2-7b with one)
    zero_stage: int | None = None     # ZeRO stage (empty = 0 on CPU, the recipe's on GPU)
    lora_dim: int | None = None       # LoRA rank, 0 = full fine-tuning (empty = the recipe's)
    num_gpus: int | None = None       # ranks per node (CPU: processes; empty = 1 on CPU, all GPUs on GPU)
    hostfile: str = ""                # DeepSpeed hostfile for several nodes (`host slots=N` lines)
    dtype: str = ""                   # bf16 | fp32 | fp16 (empty = fp32 on CPU, fp16 on GPU as upstream)
    data_split: str = ""              # phase shares a,b,c (empty = 0,1,0 for local files, the recipe's otherwise)
    epochs: int | None = None         # training epochs (empty = the recipe's)
    max_steps: int | None = None      # stop after N optimizer steps, 0 = all epochs (empty = the recipe's)
    batch_size: int | None = None     # per-device train and eval batch size (empty = the recipe's)
    max_seq_len: int | None = None    # prompt + answer tokens (empty = the recipe's)
    learning_rate: float | None = None  # learning rate (empty = the recipe's)
    eval_interval: int | None = None  # evaluate every N steps, 0 = only per epoch (empty = the recipe's)
    seed: int = 1234                  # training seed
    master_port: int | None = None    # rendezvous port (empty = a free port on one node, 29500 on several)
    dry_run: bool = False             # print the launch command and exit
    extra: list[str] = field(default_factory=list)  # more main.py arguments, passed unchanged

    def to_argv(self) -> list[str]:
        """Command-line flags that reproduce this config (for command.txt of a run started from Python)."""
        return config_to_argv(self)

    def validate(self) -> None:
        """All checks in one place; each error names the field and the value it got."""
        if self.recipe and self.recipe not in RECIPES:
            raise ConfigError(f"recipe={self.recipe!r}: choose one of {', '.join(RECIPES)}")
        if self.dtype and self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage={self.zero_stage!r}: ZeRO stages are 0, 1, 2 or 3")
        for name in ("lora_dim",):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name}={value!r}: must be >= 0 (0 = no LoRA)")
        if self.max_steps is not None and self.max_steps < 0:
            raise ConfigError(f"max_steps={self.max_steps!r}: must be >= 0 (0 = all epochs)")
        for name in ("num_gpus", "epochs", "batch_size", "max_seq_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}={value!r}: must be >= 1")
        if self.eval_interval is not None and self.eval_interval < 0:
            raise ConfigError(f"eval_interval={self.eval_interval!r}: must be >= 0")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ConfigError(f"learning_rate={self.learning_rate!r}: must be > 0")
        if self.data_split:
            check_data_split(self.data_split)
        if self.hostfile and not Path(self.hostfile).expanduser().is_file():
            raise ConfigError(f"hostfile={self.hostfile!r}: no such file (DeepSpeed hostfile, `host slots=N` lines)")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ConfigError(f"master_port={self.master_port!r}: must be a TCP port (1-65535)")
        if self.model:
            check_model_folder(self.model, "model")
        if self.data:
            local_data_files(self.data)   # the path exists; rows are validated in run(), once


def config_to_argv(cfg) -> list[str]:
    """Flags for every field of a config dataclass that differs from its default; `extra` goes after `--`."""
    argv: list[str] = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if f.name == "extra" or value == default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + f.name.replace("_", "-"))
        else:
            argv += [flag, str(value)]
    if cfg.extra:
        argv += ["--", *cfg.extra]
    return argv


# ---------------------------------------------------------------------------------------------- recipes
# Values of the upstream scripts at the pin, training_scripts/llama2/run_llama2_7b.sh (LoRA: _lora.sh adds
# --lora_dim 128 --lora_module_name "layers."), with --num_padding_at_beginning 0 as there.
LLAMA2_7B = dict(data="Dahoas/rm-static", data_split="2,4,4", batch_size=8, eval_batch_size=8, max_seq_len=512,
                 learning_rate=9.65e-6, weight_decay=0.1, epochs=1, max_steps=0, zero_stage=3, offload=True,
                 gradient_checkpointing=True, lora_dim=0, lora_module_name="layers.", eval_interval=0, eval_iters=100,
                 print_interval=10, num_warmup_steps=0)
# The embedded tiny LLaMA on CPU: the first MAX_STEPS batches of its 4000 pairs, evaluated every 20 steps on
# 160 held-out pairs (the tiny data's longest pair is 30 tokens).
TINY = dict(data="", data_split="0,1,0", batch_size=8, eval_batch_size=16, max_seq_len=48, learning_rate=5e-4,
            weight_decay=0.0, epochs=1, max_steps=60, zero_stage=0, offload=False, gradient_checkpointing=False,
            lora_dim=0, lora_module_name="layers.", eval_interval=20, eval_iters=10, print_interval=10,
            num_warmup_steps=0)


def looks_local(name: str) -> bool:
    """Hub ids are `name` or `org/name`; anything absolute, ./-relative, deeper or existing is a local path."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") >= 2
            or os.path.exists(os.path.expanduser(name)))


def check_model_folder(name: str, field_name: str) -> None:
    if not looks_local(name):
        return
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{field_name}={name!r}: no such model folder (give a local folder with config.json or a "
                          f"hub id such as meta-llama/Llama-2-7b-hf)")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{field_name}={name!r}: the folder has no config.json, so it is not a Hugging Face model")


def check_data_split(split: str) -> None:
    parts = split.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(parts) != 3 or len(values) != 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise ConfigError(f"data_split={split!r}: give three non-negative shares for phases 1,2,3, e.g. 6,2,2")


def local_data_files(data: str) -> dict[str, Path] | None:
    """{'train': file, 'eval': file} for a local data path (same rules as the overlay's local_files.py), or
    None when `data` is a dataset name."""
    path = Path(data).expanduser()
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise ConfigError(f"data={data!r}: not a .json or .jsonl file")
        return {"train": path.resolve(), "eval": path.resolve()}
    if path.is_dir():
        found = {}
        for split in ("train", "eval"):
            for suffix in DATA_SUFFIXES:
                if (path / f"{split}{suffix}").is_file():
                    found[split] = (path / f"{split}{suffix}").resolve()
                    break
        if "train" not in found:
            raise ConfigError(f"data={data!r}: the folder has no train.jsonl or train.json")
        found.setdefault("eval", found["train"])
        return found
    if looks_local(data) or data.endswith(DATA_SUFFIXES):
        raise ConfigError(f"data={data!r}: no such file or folder")
    return None


def validate_local_data(data: str, field_name: str, need_pairs: bool) -> int:
    """Validate every row of a local data path before launching (errors say file:line); returns the row count.
    Preference rows for the reward model; prompt rows (preference rows pass too) for PPO. Dataset names (hub)
    are left to DeepSpeed-Chat."""
    files = local_data_files(data)
    if files is None:
        return 0
    from rlhf_overlay import preference_data
    load = preference_data.load_preference_rows if need_pairs else preference_data.load_prompt_rows
    return sum(len(load(str(path))) for path in set(files.values()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_paths() -> dict[str, Path]:
    """The embedded tiny LLaMA and data (built on first use, deterministic, offline)."""
    from rlhf_overlay.tiny_assets import ensure_tiny_assets
    root = Path(ensure_tiny_assets())
    return {"model": root / "models" / "tiny-llama", "preference": root / "data" / "preference",
            "prompts": root / "data" / "prompts"}


def launcher_prefix(num_gpus: int | None, hostfile: str, master_port: int) -> list[str]:
    """The `deepspeed` launcher (as `python -m deepspeed.launcher.runner`, so the venv's python runs every rank)."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if hostfile:
        cmd += ["--hostfile", str(Path(hostfile).expanduser().resolve())]
    if num_gpus is not None:
        cmd += ["--num_gpus", str(num_gpus)]
    cmd += ["--master_port", str(master_port)]
    return cmd


def launch_env(cpu: bool, offline: bool, run_dir: Path, hostfile: str) -> dict:
    """runtime_env() plus DeepSpeed-Chat on PYTHONPATH; for several nodes a DS_ENV_FILE carrying the cache and
    hub settings to the other nodes (the launcher forwards only PYTHON*/NCCL* variables by itself)."""
    from rlhf_overlay.paths import dschat_dir
    from rlhf_overlay.runs import runtime_env
    env = runtime_env(offline=offline, cpu=cpu)
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(dschat_dir())])
    if hostfile:
        keys = ["TORCH_EXTENSIONS_DIR", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM",
                "DS_ACCELERATOR", "OMP_NUM_THREADS"]
        env_file = run_dir / "deepspeed_env"
        env_file.write_text("".join(f"{k}={env[k]}\n" for k in keys if k in env))
        env["DS_ENV_FILE"] = str(env_file)
    return env


def check_upstream(step_folder: str) -> Path:
    from rlhf_overlay.paths import dschat_dir
    folder = dschat_dir() / step_folder
    if not (folder / "main.py").is_file():
        raise ConfigError(f"DeepSpeed-Chat is not set up ({folder / 'main.py'} is missing); run `make setup` "
                          f"(or `make upstream`) first")
    return folder


def resolve(cfg: RewardModelConfig, cuda: bool) -> dict:
    """The settings this run will use: the recipe, then the user's values, then CPU adjustments."""
    recipe = cfg.recipe or ("llama2-7b" if cfg.model else "tiny")
    r = dict(LLAMA2_7B if recipe == "llama2-7b" else TINY)
    r["recipe"] = recipe
    r["model"] = cfg.model
    for name in ("data", "data_split", "zero_stage", "lora_dim", "epochs", "max_steps", "batch_size", "max_seq_len",
                 "learning_rate", "eval_interval"):
        value = getattr(cfg, name)
        if value not in (None, ""):
            r[name] = value
    if not cfg.data_split and cfg.data and local_data_files(cfg.data) is not None:
        r["data_split"] = "0,1,0"   # the user's own files: all of them train this step (train/eval files split)
    if not cuda:
        if cfg.zero_stage is None:
            r["zero_stage"] = 0
        r["offload"] = False        # CPU: parameters already live in host memory
        if r["zero_stage"] == 3:
            raise ConfigError("zero_stage=3: ZeRO stage 3 fails on CPU with this DeepSpeed; use ZERO_STAGE=0 or 2 on "
                              "CPU (stage 3 is kept for GPU recipes)")
    r["dtype"] = cfg.dtype or ("fp16" if cuda else "fp32")   # CPU: fp32 measured ~2x faster than bf16 here
    if not cuda and r["dtype"] == "fp16":
        raise ConfigError("dtype='fp16': fp16 training is not supported on CPU; use bf16 or fp32")
    if r["offload"] and r["zero_stage"] == 0:
        r["offload"] = False        # ZeRO offload needs stage >= 1
    r["num_gpus"] = cfg.num_gpus if cfg.num_gpus is not None else (None if cuda else 1)
    r["hostfile"] = cfg.hostfile
    r["seed"] = cfg.seed
    r["cuda"] = cuda
    return r


def main_py_args(r: dict, model: str, data: str, output_dir: Path, data_cache: str,
                 tensorboard_dir: Path) -> list[str]:
    """Arguments of step 2's main.py for resolved settings `r`."""
    args = ["--data_path", data, "--data_split", r["data_split"], "--data_output_path", data_cache,
            "--model_name_or_path", model,
            "--per_device_train_batch_size", str(r["batch_size"]),
            "--per_device_eval_batch_size", str(r["eval_batch_size"]),
            "--max_seq_len", str(r["max_seq_len"]), "--learning_rate", str(r["learning_rate"]),
            "--weight_decay", str(r["weight_decay"]), "--num_train_epochs", str(r["epochs"]),
            "--gradient_accumulation_steps", "1", "--lr_scheduler_type", "cosine",
            "--num_warmup_steps", str(r["num_warmup_steps"]), "--seed", str(r["seed"]),
            "--zero_stage", str(r["zero_stage"]), "--dtype", r["dtype"],
            "--eval_interval", str(r["eval_interval"]), "--eval_iters", str(r["eval_iters"]),
            "--print_interval", str(r["print_interval"]),
            "--deepspeed", "--output_dir", str(output_dir), "--tensorboard_path", str(tensorboard_dir)]
    if r["gradient_checkpointing"]:
        args.append("--gradient_checkpointing")
    if r["offload"]:
        args.append("--offload")
    if r["lora_dim"]:
        args += ["--lora_dim", str(r["lora_dim"]), "--lora_module_name", r["lora_module_name"]]
    if r["max_steps"]:
        args += ["--max_steps", str(r["max_steps"])]
    return args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rlhf_overlay.dschat_reward_model",
                                description="DeepSpeed-Chat step 2: LLaMA2 reward model (make rm-llama2).",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    helps = {"model": "base model folder or hub id (empty: embedded tiny LLaMA)",
             "data": "dataset name, .json/.jsonl file or folder with train/eval files (empty: the recipe's)",
             "output": "run folder (empty: a new folder under runs/)",
             "overwrite": "allow writing into a non-empty --output",
             "recipe": "tiny | llama2-7b (default: tiny without --model, llama2-7b with one)",
             "zero_stage": "ZeRO stage (default: 0 on CPU, the recipe's on GPU; 3 refused on CPU)",
             "lora_dim": "LoRA rank, 0 = full fine-tuning (default: the recipe's)",
             "num_gpus": "ranks per node (CPU: processes)", "hostfile": "DeepSpeed hostfile for several nodes",
             "dtype": "bf16 | fp32 | fp16 (default: fp32 on CPU, fp16 on GPU)",
             "data_split": "phase shares a,b,c (default: 0,1,0 for local files, the recipe's otherwise)",
             "epochs": "training epochs", "max_steps": "stop after N optimizer steps (0: all epochs)",
             "batch_size": "per-device batch size", "max_seq_len": "max tokens",
             "learning_rate": "learning rate", "eval_interval": "evaluate every N steps (0: per epoch only)",
             "seed": "training seed", "master_port": "rendezvous port (default: a free port)",
             "dry_run": "print the launch command and exit"}
    for f in fields(RewardModelConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", help=helps[f.name])
        else:
            kind = {"int | None": int, "float | None": float, "int": int}.get(str(f.type), str)
            p.add_argument(flag, type=kind, default=None if kind is not str else "", help=helps[f.name])
    p.add_argument("extra", nargs="*", help="after `--`: more arguments for main.py, passed unchanged")
    return p


def config_from_args(ns: argparse.Namespace) -> RewardModelConfig:
    values = {k: v for k, v in vars(ns).items() if v is not None}
    values["extra"] = list(ns.extra or [])
    return RewardModelConfig(**values)


def run(cfg: RewardModelConfig, argv_for_record: list[str] | None = None) -> int:
    """Train a reward model as `cfg` says; returns the launcher's exit code. Raises ConfigError/RunDirError."""
    from rlhf_overlay.runs import has_cuda, prepare_run_dir, record_invocation, run_logged
    cfg.validate()
    cuda = has_cuda()
    r = resolve(cfg, cuda)
    model, data = cfg.model, cfg.data or r["data"]
    if not model or not data:
        tiny = tiny_paths()
        model = model or str(tiny["model"])
        data = data or str(tiny["preference"])
    n_rows = validate_local_data(data, "data", need_pairs=True)
    folder = check_upstream(STEP_FOLDER)
    if cfg.dry_run:   # show what would run; create nothing
        from rlhf_overlay.paths import RUNS_DIR
        run_dir = Path(cfg.output).expanduser().resolve() if cfg.output else RUNS_DIR / f"{KIND}-<time>"
    else:
        run_dir = prepare_run_dir(KIND, output=cfg.output or None, overwrite=cfg.overwrite)
    model_dir = run_dir / "model"
    multi_node = bool(cfg.hostfile)
    port = cfg.master_port or (29500 if multi_node else free_port())
    # The tokenized-data cache must be node-local (each node's local rank 0 writes it): run folder on one node,
    # /tmp on several (the run folder is then usually on shared storage).
    data_cache = (f"/tmp/rlhf-overlay-data/{run_dir.name}" if multi_node else str(run_dir / "data_cache"))
    cmd = launcher_prefix(r["num_gpus"], cfg.hostfile, port) + ["main.py"] + main_py_args(
        r, model, data, model_dir, data_cache, run_dir / "tensorboard") + list(cfg.extra)
    offline = not any(x and not looks_local(x) for x in (model, data))
    resolved = dict(r, model=model, data=data, data_rows=n_rows, run_dir=str(run_dir), model_dir=str(model_dir),
                    master_port=port, launch_command=cmd, launch_cwd=str(folder), extra=list(cfg.extra),
                    hf_hub_offline=offline, requested=asdict(cfg))
    if cfg.dry_run:
        print(shlex.join(cmd))
        return 0
    record_invocation(run_dir, argv_for_record or [sys.executable, "-m", MODULE, *cfg.to_argv()], resolved)
    env = launch_env(cpu=not cuda, offline=offline, run_dir=run_dir, hostfile=cfg.hostfile)
    print(f"[{KIND}] run folder: {run_dir}  (recipe {r['recipe']}, model {model}, data {data}, dtype {r['dtype']}, "
          f"ZeRO {r['zero_stage']}, LoRA {r['lora_dim']})", flush=True)
    rc = run_logged(cmd, run_dir, env=env, cwd=folder)
    if rc == 0:
        results = model_dir / "eval_results.json"
        if results.is_file():
            acc = json.loads(results.read_text()).get("eval/acc")
            print(f"[{KIND}] done: eval accuracy {acc:.3f}; reward model in {model_dir}", flush=True)
    else:
        print(f"[{KIND}] failed with exit code {rc}; see {run_dir / 'training.log'}", file=sys.stderr, flush=True)
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    from rlhf_overlay.preference_data import PreferenceDataError
    from rlhf_overlay.runs import RunDirError
    try:
        cfg = config_from_args(ns)
        return run(cfg, argv_for_record=[sys.executable, "-m", MODULE, *(sys.argv[1:] if argv is None else argv)])
    except (ConfigError, RunDirError, PreferenceDataError) as e:   # messages made for the user
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
