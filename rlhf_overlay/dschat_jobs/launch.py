"""What every DeepSpeed-Chat entry module (`make rm-llama2`, `make ppo-llama2`, `make dpo-llama2`) shares: the
config error type and checks, local model/data validation, the embedded tiny assets, the `deepspeed` launcher
command and environment, the run folder (the config dataclasses' command line is rlhf_overlay.settings').

An entry module keeps only what is its own: the config dataclass (one field per setting, help in its metadata), its
recipes, `resolve()` and the arguments of its step's main.py. Typical use:

    cfg.validate()                                   # uses check_common(), check_model_folder(), ...
    r = resolve(cfg, cuda)                           # recipe -> user values -> cpu_adjust(r, cfg, cuda)
    plan = plan_run(KIND, cfg, r, step_folder)       # run folder, port, data cache, launcher prefix
    cmd = plan.launcher + ["main.py", *main_py_args(...)]
    return launch(KIND, MODULE, cfg, plan, cmd, resolved, argv_for_record, offline)

Nothing here imports torch, deepspeed or transformers at module level (`--help` stays instant).
"""
from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from rlhf_overlay.errors import ConfigError  # ConfigError is re-exported for the entry modules

RECIPES = ("tiny", "llama2-7b")
DTYPES = ("bf16", "fp32", "fp16")
DATA_SUFFIXES = (".jsonl", ".json")


# ---------------------------------------------------------------------------------------------- settings
@dataclass
class DSChatConfig:
    """The settings every DeepSpeed-Chat job takes; each job's dataclass (reward_model.RewardModelConfig,
    ppo.PPOConfig, dpo.DPOConfig) adds its own, which --help lists first (rlhf_overlay.settings)."""
    output: str = field(default="", metadata={"help": "run folder (OUTPUT; empty: a new runs/<target>-<time>)"})
    overwrite: bool = field(default=False, metadata={"help": "allow writing into a non-empty --output (OVERWRITE=1)"})
    recipe: str = field(default="", metadata={"help": "tiny | llama2-7b (default: tiny without a model of your own, "
                                                      "llama2-7b with one)"})
    recipe_at_tiny_scale: bool = field(default=False, metadata={"help": "the llama2-7b recipe's DeepSpeed settings "
                                                                       "(ZeRO, offload, gradient checkpointing, LoRA) on "
                                                                       "the tiny LLaMA, 2 CPU ranks "
                                                                       "(RECIPE_AT_TINY_SCALE=1; see tiny_scale.py)"})
    zero_stage: int | None = field(default=None, metadata={"help": "ZeRO stage, of actor and critic in ppo-llama2 "
                                                                   "(ZERO_STAGE; default: 0 on CPU, the recipe's on "
                                                                   "GPU; 2 and 3 run on CPU too)"})
    num_gpus: int | None = field(default=None, metadata={"help": "ranks per node (NUM_GPUS; CPU: processes; default: "
                                                                 "1 on CPU, all GPUs on GPU)"})
    hostfile: str = field(default="", metadata={"help": "DeepSpeed hostfile for several nodes, `host slots=N` lines "
                                                        "(HOSTFILE)"})
    dtype: str = field(default="", metadata={"help": "bf16 | fp32 | fp16 (default: fp32 on CPU, fp16 on GPU as "
                                                     "upstream)"})
    seed: int = field(default=1234, metadata={"help": "training seed"})
    checkpoint_every: int | None = field(default=None, metadata={
        "help": "resumable checkpoint into <run>/checkpoints/step-N every N steps (optimizer steps; PPO steps in "
                "ppo-llama2) (CHECKPOINT_EVERY; 0: by time only; default: 20 on the tiny recipe, 10 for ppo-llama2, "
                "0 on llama2-7b)"})
    checkpoint_minutes: float | None = field(default=None, metadata={
        "help": "also a checkpoint when this many minutes passed since the last one (CHECKPOINT_MINUTES; 0: by "
                "steps only; default: 30)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "complete checkpoints kept, newest first "
                                                               "(KEEP_CHECKPOINTS)"})
    resume: str = field(default="", metadata={"help": "continue the run in this run folder from its newest complete "
                                                      "checkpoint (RESUME); other settings default to the run's"})
    allow_arch: bool = field(default=False, metadata={"help": "run a model that is not LLaMA-family anyway "
                                                              "(ALLOW_ARCH=1)"})
    on_unhealthy: str = field(default="auto", metadata={"help": "stop | warn when a health guard trips (ON_UNHEALTHY; "
                                                                "dschat/utils/health_guard.py); auto = warn tiny / "
                                                                "stop own model"})
    master_port: int | None = field(default=None, metadata={"help": "rendezvous port (default: a free port on one "
                                                                    "node, 29500 on several)"})
    dry_run: bool = field(default=False, metadata={"help": "print the resolved settings and the launch command(s); "
                                                           "run nothing, create nothing"})
    extra: list[str] = field(default_factory=list, metadata={"help": "after `--`: more main.py arguments, passed "
                                                                     "unchanged", "rest": True})

    def to_argv(self) -> list[str]:
        """Command-line flags that reproduce this config (for command.txt of a run started from Python)."""
        return config_to_argv(self)


def health_flags(cfg, r: dict) -> list[str]:
    """main.py's health-guard flags (DeepSpeedExamples patch 0024). on_unhealthy auto = warn on the tiny recipe (a
    demonstration, judged at its end by the verdict, better read to its end than cut at a noisy step) and stop with
    a model of your own, as for trlx; PPO also passes its bounds. The resolved mode goes into `r` (config.json)."""
    mode = cfg.on_unhealthy if cfg.on_unhealthy != "auto" else ("warn" if r.get("recipe") == "tiny" else "stop")
    r["on_unhealthy"] = mode
    flags = ["--on_unhealthy", mode]
    for name in ("max_kl_per_token", "max_degenerate", "max_undecodable", "max_reward_drop"):
        if hasattr(cfg, name):
            flags += [f"--{name}", str(getattr(cfg, name))]
    return flags


# ---------------------------------------------------------------------------------------------- checks
from rlhf_overlay.paths import looks_local  # noqa: E402,F401  (the one local-path vs hub-id rule; entry modules import it here)


def check_model_folder(name: str, field_name: str) -> None:
    """A local model folder must exist and hold config.json; hub ids are left to transformers, and a missing relative
    path to the preflight (rlhf_overlay.runtime.preflight), which names the folder that was probably meant."""
    path = Path(name).expanduser()
    if not looks_local(name) or not (path.is_absolute() or path.exists()):
        return
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


def check_common(cfg) -> None:
    """The checks of the settings all DeepSpeed-Chat configs share (each only if the config has that field)."""
    def has(name):
        return hasattr(cfg, name) and getattr(cfg, name) not in (None, "")

    if has("recipe") and cfg.recipe not in RECIPES:
        raise ConfigError(f"recipe={cfg.recipe!r}: choose one of {', '.join(RECIPES)}")
    if has("dtype") and cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype={cfg.dtype!r}: choose one of {', '.join(DTYPES)}")
    if has("zero_stage") and cfg.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_stage={cfg.zero_stage!r}: ZeRO stages are 0, 1, 2 or 3")
    if has("lora_dim") and cfg.lora_dim < 0:
        raise ConfigError(f"lora_dim={cfg.lora_dim!r}: must be >= 0 (0 = no LoRA)")
    if has("max_steps") and cfg.max_steps < 0:
        raise ConfigError(f"max_steps={cfg.max_steps!r}: must be >= 0 (0 = all epochs)")
    if has("on_unhealthy") and cfg.on_unhealthy not in ("auto", "stop", "warn"):
        raise ConfigError(f"on_unhealthy (ON_UNHEALTHY)={cfg.on_unhealthy!r}: must be stop, warn or auto")
    for name in ("num_gpus", "epochs", "batch_size", "max_seq_len"):
        if has(name) and getattr(cfg, name) < 1:
            raise ConfigError(f"{name}={getattr(cfg, name)!r}: must be >= 1")
    if has("eval_interval") and cfg.eval_interval < 0:
        raise ConfigError(f"eval_interval={cfg.eval_interval!r}: must be >= 0")
    for name in ("learning_rate", "lora_learning_rate"):
        if has(name) and not getattr(cfg, name) > 0:
            raise ConfigError(f"{name}={getattr(cfg, name)!r}: must be > 0")
    if has("data_split"):
        check_data_split(cfg.data_split)
    if has("hostfile") and not Path(cfg.hostfile).expanduser().is_file():
        raise ConfigError(f"hostfile={cfg.hostfile!r}: no such file (DeepSpeed hostfile, `host slots=N` lines)")
    if has("master_port") and not 0 < cfg.master_port < 65536:
        raise ConfigError(f"master_port={cfg.master_port!r}: must be a TCP port (1-65535)")


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


def validate_local_data(data: str, need_pairs: bool) -> int:
    """Validate every row of a local data path before launching (errors say file:line); returns the row count.
    Preference rows when `need_pairs`, else prompt rows (preference rows pass too). Dataset names (hub) are
    left to DeepSpeed-Chat."""
    files = local_data_files(data)
    if files is None:
        return 0
    from rlhf_overlay.data import preference_data
    load = preference_data.load_preference_rows if need_pairs else preference_data.load_prompt_rows
    return sum(len(load(str(path))) for path in set(files.values()))


def cpu_adjust(r: dict, cfg, cuda: bool) -> dict:
    """Resolved settings `r` made to run where we are: on CPU ZeRO 0 unless asked (2 and 3 run too), no offload,
    fp16 refused with what to use instead; dtype fp32 on CPU (measured ~2x faster than bf16 for the tiny model),
    fp16 on GPU as upstream; the rank count, hostfile, seed. What a GPU recipe loses on CPU is listed in
    r["cpu_notes"] (printed by launch(); the caller may have put notes there already)."""
    notes = r.setdefault("cpu_notes", [])
    if not cuda:
        if getattr(cfg, "zero_stage", None) is None:
            if r["zero_stage"]:
                notes.append(f"ZeRO-{r['zero_stage']} -> 0: the {r.get('recipe')} recipe's stage is for GPUs; "
                             f"ZERO_STAGE=2 or 3 run on CPU too")
            r["zero_stage"] = 0
        if "offload" in r:
            if r["offload"]:
                notes.append("--offload dropped: on CPU the parameters and optimizer state already live in host memory")
            r["offload"] = False        # CPU: parameters already live in host memory
        if r.get("recipe") != "tiny" and not cfg.dtype:
            notes.append("dtype fp16 -> fp32: fp16 training needs a GPU")
        # ZeRO-3 (and ZeRO-3 + offload, `-- --offload`) runs on CPU ranks: tests/test_dschat_zero3.py
    r["dtype"] = cfg.dtype or ("fp16" if cuda else "fp32")
    if not cuda and r["dtype"] == "fp16":
        raise ConfigError("dtype='fp16': fp16 training is not supported on CPU; use bf16 or fp32")
    if r.get("offload") and r["zero_stage"] == 0:
        r["offload"] = False            # ZeRO offload needs stage >= 1
    # ranks per node: NUM_GPUS; else the hostfile's slots, all GPUs, or 1 process on CPU
    r["num_gpus"] = cfg.num_gpus if cfg.num_gpus is not None else (None if cuda or cfg.hostfile else 1)
    from rlhf_overlay.runtime.runs import rank_count_problem
    problem = rank_count_problem(cfg.num_gpus, cuda, what="num_gpus (NUM_GPUS)")
    if not problem and cfg.hostfile and cfg.num_gpus is None and Path(cfg.hostfile).expanduser().is_file():
        from rlhf_overlay.runtime.hostfile import local_slots_problem
        problem = local_slots_problem(cfg.hostfile, cuda)
    if problem:
        raise ConfigError(problem)
    r["hostfile"] = cfg.hostfile
    r["seed"] = cfg.seed
    r["cuda"] = cuda
    return r


# ---------------------------------------------------------------------------------------------- launching
def step2_main_py_args(r: dict, model: str, data: str, output_dir: Path, data_cache: str,
                       tensorboard_dir: Path, own: tuple[str, ...] = (), lora_own: tuple[str, ...] = ()) -> list[str]:
    """Arguments of a step-2 main.py for resolved settings `r`: the reward model's, with a job's `own` arguments
    after the seed and `lora_own` after the LoRA ones (DPO: --beta; the LoRA learning rate)."""
    args = ["--data_path", data, "--data_split", r["data_split"], "--data_output_path", data_cache,
            "--model_name_or_path", model,
            "--per_device_train_batch_size", str(r["batch_size"]),
            "--per_device_eval_batch_size", str(r["eval_batch_size"]),
            "--max_seq_len", str(r["max_seq_len"]), "--learning_rate", str(r["learning_rate"]),
            "--weight_decay", str(r["weight_decay"]), "--num_train_epochs", str(r["epochs"]),
            "--gradient_accumulation_steps", "1", "--lr_scheduler_type", "cosine",
            "--num_warmup_steps", str(r["num_warmup_steps"]), "--seed", str(r["seed"]), *own,
            "--zero_stage", str(r["zero_stage"]), "--dtype", r["dtype"],
            "--eval_interval", str(r["eval_interval"]), "--eval_iters", str(r["eval_iters"]),
            "--print_interval", str(r["print_interval"]),
            "--deepspeed", "--output_dir", str(output_dir), "--tensorboard_path", str(tensorboard_dir)]
    if r["gradient_checkpointing"]:
        args.append("--gradient_checkpointing")
    if r["offload"]:
        args.append("--offload")
    if r["lora_dim"]:
        args += ["--lora_dim", str(r["lora_dim"]), "--lora_module_name", r["lora_module_name"], *lora_own]
    if r["max_steps"]:
        args += ["--max_steps", str(r["max_steps"])]
    return args


from rlhf_overlay.runtime.runs import free_port  # noqa: E402,F401  (entry modules and benchmarks import it here)


def tiny_paths() -> dict[str, Path]:
    """The embedded tiny LLaMA and data (built on first use, deterministic, offline)."""
    from rlhf_overlay.data.tiny_assets import ensure_tiny_assets
    root = Path(ensure_tiny_assets())
    return {"model": root / "models" / "tiny-llama", "preference": root / "data" / "preference",
            "prompts": root / "data" / "prompts"}


def launcher_prefix(num_gpus: int | None, hostfile: str, master_port: int, flags: list[str] | None = None) -> list[str]:
    """The `deepspeed` launcher (as `python -m deepspeed.launcher.runner`, so the venv's python runs every rank).
    Not torchrun: the step scripts initialise distributed only when given --local_rank, which deepspeed passes."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if hostfile:
        cmd += ["--hostfile", str(Path(hostfile).expanduser().resolve()), *(flags or [])]
    if num_gpus is not None:
        cmd += ["--num_gpus", str(num_gpus)]
    cmd += ["--master_port", str(master_port)]
    return cmd


def launch_env(cpu: bool, offline: bool, run_dir: Path, hostfile: str) -> dict:
    """runtime_env() plus DeepSpeed-Chat on PYTHONPATH; for several nodes a DS_ENV_FILE carrying the cache and
    hub settings to the other nodes (the launcher forwards only PYTHON*/NCCL* variables by itself)."""
    from rlhf_overlay.paths import dschat_dir
    from rlhf_overlay.runtime.runs import runtime_env
    env = runtime_env(offline=offline, cpu=cpu)
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(dschat_dir())])
    if hostfile:
        from rlhf_overlay.runtime.hostfile import remote_env
        env = remote_env(env, run_dir)
    return env


def check_upstream(step_folder: str) -> Path:
    """The step's folder in the DeepSpeed-Chat work tree, or a ConfigError saying how to set it up."""
    from rlhf_overlay.paths import dschat_dir
    folder = dschat_dir() / step_folder
    if not (folder / "main.py").is_file():
        raise ConfigError(f"DeepSpeed-Chat is not set up ({folder / 'main.py'} is missing); run `make setup` "
                          f"(or `make upstream`) first")
    return folder


@dataclass
class RunPlan:
    """Where and how one run goes: its folder, rendezvous port, tokenized-data cache and launcher prefix."""
    run_dir: Path
    port: int
    data_cache: str
    launcher: list[str]
    cwd: Path
    resume_from: str | None = None  # RESUME: the checkpoint the run continues from


def plan_run(kind: str, cfg, r: dict, step_folder: str, resume_dir: Path | None = None) -> RunPlan:
    """Check the upstream step exists, then make the run folder (refusing a non-empty OUTPUT without
    OVERWRITE; a dry run creates nothing), or for a resume take `resume_dir` and its newest complete checkpoint. The data cache must be node-local (each node's local rank 0 writes
    it): the run folder on one node, /tmp on several (the run folder is then usually on shared storage)."""
    from rlhf_overlay.paths import RUNS_DIR
    from rlhf_overlay.runtime.runs import prepare_run_dir
    folder = check_upstream(step_folder)
    # a hostfile is checked (format, first host, remote hosts reachable) before the run folder is made
    from rlhf_overlay.runtime.hostfile import deepspeed_launcher_flags
    flags = deepspeed_launcher_flags(cfg.hostfile) if cfg.hostfile else []
    resume_from = None
    if cfg.dry_run:
        run_dir = resume_dir or (Path(cfg.output).expanduser().resolve() if cfg.output else RUNS_DIR / f"{kind}-<time>")
    elif resume_dir is not None:
        from rlhf_overlay.dschat_jobs.resume import open_run
        run_dir, resume_from = open_run(resume_dir)
    else:
        run_dir = prepare_run_dir(kind, output=cfg.output or None, overwrite=cfg.overwrite)
    multi_node = bool(cfg.hostfile) and "--no_ssh_check" not in flags   # this machine alone runs locally
    from rlhf_overlay.runtime.hostfile import rendezvous_port
    port = cfg.master_port or (rendezvous_port(cfg.hostfile) if multi_node else free_port())
    data_cache = f"/tmp/rlhf-overlay-data/{run_dir.name}" if multi_node else str(run_dir / "data_cache")
    return RunPlan(run_dir=run_dir, port=port, data_cache=data_cache,
                   launcher=launcher_prefix(r["num_gpus"], cfg.hostfile, port, flags), cwd=folder,
                   resume_from=resume_from)


def launch(kind: str, module: str, cfg, plan: RunPlan, cmd: list[str], resolved: dict,
           argv_for_record: list[str] | None, offline: bool, summary: str) -> int:
    """Print the command (dry run) or record command.txt/config.json and run it, streaming to the terminal and
    training.log; returns the launcher's exit code."""
    from rlhf_overlay.runtime.runs import record_invocation, run_logged
    if cfg.dry_run:
        from rlhf_overlay.settings import print_dry_run
        print_dry_run(kind, resolved, cmd, plan.cwd)
        return 0
    argv = argv_for_record or [sys.executable, "-m", module, *config_to_argv(cfg)]
    if plan.resume_from:  # command.txt keeps both invocations; training.log (appended) says where it continues
        from rlhf_overlay.dschat_jobs.resume import record
        record(plan.run_dir, argv, dict(resolved, requested=asdict(cfg)))
        print(f"[{kind}] resuming {plan.run_dir} from {Path(plan.resume_from).name}", flush=True)
    else:
        record_invocation(plan.run_dir, argv, dict(resolved, requested=asdict(cfg)))
    env = launch_env(cpu=not resolved["cuda"], offline=offline, run_dir=plan.run_dir, hostfile=cfg.hostfile)
    from rlhf_overlay.runtime.waits import check_torch_extensions
    check_torch_extensions(env["TORCH_EXTENSIONS_DIR"])  # a stale op-build lock would hang DeepSpeed silently
    for note in resolved.get("cpu_notes") or []:
        print(f"[{kind}] note (CPU): {note}", flush=True)
    print(f"[{kind}] run folder: {plan.run_dir}  ({summary})", flush=True)
    from rlhf_overlay.runtime import status   # status.json: running -> completed / failed / interrupted (exit code, signal)
    status.start(plan.run_dir, kind, module, None, resumed=bool(plan.resume_from),
                 resumable="checkpoint_every" in resolved)  # entries that pass the checkpoint flags to main.py
    with status.interrupt_finishes(plan.run_dir):
        rc = run_logged(cmd, plan.run_dir, env=env, cwd=plan.cwd, on_sigterm=None if cfg.hostfile else signal_ranks)
    status.finish(plan.run_dir, rc)
    if rc != 0:
        print(f"[{kind}] failed with exit code {rc}; see {plan.run_dir / 'training.log'}", file=sys.stderr,
              flush=True)
    return rc


def signal_ranks(proc) -> None:
    """SIGTERM to the ranks of a one-node `deepspeed` launch (the children of deepspeed.launcher.launch). The runner
    does not forward it on one node (it would die, leaving its ranks unaware), and launch.py would kill the ranks 30 s
    later; told directly, each rank checkpoints at its next step boundary and exits 143, and the launchers end with
    that code. Several nodes: DeepSpeed's runner handles the signal itself (pdsh), as before."""
    import signal

    import psutil
    ranks = []
    try:
        for p in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "deepspeed.launcher.launch" in " ".join(p.parent().cmdline()):
                    ranks.append(p)
            except (psutil.Error, AttributeError):
                continue
    except psutil.Error:
        pass
    for p in ranks:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    if not ranks:  # not started yet, or already gone: the launcher itself
        proc.send_signal(signal.SIGTERM)


# ---------------------------------------------------------------------------------------------- command line
# The config dataclasses' flags, --config files and help come from rlhf_overlay.settings; config_to_argv is its
# to_argv (the flags that reproduce a config, for command.txt of a run started from Python).
from rlhf_overlay.settings import to_argv as config_to_argv  # noqa: E402,F401
