"""Checks every training target runs before it creates a run folder, so a careless value fails in a second with one
line (`error: what, where — what to do`, exit 2) instead of a traceback minutes later, and leaves nothing behind:

- the upstream work tree the target runs is pin + overlays (the same test as `make verify`, fast: the state
  `make upstream` recorded, the overlay digests, the git index and any edited file);
- MODEL (and ACTOR, CRITIC, RM) resolves: an existing folder, or a hub id — a name that is not a path that does not
  exist (`models/typo` when `models/` exists is a missing folder, not a hub id), found in the local Hugging Face
  cache or, online, on the hub; the message says which of the two was meant;
- the folder is the kind this consumer takes (`folder_kind`: a causal LM such as a base model, a PPO policy/ or
  actor/; a DeepSpeed-Chat critic; a trlx value-head reward model; a trlx or DeepSpeed training checkpoint; a run
  folder; a Megatron checkpoint) and its architecture fits the target (LLaMA family for DeepSpeed-Chat, BLOOM /
  GPT-J for the trlx recipes; `--allow-arch` / ALLOW_ARCH=1 to insist);
- its weight files open (a truncated safetensors file is named with its expected and actual size);
- OUTPUT (or runs/) is writable, and a non-empty OUTPUT is refused without OVERWRITE=1;
- DATA resolves the same way as MODEL (a local file/folder, or a hub dataset that is cached or reachable).

    from rlhf_overlay.runtime import preflight
    preflight.check_upstream("DeepSpeedExamples")
    preflight.check_model(cfg.model, "MODEL", accept=(preflight.CAUSAL_LM,), family="llama", target="rm-llama2")
    preflight.check_output(cfg.output, cfg.overwrite)
"""
from __future__ import annotations

import difflib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rlhf_overlay.errors import UserError


class PreflightError(UserError, ValueError):
    """A setting that would fail (or silently do the wrong thing) once the run started; says what to do."""


# ---------------------------------------------------------------------------------------------- upstream trees
def check_upstream(name: str, lock_path: Path | None = None) -> Path:
    """upstream/<name> is pin + the current overlays with no edits (what `make verify` checks, in ~50 ms: the state
    `make upstream` wrote, the overlays' digest, the git index and modified files); returns the work tree."""
    from rlhf_overlay import paths
    from rlhf_overlay.engine import setup_engine
    from rlhf_overlay.engine.lock import LockError, load_lock

    lock_path = Path(lock_path or paths.LOCK_FILE)
    try:
        spec = load_lock(lock_path).upstreams[name]
    except (LockError, KeyError) as e:
        raise PreflightError(f"{lock_path}: cannot read the pin of {name} ({e}) — fix upstream.lock "
                             f"(`git diff upstream.lock`), then `make upstream`") from None
    tree = paths.upstream_dir(name)
    fix = "run `make upstream` (it lays the overlays on the pin), then `make verify`"
    if not (tree / ".git").exists():
        raise PreflightError(f"{tree} is not set up — run `make setup` (or `make upstream` where the Python "
                             f"environment is ready)")
    state = setup_engine._read_state(tree)
    try:
        ov = setup_engine.collect_overlays(name)
    except setup_engine.SetupError as e:
        raise PreflightError(f"overlays/{name}: {e}".splitlines()[0] + " — fix the overlays, then `make lock && "
                             "make upstream`") from None

    def git(*args: str, index: str | None = None) -> str:
        # read-only: no opportunistic index refresh, and write-tree on a copy of the index (it updates its cache)
        env = dict(os.environ, GIT_OPTIONAL_LOCKS="0", **({"GIT_INDEX_FILE": index} if index else {}))
        out = subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise PreflightError(f"{tree}: git {' '.join(args)} failed ({out.stderr.strip()[:200]}) — {fix}")
        return out.stdout.strip()

    head = git("rev-parse", "HEAD")
    if head != spec.commit:
        raise PreflightError(f"{tree} is at {head[:12]}, but upstream.lock pins {spec.commit[:12]} — {fix}")
    if state.get("commit") != spec.commit or state.get("inputs") != setup_engine.inputs_digest(spec, ov) \
            or not state.get("tree"):
        raise PreflightError(f"{tree} is not pin + the current overlays (overlays/{name} changed since the last "
                             f"`make upstream`, or it was interrupted) — {fix}")
    with tempfile.TemporaryDirectory(prefix="rlhf-overlay-preflight-") as tmp:
        shutil.copy2(tree / ".git" / "index", Path(tmp) / "index")
        index_tree = git("write-tree", "--missing-ok", index=str(Path(tmp) / "index"))
    if index_tree != state["tree"]:
        raise PreflightError(f"{tree}: its git index is not pin + overlays (changed by hand or by an interrupted "
                             f"`make upstream`) — {fix}")
    edited = [f for f in git("diff-files", "--name-only").splitlines()[:200] if _content_differs(git, tree, f)]
    if edited:
        raise PreflightError(f"{tree}: {len(edited)} file(s) edited by hand ({', '.join(edited[:3])}"
                             f"{', ...' if len(edited) > 3 else ''}) — move the change into overlays/{name} and "
                             f"run `make lock && make upstream`, or undo it (`make setup FORCE=1` backs it up first)")
    return tree


def _content_differs(git, tree: Path, rel: str) -> bool:
    """diff-files lists files whose stat changed (a touch, a rewrite with the same text); compare the content
    with the index's blob, without refreshing (= writing) the index."""
    staged = git("ls-files", "-s", "--", rel).split()
    if not (tree / rel).is_file() or not staged:
        return True
    return git("hash-object", "--", rel) != staged[1]


# ---------------------------------------------------------------------------------------------- names
from rlhf_overlay.paths import looks_local  # noqa: E402  (the one local-path vs hub-id rule)


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline(dataset: bool = False) -> bool:
    return _truthy("HF_HUB_OFFLINE") or (dataset and _truthy("HF_DATASETS_OFFLINE"))


def _hf_home(training: bool = True) -> Path:
    """The HF_HOME the program will use: the user's; else for training runs our cache's hf/ (runs.runtime_env),
    for chat / eval-rm (plain transformers) the Hugging Face default."""
    from rlhf_overlay.paths import cache_dir
    default = cache_dir() / "hf" if training else Path("~/.cache/huggingface")
    return Path(os.environ.get("HF_HOME") or default).expanduser()


def _hub_cached(repo_id: str, dataset: bool, training: bool = True) -> bool:
    home = _hf_home(training)
    hub = Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or home / "hub")
    folder = hub / f"{'datasets' if dataset else 'models'}--{repo_id.replace('/', '--')}"
    if dataset:
        ds_cache = Path(os.environ.get("HF_DATASETS_CACHE") or home / "datasets")
        return folder.is_dir() or (ds_cache / repo_id.replace("/", "___")).is_dir()
    return any(folder.glob("snapshots/*/config.json"))


def _did_you_mean(path: Path) -> str:
    parent = path.parent if str(path.parent) else Path(".")
    try:
        names = [p.name for p in parent.iterdir()]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    return f" (did you mean {parent / close[0]}?)" if close else ""


@dataclass
class Resolved:
    """What a MODEL/DATA value names: a local path, or a hub id (`note` says how it was read)."""
    value: str
    local: Path | None = None
    hub_id: str | None = None
    note: str = ""


def resolve_name(value: str, var: str, dataset: bool = False, default_of: str = "",
                 training: bool = True) -> Resolved:
    """A local path, or a hub id. A name is a hub id only when it is not a path: not absolute, ~ or ./-relative,
    not deeper than org/name, no .json/.jsonl suffix, and its first part is not an existing folder here. A hub id
    must be in the local cache, or (online) exist on the hub. `default_of` names the recipe when the value is its
    default rather than the user's."""
    what = "dataset" if dataset else "model"
    given = f"{var} is not set, so {default_of} uses the hub {what} {value!r}" if default_of else f"{var}={value!r}"
    p = Path(value).expanduser()
    if p.exists():
        return Resolved(value, local=p.resolve())
    if looks_local(value):
        rel = "" if p.is_absolute() else f", relative to {Path.cwd()}"
        raise PreflightError(f"{var}={value!r}: no such file or folder{_did_you_mean(p)} (read as a local path"
                             f"{rel}) — check the path")
    if _hub_cached(value, dataset, training):
        return Resolved(value, hub_id=value, note=f"{given}: no such local path, so it is the hub {what} {value} "
                                                  f"(found in the local cache)")
    if hub_offline(dataset):
        raise PreflightError(
            f"{given}: no such local path, so it would be the hub {what} {value}, which is not in the local cache "
            f"and the hub is off (HF_HUB_OFFLINE=1) — " + (
                f"pass {var}=<your local {'data file or folder' if dataset else 'model folder'}>" if default_of else
                f"if you meant a local {'path' if dataset else 'folder'}, check it (relative to {Path.cwd()}); if "
                f"you meant the hub {what}, download it first (`huggingface-cli download {value}"
                f"{' --repo-type dataset' if dataset else ''}`) or unset HF_HUB_OFFLINE"))
    problem = _hub_lookup(value, dataset)
    if problem:
        raise PreflightError(f"{given}: no such local path, and as a hub {what} id: {problem} — if you meant a "
                             f"local path, check it (relative to {Path.cwd()})"
                             + (f"; or pass {var}=<your own data>" if default_of else ""))
    return Resolved(value, hub_id=value, note=f"{given}: no such local path, so it is the hub {what} {value} "
                                              f"(downloaded on first use)")


def _hub_lookup(repo_id: str, dataset: bool) -> str | None:
    """None when the hub has `repo_id` (gated counts: a token gives access), else why not."""
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError
    except ImportError:
        return None
    api = HfApi()
    try:
        (api.dataset_info if dataset else api.model_info)(repo_id, timeout=10)
    except GatedRepoError:
        return None
    except RepositoryNotFoundError:
        return f"the hub has no {'dataset' if dataset else 'model'} named {repo_id} (or it is private)"
    except Exception as e:  # no network, proxy, DNS: say so instead of a ConnectionError later
        return f"the hub is not reachable ({type(e).__name__}; offline machine or proxy?)"
    return None


# ---------------------------------------------------------------------------------------------- model folders
CAUSAL_LM = "causal LM"
DSCHAT_CRITIC = "DeepSpeed-Chat critic"
TRLX_RM = "trlx value-head reward model"
TRLX_CHECKPOINT = "trlx training checkpoint"
DEEPSPEED_CHECKPOINT = "DeepSpeed checkpoint"
MEGATRON_CHECKPOINT = "Megatron checkpoint"
RUN_FOLDER = "run folder"
NOT_A_MODEL = "not a model folder"

DESCRIBE = {
    CAUSAL_LM: "a causal language model (a base/SFT model, a PPO policy/ or actor/, a DPO model/)",
    DSCHAT_CRITIC: "a DeepSpeed-Chat critic (reward model) written by `make rm-llama2` (model/)",
    TRLX_RM: "a trlx value-head reward model written by `make rm-bloom`/`make rm-gptj` (reward_model.json + "
             "value_head.safetensors)",
    TRLX_CHECKPOINT: "a trlx training checkpoint (accelerate save_state, wrapped policy + value head)",
    DEEPSPEED_CHECKPOINT: "a DeepSpeed training checkpoint (global_step*/ shards)",
    MEGATRON_CHECKPOINT: "a Megatron checkpoint (convert it with `make convert-llama2-mg2hf` / "
                         "`make convert-bloom-mg2hf` first)",
    RUN_FOLDER: "a run folder",
    NOT_A_MODEL: "not a model folder (no config.json and weights)",
}
# what a run folder of each target holds, in the order a consumer of that kind looks for it
RUN_SUBFOLDERS = {CAUSAL_LM: ("policy", "actor", "model"), DSCHAT_CRITIC: ("model", "reward_model/model", "critic"),
                  TRLX_RM: ("reward_model", "rm/reward_model")}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
WRAPPED_PREFIXES = ("base_model.", "v_head.", "frozen_head.", "rwtransformer.", "rwtranrsformer.")


def _weight_keys(folder: Path) -> list[str]:
    """State-dict keys of a folder's weights without loading them (safetensors header / index / zip pickle)."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            try:
                return list(json.loads((folder / index).read_text()).get("weight_map", {}))
            except ValueError:
                return []
    if (folder / "model.safetensors").is_file():
        header = _safetensors_header(folder / "model.safetensors", strict=False)
        return [k for k in (header or {}) if k != "__metadata__"]
    if (folder / "pytorch_model.bin").is_file():
        import torch
        try:
            return list(torch.load(folder / "pytorch_model.bin", map_location="meta", weights_only=True, mmap=True))
        except Exception:
            return []
    return []


def folder_kind(path: Path) -> str:
    """Which kind of folder this project (or its frameworks) wrote at `path`; see DESCRIBE."""
    path = Path(path)
    if not path.is_dir():
        return NOT_A_MODEL
    if (path / "reward_model.json").is_file() and (path / "value_head.safetensors").is_file():
        return TRLX_RM
    if (path / "latest_checkpointed_iteration.txt").is_file() or (path / "release").is_dir() \
            or any(path.glob("iter_[0-9]*/mp_rank_*")):
        return MEGATRON_CHECKPOINT
    if (path / "hf_model").is_dir() or any((path / f).exists() for f in ("random_states_0.pkl", "optimizer.bin")):
        return TRLX_CHECKPOINT
    if (path / "latest").is_file() and any(path.glob("global_step*")):
        return DEEPSPEED_CHECKPOINT
    config = _read_config(path)
    if config is None or "model_type" not in config:
        if (path / "command.txt").is_file():
            return RUN_FOLDER
        return NOT_A_MODEL
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        return NOT_A_MODEL
    keys = _weight_keys(path)
    if keys and all(k.startswith(WRAPPED_PREFIXES) for k in keys):
        if any(k.startswith(("rwtransformer.", "rwtranrsformer.")) for k in keys):
            return DSCHAT_CRITIC
        return TRLX_CHECKPOINT
    return CAUSAL_LM


def _read_config(path: Path) -> dict | None:
    try:
        data = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def not_a_model_reason(path: Path) -> str:
    """Why folder_kind(path) is NOT_A_MODEL, in a few words."""
    if not path.is_dir():
        return "no such folder"
    if not (path / "config.json").is_file():
        subs = [p.name for p in sorted(path.iterdir()) if p.is_dir()][:6]
        return ("has no config.json, so it is not a Hugging Face model folder"
                + (f" (it holds {', '.join(subs)}/)" if subs else ""))
    if "model_type" not in (_read_config(path) or {}):
        return "its config.json is not a Hugging Face model config (no model_type)"
    return "has config.json but no weights (model.safetensors, pytorch_model.bin or a sharded index)"


def find_in_run_folder(path: Path, kind: str) -> Path | None:
    """The subfolder of a run folder (or of a checkpoint) that holds a model of `kind`, if any."""
    for sub in RUN_SUBFOLDERS.get(kind, ()):
        if folder_kind(path / sub) == kind:
            return path / sub
    return None


def _kinds_text(kinds) -> str:
    return " or ".join(DESCRIBE[k] for k in kinds)


def check_kind(path: Path, var: str, accept: tuple[str, ...], consumer: str) -> tuple[Path, str]:
    """(folder, kind) for a local model folder that `consumer` can use; a run folder is followed to the one
    subfolder of an accepted kind. Anything else is refused by name."""
    kind = folder_kind(path)
    if kind in accept:
        return path, kind
    if kind in (RUN_FOLDER, TRLX_CHECKPOINT, NOT_A_MODEL):
        for want in accept:
            sub = find_in_run_folder(path, want)
            if sub is not None:
                return sub, want
    if kind == NOT_A_MODEL:
        raise PreflightError(f"{var}={path}: {not_a_model_reason(path)} — {consumer} takes {_kinds_text(accept)}")
    todo = f"{consumer} takes {_kinds_text(accept)}"
    if kind == TRLX_CHECKPOINT and (path / "hf_model").is_dir():
        todo += f"; its exported policy is {path / 'hf_model'}"
    raise PreflightError(f"{var}={path} is {DESCRIBE[kind]} — {todo}")


# LLaMA-family model_types DeepSpeed-Chat's LLaMA2 recipes handle (module names `layers.`, no padding at start)
FAMILIES = {"llama": ("llama", "mistral"), "bloom": ("bloom",), "gptj": ("gptj",)}


def check_arch(path: Path, var: str, family: str, target: str, allow_arch: bool) -> str:
    """model_type of the folder's config.json must be of `family` (unless allow_arch); returns the model_type."""
    config = _read_config(path) or {}
    model_type = str(config.get("model_type", "?"))
    if family and model_type not in FAMILIES[family] and not allow_arch:
        raise PreflightError(f"{var}={path} is a {model_type} model, but `make {target}` is a {family} recipe "
                             f"(model_type {' / '.join(FAMILIES[family])}) — use the {model_type} target if there is "
                             f"one, or pass ALLOW_ARCH=1 (--allow-arch) to try it anyway")
    return model_type


def _safetensors_header(file: Path, strict: bool = True) -> dict | None:
    """The JSON header of a safetensors file; with `strict`, also that the file holds every byte it declares."""
    size = file.stat().st_size
    again = "copy or save the model again (an interrupted download or copy)"
    with open(file, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        cut = n is None or n + 8 > size
        raw = f.read(n) if not cut else b""
    if cut and (n is None or n < 100_000_000):   # a plausible header length, cut short
        if not strict:
            return None
        declares = f"its header alone declares {8 + n:,}" if n is not None else "not even a header"
        raise PreflightError(f"{file} is truncated: {size:,} bytes, {declares} — {again}")
    try:
        if cut:
            raise ValueError(f"a header length of {n:,} bytes")
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        if not strict:
            return None
        raise PreflightError(f"{file}: not a safetensors file ({str(e)[:80]}) — {again}") from None
    if strict:
        try:
            end = max((int(v["data_offsets"][1]) for k, v in header.items()
                       if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
        except (TypeError, ValueError, IndexError):
            raise PreflightError(f"{file}: not a safetensors file (bad data_offsets in its header) — {again}") from None
        expected = 8 + n + end
        if size < expected:
            raise PreflightError(f"{file} is truncated: {size:,} bytes, its header declares {expected:,} — {again}")
    return header


def check_weights(path: Path) -> None:
    """Every weight file of a model folder opens and is complete (cheap: headers and sizes, not the tensors)."""
    files: list[Path] = []
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            try:
                shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise PreflightError(f"{path / index}: not a valid weight index — save the model again") from None
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise PreflightError(f"{path}: {index} lists {len(missing)} shard(s) that are missing "
                                     f"({', '.join(missing[:3])}) — copy the whole model folder")
            files += [path / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin", "value_head.safetensors"):
        if (path / name).is_file():
            files.append(path / name)
    if not files:
        raise PreflightError(f"{path}: no weights (model.safetensors, pytorch_model.bin or a sharded index) — "
                             f"pass the folder the model was saved to")
    for f in files:
        if f.suffix == ".safetensors":
            _safetensors_header(f)
        elif f.suffix == ".bin":  # torch.save's zip format; a zip whose directory at the end is missing is cut short
            with open(f, "rb") as fh:
                zipped = fh.read(4) == b"PK\x03\x04"
            if zipped and not zipfile.is_zipfile(f):
                raise PreflightError(f"{f} is truncated ({f.stat().st_size:,} bytes, its zip directory is missing) — "
                                     f"copy or save the model again (an interrupted download or copy)")


def check_model(value: str, var: str, accept: tuple[str, ...], consumer: str, family: str = "",
                allow_arch: bool = False, weights: bool = True, training: bool = True) -> Resolved:
    """MODEL (ACTOR, CRITIC, RM) for `consumer`: resolves (folder or hub id), is an accepted kind, fits the family,
    and its weights open. Returns the resolved name (`local` = the folder to use, maybe a run's subfolder)."""
    r = resolve_name(value, var, training=training)
    if r.local is None:
        return r
    folder, kind = check_kind(r.local, var, accept, consumer)
    if folder != r.local:
        r.note = f"{var}={value}: using its {kind} {folder}"
    r.local = folder
    if family:
        check_arch(folder, var, family, consumer.replace("make ", "").strip("`"), allow_arch)
    if weights:
        check_weights(folder)
    return r


# ---------------------------------------------------------------------------------------------- output
def check_output(output: str, overwrite: bool, var: str = "OUTPUT") -> None:
    """OUTPUT (or runs/ when empty) can be created and written; a non-empty OUTPUT needs OVERWRITE=1."""
    from rlhf_overlay.paths import RUNS_DIR
    target = Path(output).expanduser().absolute() if output else RUNS_DIR
    if output and target.exists():
        if not target.is_dir():
            raise PreflightError(f"{var}={target} exists and is a file, not a folder — pass another {var}")
        if any(target.iterdir()) and not overwrite:
            from rlhf_overlay.runtime.status import incomplete_reason
            why = incomplete_reason(target)
            if why:  # a killed / interrupted / failed run: say so and how to continue it
                raise PreflightError(f"{var}={target}: {why}; or pass OVERWRITE=1 to start a new run there (the old "
                                     f"contents are moved to a backup folder next to it)")
            raise PreflightError(f"{var}={target} is not empty (it holds an earlier run) — choose a new {var}, leave "
                                 f"it unset for a fresh folder under runs/, or pass OVERWRITE=1 to write into it")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise PreflightError(f"{var}={target}: {existing} is a file, so the folder cannot be made — pass another "
                             f"{var}")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = f"{var}={target}" if output else f"the run folder under {RUNS_DIR}"
        where = "is" if existing == target else f"would go in {existing}, which is"
        raise PreflightError(f"{what} {where} not writable (read-only or no permission) — pass "
                             f"{var}=<a folder you can write>")


# ---------------------------------------------------------------------------------------------- data
def check_data(value: str, var: str = "DATA", default_of: str = "") -> Resolved:
    """DATA: a local file/folder (rows are validated by rlhf_overlay.data.preference_data afterwards), or a hub
    dataset that is cached or reachable; a missing relative path is never taken for a hub id."""
    if value == "local/jsonfile":   # upstream's name for <DeepSpeed-Chat>/data/{train,eval}.json
        return Resolved(value, note=f"{var}=local/jsonfile: DeepSpeed-Chat's own data/train.json and data/eval.json")
    return resolve_name(value, var, dataset=True, default_of=default_of)


def say(*resolved: Resolved) -> None:
    """Print how hub ids and run folders were read (one line each), so nobody wonders which was meant."""
    for r in resolved:
        if r is not None and r.note:
            print(f"note: {r.note}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- per framework
def dschat(target: str, cfg, recipe: dict, models: list[tuple[str, str, tuple[str, ...]]]) -> dict[str, Resolved]:
    """Everything a DeepSpeed-Chat target (rm-llama2, ppo-llama2, dpo-llama2) checks before its run folder:
    upstream/DeepSpeedExamples is pin + overlays, each (VAR, value, accepted kinds) model resolves, is LLaMA
    family (or cfg.allow_arch) and opens, DATA (the user's, else the recipe's hub dataset) resolves, OUTPUT is
    writable. Prints how hub ids and run folders were read. Returns {VAR: Resolved}."""
    check_upstream("DeepSpeedExamples")
    if not getattr(cfg, "dry_run", False):
        check_output(cfg.output, cfg.overwrite)
    out: dict[str, Resolved] = {}
    for var, value, accept in models:
        if value:
            out[var] = check_model(value, var, accept, f"make {target}", family="llama",
                                   allow_arch=getattr(cfg, "allow_arch", False))
    data = cfg.data or recipe.get("data")
    if data:
        out["DATA"] = check_data(data, "DATA", default_of="" if cfg.data else f"the {recipe['recipe']} recipe")
    say(*out.values())
    return out


def trlx(target: str, cfg, upstream: bool, models: list[tuple[str, str, tuple[str, ...], str]]) -> dict[str, Resolved]:
    """The same for the trlx targets (rm-bloom, rm-gptj, ppo-*): upstream/trlx when `upstream` (PPO), models as
    (VAR, value, accepted kinds, family), DATA (local or hub), OUTPUT."""
    from rlhf_overlay.paths import trlx_dir
    if upstream and (trlx_dir() / ".git").exists():
        check_upstream("trlx")
    check_output(cfg.output, cfg.overwrite)
    out: dict[str, Resolved] = {}
    for var, value, accept, family in models:
        if value:
            out[var] = check_model(value, var, accept, f"make {target}", family=family,
                                   allow_arch=getattr(cfg, "allow_arch", False))
    if cfg.data and not Path(cfg.data).expanduser().exists():
        p = Path(cfg.data).expanduser()
        raise PreflightError(f"DATA={cfg.data!r}: no such file or folder{_did_you_mean(p)} (relative to {Path.cwd()}) "
                             f"— `make {target}` reads a local .json/.jsonl file or a folder with train.jsonl")
    say(*out.values())
    return out


def absolute(checked: dict[str, Resolved], var: str, value: str) -> str:
    """The checked local path of `var` as an absolute path (upstream steps run in their own folder, so a relative
    MODEL/DATA would point elsewhere there), else `value` unchanged (a hub id, or not checked)."""
    r = checked.get(var)
    return str(r.local) if r is not None and r.local is not None else value
