"""The seed's trlx commands, typed as written (Pai-Megatron-Patch rlhf/ README): the forwarders in
upstream/trlx/examples/summarize_rlhf (overlays/trlx/) call `seed_main`.

    cd upstream/trlx/examples/summarize_rlhf/reward_model && deepspeed train_reward_model_bloom.py
    cd upstream/trlx/examples/summarize_rlhf && accelerate launch --config_file configs/default_accelerate_config.yaml trlx_bloom_rlhf.py

Each is its make target (rm-bloom, rm-gptj, ppo-bloom, ppo-gptj, ppo-smoke-test) with the same variables (MODEL, DATA,
OUTPUT, OVERWRITE, RM, REWARD; flags after the script name win), run folder, training.log and report.
- `python script.py`: the entry module starts its own launcher, as the make target does.
- Under a launcher (`deepspeed`, `accelerate launch`, torchrun: LOCAL_RANK set, `--local_rank` passed) the processes
  exist already and each is its rank's worker. Rank 0 checks everything and makes the run folder as the make target
  does, with the launcher's variables hidden (a tiny reward model it trains first is then a job of its own); every
  rank learns the folder (a torch.distributed broadcast when there are several) and runs the worker in this process,
  its output also going to training.log; rank 0 writes report.png and summary.md at the end.
- The seed's DeepSpeed JSON (reward_model/ds_config_*.json under `deepspeed`, the file the accelerate config names)
  is used as written where the machine can run it. What must change (CPU: fp16, offload, ZeRO-3, hybrid engine; keys
  DeepSpeed rejects; numbers contradicting the run's settings) changes in a copy, printed as `note:` lines and kept in
  the run folder (deepspeed_config.json) and config.json.
- The GPT-J scripts name CarperAI's hub model and data: used when they can be had (HF cache, or the hub answers);
  otherwise, with MODEL/DATA unset, a CPU runs the tiny recipe (its first line says so) and a GPU stops with one line.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shlex
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from rlhf_overlay.errors import ArgumentParser, UserError, main_guard
from rlhf_overlay.trlx_jobs.common import ZERO3_ON_CPU


@dataclass(frozen=True)
class Seed:
    target: str                 # the make target it equals
    module: str                 # the entry module
    arch: str
    ds_json: str = ""           # DeepSpeed JSON next to the script, used under a launcher (reward models)
    hub_model: str = ""         # the hub model the upstream script names
    hub_data: str = ""          # the hub data set it names
    rows: str = "preference"    # preference | prompts: what the data rows are


SEEDS = {
    "rm-bloom": Seed("rm-bloom", "rlhf_overlay.trlx_jobs.reward_model", "bloom", ds_json="ds_config_bloom.json"),
    "rm-gptj": Seed("rm-gptj", "rlhf_overlay.trlx_jobs.reward_model", "gptj", ds_json="ds_config_gpt_j.json",
                    hub_model="CarperAI/openai_summarize_tldr_sft", hub_data="CarperAI/openai_summarize_comparisons"),
    "ppo-bloom": Seed("ppo-bloom", "rlhf_overlay.trlx_jobs.ppo", "bloom", rows="prompts"),
    "ppo-gptj": Seed("ppo-gptj", "rlhf_overlay.trlx_jobs.ppo", "gptj", hub_model="CarperAI/openai_summarize_tldr_sft",
                     hub_data="CarperAI/openai_summarize_tldr", rows="prompts"),
    "ppo-smoke-test": Seed("ppo-smoke-test", "rlhf_overlay.trlx_jobs.smoke_test", "bloom", rows="prompts"),
}
# What a launcher sets for its workers; hidden while rank 0 prepares the run, so that a job it starts (the tiny reward
# model of a PPO run) is not mistaken for a rank of this launch.
LAUNCHER_VARS = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
                 "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE")
LAUNCHER_PREFIXES = ("ACCELERATE_", "TORCHELASTIC_")


# ---------------------------------------------------------------------------------------------- small pieces
def take_local_rank(argv: Sequence[str]) -> tuple[list[str], str | None]:
    """Split off the `--local_rank=N` / `--local_rank N` DeepSpeed's launcher appends: (the other arguments, N or
    None). The caller decides what to do with N (LOCAL_RANK says the same); nothing here touches os.environ."""
    out, rank, it = [], None, iter(argv)
    for a in it:
        if a in ("--local_rank", "--local-rank"):
            rank = next(it, "0")
        elif a.startswith(("--local_rank=", "--local-rank=")):
            rank = a.split("=", 1)[1]
        else:
            out.append(a)
    return out, rank


def under_launcher() -> bool:
    return os.environ.get("LOCAL_RANK") is not None and os.environ.get("RLHF_OVERLAY_WORKER") is None


def launcher_name() -> str:
    if any(k.startswith("ACCELERATE_") for k in os.environ):
        return "accelerate launch"
    return "torchrun" if os.environ.get("TORCHELASTIC_RUN_ID") else "deepspeed"


def has_flag(argv: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def env_flags(seed: Seed, launched: bool) -> list[str]:
    """The make variables as flags, as training_scripts/lib.sh maps them (launch-shaping ones only without a
    launcher: under one, the launcher decides the ranks)."""
    e = os.environ.get
    flags: list[str] = []
    for var, flag in (("MODEL", "--model"), ("DATA", "--data"), ("OUTPUT", "--output")):
        if e(var):
            flags += [flag, e(var)]
    if e("OVERWRITE", "0") == "1":
        flags.append("--overwrite")
    if seed.module != "rlhf_overlay.trlx_jobs.reward_model" and e("RM"):
        flags += ["--rm", e("RM")]
    if seed.module == "rlhf_overlay.trlx_jobs.smoke_test" and e("REWARD"):
        flags += ["--reward", e("REWARD")]
    if not launched:
        num = "--num-processes"
        for var, flag in (("ZERO_STAGE", "--zero-stage"), ("NUM_GPUS", num), ("HOSTFILE", "--hostfile")):
            if e(var):
                flags += [flag, e(var)]
    return flags


def flag_value(argv: Sequence[str], flag: str) -> str:
    """The last value given for `flag` (`--x v` or `--x=v`), or ""."""
    value = ""
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


# ---------------------------------------------------------------------------------------------- hub names
def hub_rows_folder(repo: str, rows: str) -> Path:
    """A hub data set as our JSONL rows (train.jsonl + eval.jsonl), written once into the user cache."""
    from rlhf_overlay.paths import cache_dir

    out = cache_dir() / "seed-data" / repo.replace("/", "__")
    if (out / "train.jsonl").is_file():
        return out
    import datasets

    d = datasets.load_dataset(repo)
    eval_split = next((s for s in ("valid", "validation", "test", "valid1") if s in d), None)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for split, name in (("train", "train"), (eval_split, "eval")):
        if split is None:
            continue
        with open(tmp / f"{name}.jsonl", "w") as f:
            for r in d[split]:
                if rows == "preference":
                    if r["chosen"] == r["rejected"]:
                        continue
                    row = {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
                else:
                    row = {"prompt": r["prompt"]}
                    ref = r.get("label") or r.get("reference") or r.get("chosen")
                    if ref:
                        row["reference"] = ref
                f.write(json.dumps(row) + "\n")
    os.replace(tmp, out)
    return out


def _hub_default(repo: str, var: str, what: str, dataset: bool = False, required: bool = True):
    """The seed's hub default if it can be had (local HF cache, or the hub answers), else None (or, `required`, the
    one-line PreflightError naming it and how to provide a local replacement)."""
    from rlhf_overlay.runtime import preflight
    try:
        r = preflight.resolve_name(repo, var, dataset=dataset, default_of=what)
    except preflight.PreflightError:
        if required:
            raise
        return None
    if r.note.endswith("(downloaded on first use)") and not dataset:  # runs read the cache offline: fetch it now
        from huggingface_hub import snapshot_download

        snapshot_download(repo)
    return r


def choose_inputs(seed: Seed, argv: list[str], cuda: bool) -> tuple[list[str], str]:
    """Flags for the model and data the seed command names (hub names made local), and the first line to print.
    The user's own MODEL/DATA values are checked by the entry module (rlhf_overlay.runtime.preflight), as for make."""
    model, data = flag_value(argv, "--model"), flag_value(argv, "--data")
    what = f"{Path(sys.argv[0]).name} ({seed.target})"
    extra: list[str] = []
    if model:  # the user's own value: a hub name must be had before the seed's data default is looked at
        from rlhf_overlay.paths import looks_local
        from rlhf_overlay.runtime import preflight
        if not looks_local(model):
            preflight.resolve_name(model, "MODEL")
    if not model and seed.hub_model and _hub_default(seed.hub_model, "MODEL", what, required=cuda) is not None:
        model = seed.hub_model
        extra += ["--model", model]
    if not model:
        return extra, (f"tiny recipe: the embedded tiny {seed.arch.upper()} {'and synthetic data ' if not data else ''}"
                       f"on {'GPU' if cuda else 'CPU'}, as `make {seed.target}` (MODEL unset"
                       + (f"; the seed's {seed.hub_model} is not available here" if seed.hub_model else "")
                       + "; set MODEL=<model folder> DATA=<data> for your own)")
    if seed.rows == "prompts" and model == seed.hub_model and not flag_value(argv, "--rm"):
        raise UserError(f"{what} scores PPO samples with a reward model, and RM is not set: train one with "
                        f"`deepspeed train_reward_model_{seed.arch}.py` in reward_model/ (or `make rm-{seed.arch}`) "
                        f"and set RM=<that run>/reward_model")
    if not data and seed.hub_data and model == seed.hub_model:
        _hub_default(seed.hub_data, "DATA", what, dataset=True)
        data = str(hub_rows_folder(seed.hub_data, seed.rows))
        extra += ["--data", data]
    return extra, f"{seed.target} recipe on {model}, data {data or 'embedded'} (as `make {seed.target} MODEL=...`)"


# ---------------------------------------------------------------------------------------------- DeepSpeed JSON
def _get(d: dict, path: str):
    for k in path.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _set(d: dict, path: str, value) -> None:
    keys = path.split(".")
    for k in keys[:-1]:
        d = d[k]
    d[keys[-1]] = value


def _fp16_keys() -> set[str]:
    """The fp16 settings this DeepSpeed knows (its config model), or an empty set when it cannot tell."""
    try:
        from deepspeed.runtime.precision_config import DeepSpeedFP16Config
    except Exception:  # pragma: no cover - DeepSpeed is a pinned requirement
        return set()
    keys = set(DeepSpeedFP16Config.model_fields)
    for f in DeepSpeedFP16Config.model_fields.values():
        if f.alias:
            keys.add(f.alias)
    return keys


def adapt_ds_config(ds: dict, cuda: bool, source: str, run: dict | None = None) -> tuple[dict, list[str]]:
    """A copy of DeepSpeed config `ds` that this machine runs, and one note per change. `run` maps config keys to
    the values the run uses (the HF Trainer fills "auto" with them and refuses other numbers), with the flag that
    sets each: {"optimizer.params.lr": (1e-3, "--lr"), ...}."""
    ds, notes = copy.deepcopy(ds), []
    fp16 = ds.get("fp16") if isinstance(ds.get("fp16"), dict) else {}
    if "opt_level" in fp16:
        notes.append(f"{source}: fp16.opt_level={fp16.pop('opt_level')!r} removed (an apex setting; DeepSpeed "
                     f"0.19 rejects the key)")
    known = _fp16_keys()
    for key in [k for k in fp16 if known and k not in known]:
        notes.append(f"{source}: fp16.{key}={fp16.pop(key)!r} removed (DeepSpeed 0.19 has no such fp16 setting)")
    mls = fp16.get("min_loss_scale")
    if isinstance(mls, float) and not mls.is_integer():
        fp16["min_loss_scale"] = max(1, math.ceil(mls))
        notes.append(f"{source}: fp16.min_loss_scale {mls} -> {fp16['min_loss_scale']} (DeepSpeed 0.19 takes a whole "
                     f"number)")
    zero = ds.get("zero_optimization") if isinstance(ds.get("zero_optimization"), dict) else {}
    if not cuda:
        if fp16.get("enabled") is True:
            fp16["enabled"] = False
            notes.append(f"{source}: fp16 off: fp16 training needs a GPU; this CPU run trains in fp32")
        if str(zero.get("stage")) == "3":
            zero["stage"] = 2
            notes.append(f"{source}: ZeRO stage 3 -> 2: {ZERO3_ON_CPU}; "
                         f"stage 2 still shards the optimizer state over the ranks")
        for key in ("offload_optimizer", "offload_param"):
            if key in zero:
                device = (zero.pop(key) or {}).get("device")
                notes.append(f"{source}: zero_optimization.{key} (device {device}) dropped: on a CPU machine the "
                             f"parameters and optimizer state already live in host memory")
        hybrid = ds.get("hybrid_engine")
        if isinstance(hybrid, dict) and hybrid.get("enabled"):
            hybrid["enabled"] = False
            notes.append(f"{source}: hybrid_engine off: it needs a GPU")
    for key, (value, flag) in (run or {}).items():
        old = _get(ds, key)
        if isinstance(old, (int, float)) and not isinstance(old, bool) and old != value:
            _set(ds, key, "auto")
            notes.append(f"{source}: {key} {old} -> auto (= {value}, this run's {flag}): the HF Trainer refuses "
                         f"numbers that differ from its own settings")
    return ds, notes


def rm_run_values(cfg, world: int) -> dict:
    """What the reward-model trainer fills into a DeepSpeed config, for `adapt_ds_config`."""
    return {"train_batch_size": (cfg.batch_size * cfg.grad_accum * world, "--batch-size x --grad-accum x ranks"),
            "train_micro_batch_size_per_gpu": (cfg.batch_size, "--batch-size"),
            "gradient_accumulation_steps": (cfg.grad_accum, "--grad-accum"),
            "optimizer.params.lr": (cfg.lr, "--lr"), "scheduler.params.warmup_max_lr": (cfg.lr, "--lr"),
            "scheduler.params.warmup_num_steps": (cfg.warmup_steps, "--warmup-steps")}


def accelerate_ds_settings(cuda: bool) -> tuple[dict, list[str]]:
    """Environment changes that make the accelerate launcher's DeepSpeed / precision settings run here, and notes.
    The DeepSpeed JSON it names (relative to the folder the command ran in) is adapted into a copy: the key
    `deepspeed_config` holds it; the caller writes it and points ACCELERATE_DEEPSPEED_CONFIG_FILE at it."""
    env, notes = {}, []
    if not cuda and os.environ.get("ACCELERATE_MIXED_PRECISION") == "fp16":
        env["ACCELERATE_MIXED_PRECISION"] = "no"
        notes.append("accelerate mixed_precision fp16 -> no: fp16 needs a GPU")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return env, notes
    file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if file and file != "none":
        path = Path(file).expanduser()
        if not path.is_file():
            raise UserError(f"deepspeed_config_file={file} (from the accelerate config) does not exist in "
                            f"{os.getcwd()}; run from the folder the seed names or give an absolute path")
        ds, more = adapt_ds_config(json.loads(path.read_text()), cuda, file)
        env["deepspeed_config"] = ds
        notes += more
    elif not cuda and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] = "2"
        notes.append("accelerate zero_stage 3 -> 2: the seed's accelerate commands run ZeRO-3 on GPUs only; on CPU, "
                     "trlx PPO at ZeRO-3 is `make ppo-bloom ZERO_STAGE=3` (configs/accelerate/zero3.yaml)")
    if not cuda:
        for var in ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"):
            if os.environ.get(var, "none") not in ("none", ""):
                env[var] = "none"
                notes.append(f"accelerate {var[len('ACCELERATE_DEEPSPEED_'):].lower()} -> none: a CPU machine has "
                             f"nothing to offload to")
    return env, notes


# ---------------------------------------------------------------------------------------------- ranks
@contextlib.contextmanager
def tee_output(log_path: Path, header: str):
    """Everything this process writes to stdout/stderr (Python, C and child processes alike) also goes to
    `log_path`, as run_logged does for the make targets."""
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    saved = os.dup(1), os.dup(2)
    log = open(log_path, "ab")
    log.write(header.encode())
    log.flush()

    def pump():
        while True:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            os.write(saved[0], chunk)
            log.write(chunk)
            log.flush()

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    os.dup2(w, 1)
    os.dup2(w, 2)
    os.close(w)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        t.join(timeout=10)
        for fd in (r, *saved):
            os.close(fd)
        log.close()


class Ranks:
    """This launch's ranks: one broadcast from rank 0 (the run folder, or the error that stopped it)."""

    def __init__(self):
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.shared = False

    def start(self, cuda: bool) -> None:
        if self.world == 1:
            if not os.environ.get("TORCHELASTIC_USE_AGENT_STORE"):
                # nobody else connects: a free port, so two seed commands (or a make target) can run side by side
                from rlhf_overlay.runtime.runs import free_port

                os.environ["MASTER_PORT"] = str(free_port())
            return
        import torch.distributed as dist

        if not dist.is_initialized():  # accelerate, DeepSpeed and the HF Trainer reuse this process group
            dist.init_process_group(backend="gloo" if not cuda else None)

    def share(self, payload: dict | None) -> dict:
        self.shared = True
        if self.world == 1:
            return payload or {}
        import torch.distributed as dist

        box = [payload]
        dist.broadcast_object_list(box, src=0)
        return box[0]


@contextlib.contextmanager
def launcher_hidden():
    saved = {k: v for k, v in os.environ.items() if k in LAUNCHER_VARS or k.startswith(LAUNCHER_PREFIXES)}
    for k in saved:
        del os.environ[k]
    try:
        yield saved
    finally:
        os.environ.update(saved)


# ---------------------------------------------------------------------------------------------- main
def _worker_fn(seed: Seed) -> Callable[[Path], int]:
    if seed.module == "rlhf_overlay.trlx_jobs.reward_model":
        from rlhf_overlay.trlx_jobs.rm_worker import worker_main
    else:
        from rlhf_overlay.trlx_jobs.ppo_worker import worker_main
    return worker_main


def _run_entry(seed: Seed, argv: list[str], worker=None) -> int:
    """The entry module as its make target runs it; `worker` replaces the launch of the workers (under a launcher)."""
    if seed.module == "rlhf_overlay.trlx_jobs.reward_model":
        from rlhf_overlay.trlx_jobs import reward_model as m
        cfg = m.config_from_args(m.build_parser(seed.arch).parse_args(argv))
        return m.run(cfg, argv, worker=worker)
    if seed.module == "rlhf_overlay.trlx_jobs.smoke_test":
        from rlhf_overlay.trlx_jobs import smoke_test as ppo_smoke_test
        return ppo_smoke_test.main(argv, worker=worker)
    from rlhf_overlay.trlx_jobs import ppo as trlx_ppo
    rc, run_dir = trlx_ppo.run(trlx_ppo.config_from_args(trlx_ppo.build_parser().parse_args(argv)), argv,
                               worker=worker)
    if rc == 0:
        trlx_ppo.print_summary(run_dir)
    return rc


def seed_main(name: str, script: str, argv: Sequence[str] | None = None) -> int:
    seed = SEEDS[name]
    argv, local_rank = take_local_rank(sys.argv[1:] if argv is None else argv)
    if local_rank is not None:  # this process is a launcher's worker: its flag and LOCAL_RANK name the same rank
        os.environ.setdefault("LOCAL_RANK", local_rank)
    launched = under_launcher()
    ranks = Ranks() if launched else None
    talk = ranks is None or ranks.rank == 0
    from rlhf_overlay.paths import cache_dir

    os.environ.setdefault("HF_HOME", str(cache_dir() / "hf"))  # hub checks and runs read the same cache
    from rlhf_overlay.runtime.runs import has_cuda, runtime_env

    cuda = has_cuda()
    try:
        flags = ["--arch", seed.arch] + env_flags(seed, launched) + argv
        if talk:  # the other ranks get everything from rank 0's run folder (and fetch nothing themselves)
            extra, first = choose_inputs(seed, flags, cuda)
            flags = extra + flags  # flags given by the user come later and win
            print(first, flush=True)
    except UserError as e:
        if talk:
            print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ.update({k: v for k, v in runtime_env(cpu=not cuda).items() if k != "PYTHONPATH"})
    for k, v in (("WANDB_DISABLED", "true"), ("WANDB_MODE", "disabled")):
        os.environ.setdefault(k, v)
    reports = None
    if talk and not os.environ.get("RLHF_OVERLAY_RUN_DIRS_FILE"):
        fd, reports = tempfile.mkstemp(prefix="rlhf-overlay-runs-")
        os.close(fd)
        os.environ["RLHF_OVERLAY_RUN_DIRS_FILE"] = reports
    try:
        if ranks is None:
            rc = _run_entry(seed, flags)
        else:
            rc = _as_rank(seed, script, flags, ranks, cuda)
        if reports:
            from rlhf_overlay.tools.report import report_job_runs
            report_job_runs(Path(reports), rc)
        return rc
    finally:
        if reports:
            os.unlink(reports)
            os.environ.pop("RLHF_OVERLAY_RUN_DIRS_FILE", None)


def _as_rank(seed: Seed, script: str, flags: list[str], ranks: Ranks, cuda: bool) -> int:
    """This process is one rank a launcher started: rank 0 prepares the run, then every rank runs the worker."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    ranks.start(cuda)
    worker = _worker_fn(seed)
    header = (f"$ (cd {os.getcwd()} && {launcher_name()} ... {' '.join(sys.argv)})  # rank {ranks.rank} of "
              f"{ranks.world}\n")
    if ranks.rank != 0:
        got = ranks.share(None)
        if "error" in got:
            return int(got.get("rc", 2))
        os.environ.update(got.get("env", {}))
        run_dir = Path(got["run_dir"])
        with tee_output(run_dir / "training.log", header):
            return worker(run_dir)

    tmp = tempfile.TemporaryDirectory(prefix="rlhf-overlay-ds-")
    try:
        try:
            if seed.ds_json and not has_flag(flags, "--deepspeed"):
                flags = flags + ["--deepspeed", str(Path(script).resolve().parent / seed.ds_json)]
            if seed.module == "rlhf_overlay.trlx_jobs.reward_model":
                flags = _adapt_rm_deepspeed(seed, flags, cuda, ranks.world, Path(tmp.name))
            env, notes = ({}, []) if seed.module == "rlhf_overlay.trlx_jobs.reward_model" else accelerate_ds_settings(cuda)
        except UserError as e:  # e.g. the DeepSpeed JSON the accelerate config names is missing
            print(f"error: {e}", file=sys.stderr)
            ranks.share({"error": str(e), "rc": 2})
            return 2
        for note in notes:
            print(f"note: {note}", flush=True)
        saved: dict = {}

        def rank0_worker(run_dir: Path) -> int:
            os.environ.update(saved)  # the launcher's variables are back for the worker
            _forget_single_process_state()
            try:
                share_env = {k: v for k, v in env.items() if k != "deepspeed_config"}
                if "deepspeed_config" in env:
                    from rlhf_overlay.trlx_jobs.common import write_json

                    write_json(run_dir / "deepspeed_config.json", env["deepspeed_config"])
                    share_env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(run_dir / "deepspeed_config.json")
                _record_launch(run_dir, ranks, notes, share_env)
                ranks.share({"run_dir": str(run_dir), "env": share_env})
                os.environ.update(share_env)
                with tee_output(run_dir / "training.log", header):
                    return worker(run_dir)
            finally:
                for k in saved:
                    os.environ.pop(k, None)

        with launcher_hidden() as hidden:
            saved.update(hidden)
            try:
                rc = _run_entry(seed, flags, worker=rank0_worker)
            except UserError as e:
                print(f"error: {e}", file=sys.stderr)
                rc = 2
            except BaseException:
                if not ranks.shared:
                    ranks.share({"error": "rank 0 failed", "rc": 1})
                raise
        if not ranks.shared:  # stopped before the workers: the other ranks stop too
            ranks.share({"error": "rank 0 stopped", "rc": rc or 1})
        return rc
    finally:
        tmp.cleanup()


def _forget_single_process_state() -> None:
    """accelerate keeps its process state in a singleton; made while rank 0 prepared the run with the launcher's
    variables hidden (the data and model checks), it says "one process". The worker must see the launch's ranks."""
    import importlib.util

    if importlib.util.find_spec("accelerate") is not None:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def _adapt_rm_deepspeed(seed: Seed, flags: list[str], cuda: bool, world: int, tmp: Path) -> list[str]:
    """The reward model's DeepSpeed JSON made to run here (a copy with notes), for rank 0's run()."""
    src = flag_value(flags, "--deepspeed")
    if not src or not Path(src).is_file():
        return flags  # the entry module names the missing file
    from rlhf_overlay.trlx_jobs import reward_model as m
    cfg = m.config_from_args(m.build_parser(seed.arch).parse_args(flags)).resolve()
    raw, early = json.loads(Path(src).read_text()), []
    if _get(raw, "scheduler.type") == "WarmupLR" and cfg.warmup_steps < 1:
        cfg.warmup_steps = 1
        flags = flags + ["--warmup-steps", "1"]
        early.append(f"{Path(src).name}: warm-up 0 -> 1 step: DeepSpeed 0.19's WarmupLR refuses 0 steps (this recipe "
                     f"has no warm-up)")
    ds, notes = adapt_ds_config(raw, cuda, Path(src).name, rm_run_values(cfg, world))
    notes = early + notes
    if cuda and cfg.precision == "auto":
        for p in ("fp16", "bf16"):
            if _get(ds, f"{p}.enabled") is True:
                flags = flags + ["--precision", p]  # the file's precision, as the seed's script trained
    if cfg.eval_before == "yes" and str(_get(ds, "zero_optimization.stage")) != "3":
        flags = flags + ["--eval-before", "no"]
        notes.append("no evaluation before training: the HF Trainer evaluates a DeepSpeed model only after "
                     "training starts unless it is ZeRO-3 (\"ZeRO inference only makes sense with ZeRO Stage 3\")")
    for note in notes:
        print(f"note: {note}", flush=True)
    out = tmp / Path(src).name
    out.write_text(json.dumps(ds, indent=2))
    return flags + ["--deepspeed", str(out)]


def typed_command() -> str:
    """The command line the user typed (the outermost launcher process naming this script, read from /proc), with
    the make variables it saw; for command.txt."""
    script, best, pid = os.path.basename(sys.argv[0]), None, os.getppid()
    launchers = ("deepspeed", "accelerate", "torchrun")
    for _ in range(4):
        try:
            argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        names = [os.path.basename(a) for a in argv[:2]]
        if script in map(os.path.basename, argv) and any(n in launchers for n in names):
            best = argv[names.index(next(n for n in names if n in launchers)):]  # from the launcher's name on
    best = [launcher_name(), *sys.argv] if best is None else [os.path.basename(best[0]), *best[1:]]
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in ("MODEL", "DATA", "RM", "REWARD", "OUTPUT", "OVERWRITE")
           if os.environ.get(k)]
    return " ".join(env + [shlex.join(best)])


def _record_launch(run_dir: Path, ranks: Ranks, notes: list[str], env: dict) -> None:
    """config.json and command.txt say how this run was really launched (the seed's command and launcher), not what
    the entry module would have started."""
    from rlhf_overlay.runtime.runs import _atomic_write_text
    from rlhf_overlay.trlx_jobs.common import write_json

    _atomic_write_text(run_dir / "command.txt", f"cd {shlex.quote(os.getcwd())} && {typed_command()}\n")

    path = run_dir / "config.json"
    resolved = json.loads(path.read_text())
    resolved["seed_launch"] = {"launcher": launcher_name(), "cwd": os.getcwd(), "argv": sys.argv,
                               "world_size": ranks.world, "notes": notes, "env": env}
    if isinstance(resolved.get("launch"), dict):
        resolved["launch"].update(num_processes=ranks.world, accelerate_config=None, launcher=launcher_name())
    write_json(path, resolved)


@main_guard   # UserError and bad flags -> `error: ...`, exit 2
def main(argv=None) -> int:
    """`python -m rlhf_overlay.tools.seed_launch hub-default VAR NAME --by SCRIPT [--dataset]`: for the DeepSpeed-Chat seed
    scripts, whose hub defaults (meta-llama/Llama-2-7b-hf) stand in for an unset variable; one line and exit 2 when
    the name cannot be had here."""
    from rlhf_overlay.paths import cache_dir

    p = ArgumentParser(prog="python -m rlhf_overlay.tools.seed_launch")
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hub-default", help="check a hub default a seed script uses for an unset variable")
    h.add_argument("var")
    h.add_argument("name")
    h.add_argument("--by", required=True, help="the script, for the message")
    h.add_argument("--dataset", action="store_true")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HOME", str(cache_dir() / "hf"))
    _hub_default(a.name, a.var, a.by, dataset=a.dataset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
