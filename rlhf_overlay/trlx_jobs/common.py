"""Shared pieces of the trlx targets (rm-bloom, rm-gptj, ppo-bloom, ppo-gptj, ppo-smoke-test).

- where trlx comes from (the set-up `upstream/trlx`, pin + our patches) and a clear error when it is missing;
- launch commands: plain `python -m` for one CPU process, `accelerate launch` (PPO) or `torchrun`/`deepspeed`
  (reward models, HF Trainer) for several processes, GPUs, DeepSpeed and multi-node (a DeepSpeed hostfile);
- the project's common tensorboard names, written next to the framework's own scalars;
- the CPU/DeepSpeed process-group fix accelerate needs (see `cpu_deepspeed_backend_fix`).

Nothing here imports torch/transformers/trlx at module import time, so `--help` stays instant.
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, NoReturn, Sequence

from rlhf_overlay import PROJECT_ROOT
from rlhf_overlay.paths import looks_local, trlx_dir
from rlhf_overlay.errors import ConfigError, UserError  # ConfigError is re-exported for the entry modules
from rlhf_overlay.runtime.runs import free_port  # noqa: F401  (re-exported: launch commands, seed_launch, tests)

ACCELERATE_CONFIGS = PROJECT_ROOT / "configs" / "accelerate"
ARCHES = ("bloom", "gptj", "llama")
TINY_MODEL_DIRS = {"bloom": "tiny-bloom", "gptj": "tiny-gptj", "llama": "tiny-llama"}
# A function our patch series adds; its presence tells "trlx at the pin + our patches" from a plain trlx.
_PATCH_MARKER = ("trlx/models/modeling_base.py", "_load_checkpoint_state_dict")


class TrlxSetupError(UserError, RuntimeError):
    """trlx is not importable or lacks our patches; the message says which command fixes it."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix (bad setting, data row, run folder, hostfile, setup): printed as
    `error: ...` with exit code 2, without a traceback."""
    return (UserError,)


# ----------------------------------------------------------------------------------------------- locating trlx
def trlx_source_root() -> Path:
    """The folder that holds the `trlx` package: the installed one if pip knows it, else upstream/trlx."""
    spec = importlib.util.find_spec("trlx")
    if spec is not None and spec.origin:
        return Path(spec.origin).resolve().parent.parent
    tree = trlx_dir()
    if (tree / "trlx" / "__init__.py").is_file():
        return tree
    raise TrlxSetupError(
        f"trlx is not set up: {tree} does not exist and trlx is not installed. Run `make setup` (or "
        f"`make upstream` to only check out trlx at the pin with our patches).")


def check_trlx() -> Path:
    """Return the trlx source root after checking it carries our patch series (overlays/trlx/patches)."""
    root = trlx_source_root()
    rel, marker = _PATCH_MARKER
    f = root / rel
    if not f.is_file() or marker not in f.read_text(errors="replace"):
        raise TrlxSetupError(
            f"trlx at {root} lacks our compatibility patches (overlays/trlx/patches): run `make upstream` "
            f"(it checks out the pin and applies them), then `make verify`.")
    return root


def trlx_env(base: Mapping[str, str] | None = None, cpu: bool | None = None, offline: bool = True) -> dict:
    """`runs.runtime_env()` plus trlx on PYTHONPATH (when it is not pip-installed) and quiet trlx/W&B."""
    from rlhf_overlay.runtime.runs import runtime_env

    env = runtime_env(base, cpu=cpu, offline=offline)
    root = check_trlx()
    if importlib.util.find_spec("trlx") is None:
        env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(root)])
    env.setdefault("WANDB_DISABLED", "true")
    env.setdefault("WANDB_MODE", "disabled")
    env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    return env


def import_trlx():
    """Import trlx inside a worker (adds upstream/trlx to sys.path when it is not installed)."""
    root = check_trlx()
    if importlib.util.find_spec("trlx") is None:
        sys.path.insert(0, str(root))
    import trlx  # noqa: F401

    return trlx


# ----------------------------------------------------------------------------------------------- settings
def bad(name: str, value, why: str) -> NoReturn:
    """Refuse one setting: `name=value: why` (printed as one `error:` line, exit 2)."""
    raise ConfigError(f"{name}={value!r}: {why}")


@dataclass
class RunSettings:
    """The settings both trlx jobs (reward_model, ppo) take alike: the run folder, checkpoints and RESUME, ranks.
    Each job's config dataclass adds its own (listed first by --help; it declares `arch` and `model`) and calls
    resolve_run, check_arch, check_inputs and validate_run."""
    overwrite: bool = field(default=False, metadata={"help": "write into a non-empty OUTPUT (OVERWRITE=1)"})
    checkpoint_minutes: float = field(default=-1.0, metadata={"help": "also a checkpoint when this many minutes passed since the last one (CHECKPOINT_MINUTES); 0 = by steps only; -1 = 30"})
    keep_checkpoints: int = field(default=2, metadata={"help": "complete checkpoints kept, newest first (KEEP_CHECKPOINTS)"})
    resume: str = field(default="", metadata={"help": "continue the run in this run folder from its newest complete checkpoint (RESUME); other settings default to the run's"})
    num_processes: int = field(default=0, metadata={"help": "processes on this node (NUM_GPUS); 0 = all GPUs, or 1 on CPU"})
    hostfile: str = field(default="", metadata={"help": "DeepSpeed hostfile (`host slots=N` per line) for several nodes (HOSTFILE)"})

    @property
    def tiny(self) -> bool:
        """No MODEL: the embedded tiny default (its own defaults); else the seed's recipe for own models."""
        return not self.model

    def resolve_run(self, checkpoint_every_tiny: int) -> None:
        """In place: checkpoint_every -1 = `checkpoint_every_tiny` tiny / 0 own model; checkpoint_minutes -1 = 30;
        on_unhealthy auto = warn tiny (demos are read to their end) / stop own model; then the schedule is checked."""
        from rlhf_overlay.runtime.checkpoints import validate_schedule

        if self.checkpoint_every < 0:
            self.checkpoint_every = checkpoint_every_tiny if self.tiny else 0
        self.checkpoint_minutes = 30.0 if self.checkpoint_minutes < 0 else self.checkpoint_minutes
        if self.on_unhealthy == "auto":
            self.on_unhealthy = "warn" if self.tiny else "stop"
        if self.on_unhealthy not in ("stop", "warn"):
            raise ConfigError(f"on_unhealthy (ON_UNHEALTHY)={self.on_unhealthy!r}: must be stop, warn or auto")
        validate_schedule(self.checkpoint_every, self.checkpoint_minutes, self.keep_checkpoints)

    def check_arch(self) -> None:
        if self.arch not in ARCHES:
            bad("arch", self.arch, f"must be one of {', '.join(ARCHES)}")

    def check_inputs(self, *data_fields: str) -> None:
        """MODEL is an existing folder or a hub id; each of `data_fields` (DATA, eval data) is empty or exists."""
        if self.model and looks_local(self.model) and not Path(self.model).expanduser().exists():
            bad("model (MODEL)", self.model, "no such folder — give a model folder, a run folder holding one, or a hub "
                "id such as bigscience/bloom-560m (a relative path is taken from the current folder)")
        for name in data_fields:
            v = getattr(self, name)
            if v and not Path(v).expanduser().exists():
                bad(f"{name} (DATA)" if name == "data" else name, v, "no such file or folder — pass a .json/.jsonl "
                    "file or a folder with train.jsonl (a relative path is taken from the current folder)")

    def validate_run(self) -> None:
        if self.num_processes < 0:
            raise ConfigError(f"num_processes (NUM_GPUS)={self.num_processes!r}: must be >= 1 (or empty for the default)")
        if self.hostfile and not Path(self.hostfile).is_file():
            raise ConfigError(f"hostfile (HOSTFILE)={self.hostfile!r}: file does not exist")


# ----------------------------------------------------------------------------------------------- models
def tiny_model_path(arch: str) -> str:
    """The embedded tiny model of `arch` (built on first use, offline)."""
    from rlhf_overlay.data.tiny_assets import ensure_tiny_assets

    return str(ensure_tiny_assets() / "models" / TINY_MODEL_DIRS[arch])


def needs_hub(*values: str) -> bool:
    """Whether any of these MODEL/RM/DATA values is a hub id (rlhf_overlay.paths.looks_local): the workers then run
    online; with everything local they run offline (HF_HUB_OFFLINE=1), so nothing tries the hub."""
    from rlhf_overlay.paths import looks_local

    return any(v and not looks_local(v) for v in values)


# ------------------------------------------------------------------------------------------ launch commands
def default_accelerate_config(cuda: bool, deepspeed: bool, zero_stage: int = 2) -> Path:
    if deepspeed:
        return ACCELERATE_CONFIGS / ("zero3.yaml" if zero_stage == 3 else "zero2.yaml")
    return ACCELERATE_CONFIGS / ("multi_gpu.yaml" if cuda else "cpu.yaml")


def accelerate_command(module: str, args: Sequence[str], *, config_file: Path | None, num_processes: int,
                       mixed_precision: str | None = None, machine_config: bool = False,
                       python: str | None = None) -> list[str]:
    """How to start `python -m module args` for trlx: plain python for one process without a config file,
    else `accelerate launch` with our config file (num_processes overrides the file's). A `machine_config` (one
    machine of several, from rlhf_overlay.runtime.hostfile.accelerate_configs) is used as it is."""
    py = python or sys.executable
    if config_file is None and num_processes == 1:
        return [py, "-m", module, *args]
    cmd = [py, "-m", "accelerate.commands.launch"]
    if config_file is not None:
        cmd += ["--config_file", str(config_file)]
    if not machine_config:
        cmd += ["--num_processes", str(num_processes), "--main_process_port", str(free_port())]
    if mixed_precision:
        cmd += ["--mixed_precision", mixed_precision]
    # torchrun's rendezvous of the machines (static, before any worker starts) is bounded like the workers' own
    from rlhf_overlay.runtime.waits import dist_timeout
    cmd += ["--rdzv_conf", f"timeout={dist_timeout()}"]
    return cmd + ["-m", module, *args]


def trainer_command(module: str, args: Sequence[str], *, num_processes: int, deepspeed: bool,
                    hostfile: str | None = None, python: str | None = None) -> list[str]:
    """How to start an HF-Trainer worker: plain python for one process without DeepSpeed, `torchrun` on one
    node (DeepSpeed reads the distributed env vars it sets), DeepSpeed's launcher with a hostfile (checked first:
    a hostfile of this machine alone runs without ssh; remote hosts must be reachable)."""
    py = python or sys.executable
    if hostfile:
        from rlhf_overlay.runtime.hostfile import deepspeed_launcher_flags, rendezvous_port

        flags = deepspeed_launcher_flags(hostfile)
        port = str(free_port() if "--no_ssh_check" in flags else rendezvous_port(hostfile))
        # --no_local_rank: the worker reads LOCAL_RANK from the environment (its parser has no --local_rank)
        return [py, "-m", "deepspeed.launcher.runner", "--hostfile", str(Path(hostfile).resolve()),
                "--master_port", port, *flags, "--no_local_rank", "--module", module, *args]
    if num_processes == 1 and not deepspeed:
        return [py, "-m", module, *args]
    return [py, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(num_processes),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", module, *args]


def cpu_deepspeed_backend_fix() -> None:
    """Make every rank of a CPU run see the same world as the launcher started (call before trlx builds its
    Accelerator):
    - with DeepSpeed, accelerate picks no process-group backend on CPU (it only knows GPU backends there), so it
      counts one process while DeepSpeed runs gloo with several: collectives then fail ("invalid output tensor
      list"). Creating the shared state with backend="gloo" first fixes both views.
    - without DeepSpeed, accelerate treats torchrun's ranks as distributed only when told it is on CPU
      (ACCELERATE_USE_CPU); otherwise every rank silently trains alone on all the data (measured: two
      identical single-process runs).
    Every rank (CPU or GPU) first signs in (rlhf_overlay.runtime.waits.roll_call: a rank that never arrives is named), and
    the process group gets the RLHF_DIST_TIMEOUT timeout (accelerate's InitProcessGroupKwargs) for the
    rendezvous and every collective, instead of hanging on a dead rank."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import InitProcessGroupKwargs

    from rlhf_overlay.runtime.waits import dist_timeout, roll_call

    cuda = torch.cuda.is_available()
    seconds = dist_timeout(cuda)
    timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=seconds)).to_kwargs()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        roll_call(seconds)
    if cuda:
        if distributed:
            PartialState(**timeout)
        return
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        PartialState(backend="gloo", **timeout)
    elif distributed:
        os.environ["ACCELERATE_USE_CPU"] = "true"
        PartialState(cpu=True, **timeout)


# Why the trlx reward models refuse (and the seed's `deepspeed train_reward_model_*.py` turns down) ZeRO stage 3 on
# CPU; one sentence for every message. trlx PPO runs ZeRO-3 on CPU (tests/test_trlx_zero3.py, trlx patch 0014).
# Measured with the HF Trainer of transformers 4.44: two CPU ranks fail at any ZeRO stage in the evaluation's gather
# ("invalid output tensor list": the Trainer's accelerate state counts one process on CPU under DeepSpeed), and one
# rank partitions nothing (it trains at ZeRO-3 with --eval-before no: eval accuracy 1.000 on the tiny BLOOM).
ZERO3_ON_CPU = "ZeRO stage 3 fails on CPU for the trlx reward models (HF Trainer; measured)"


def deepspeed_cpu_problem(ds_config: Mapping, source: str, zero3: bool = False) -> str | None:
    """What in a DeepSpeed config fails on CPU (the hybrid engine; ZeRO-3 unless `zero3`: trlx PPO runs it), or
    None. `ds_config` is a DeepSpeed JSON dict or an accelerate `deepspeed_config` section (zero_stage key)."""
    zero = ds_config.get("zero_optimization", {}) if isinstance(ds_config.get("zero_optimization"), Mapping) else {}
    stage = zero.get("stage", ds_config.get("zero_stage"))
    if str(stage) == "3" and not zero3:
        return f"{source}: {ZERO3_ON_CPU}; use ZERO_STAGE=0 or 2 on CPU (stage 3 is for GPU runs)"
    hybrid = ds_config.get("hybrid_engine", {})
    if isinstance(hybrid, Mapping) and hybrid.get("enabled"):
        return f"{source}: DeepSpeed's hybrid engine needs a GPU; remove hybrid_engine.enabled on CPU"
    return None


def check_world_size(num_processes: int) -> None:
    """Refuse to train when accelerate's view of the world differs from the launcher's (WORLD_SIZE): a rank that
    believes it is alone would train on all the data and write every output itself."""
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if num_processes != expected:
        raise RuntimeError(f"accelerate sees {num_processes} process(es) but the launcher started {expected} "
                           f"(WORLD_SIZE); the ranks would train independently. Check the accelerate config "
                           f"(distributed_type) and, on CPU, ACCELERATE_USE_CPU=true.")


# ------------------------------------------------------------------------------------------- common scalars
class CommonScalars:
    """Writes the project's common tensorboard names (rm/*, ppo/*) into `<run>/tensorboard/` (main process only);
    `make report` reads them next to each framework's own scalars."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, values: Mapping[str, float], step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if v is not None:
                self.writer.add_scalar(k, float(v), global_step=int(step))
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"
