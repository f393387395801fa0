# rlhf-overlay: NEW file (not in upstream DeepSpeed-Chat). Checks and defaults shared by our patches to the step-2
# and step-3 main.py (0011, 0019), so a wrong setting fails at start with a message that says what to change, instead
# of deep inside DeepSpeed (hybrid engine / fp16 on CPU, a mistyped local model folder, OPT-only padding).
"""Start-up checks and model-dependent defaults for DeepSpeed-Chat steps 2 and 3."""
import json
import math
import os
import re
from datetime import timedelta

from dschat.utils.ds_utils import SUPPORTED_DTYPES  # fp32 added by patch 0001-fp32-dtype.patch


class SettingError(SystemExit):
    """A setting that cannot work; exits with the message (no traceback) naming the flag and its value."""

    def __init__(self, message):
        super().__init__(f"error: {message}")


def on_cpu():
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().device_name() == "cpu"


def looks_like_local_path(name):
    """A hub id is `name` or `org/name`; anything absolute, relative-looking or deeper is a local path."""
    return (os.path.isabs(name) or name.startswith((".", "~"))
            or name.count("/") >= 2 or os.path.exists(name))


def check_model_path(name, flag):
    """A local model folder must exist and hold config.json; hub ids are left to transformers."""
    if not looks_like_local_path(name):
        return
    path = os.path.expanduser(name)
    if not os.path.exists(path):
        raise SettingError(
            f"{flag} {name}: no such folder. Give an existing local model folder (with config.json) or a "
            f"model id such as meta-llama/Llama-2-7b-hf")
    if not os.path.isdir(path):
        raise SettingError(
            f"{flag} {name}: is a file; give the model folder that holds config.json")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SettingError(
            f"{flag} {name}: folder has no config.json, so it is not a Hugging Face model folder")


def check_critic_checkpoint(name, flag="--critic_model_name_or_path"):
    """Step 3 loads the critic/reward model from a step-2 output: config.json + pytorch_model.bin."""
    check_model_path(name, flag)
    path = os.path.expanduser(name)
    if os.path.isdir(path) and not os.path.isfile(
            os.path.join(path, "pytorch_model.bin")):
        raise SettingError(
            f"{flag} {name}: no pytorch_model.bin; the critic must be a reward model saved by step 2 "
            f"(make rm-llama2), not a plain base model")


def model_type_of(name):
    """`model_type` of a local model folder's config.json, or None when it cannot be read here."""
    config = os.path.join(os.path.expanduser(name), "config.json")
    if os.path.isfile(config):
        try:
            with open(config) as f:
                return json.load(f).get("model_type")
        except (OSError, ValueError):
            return None
    return None


def default_num_padding_at_beginning(name):
    """OPT puts one padding token at the beginning of every input; LLaMA, BLOOM, GPT-J... put none."""
    model_type = model_type_of(name)
    if model_type is None:
        model_type = "opt" if "opt-" in name.lower() else None
    return 1 if model_type == "opt" else 0


def dist_timeout():
    """The process-group timeout (rendezvous and every collective) for deepspeed.init_distributed: RLHF_DIST_TIMEOUT
    seconds, which rlhf-overlay's launches always set (rlhf_overlay.runtime.waits.dist_timeout parses it: 300 on CPU,
    1800 on GPU by default); without it, DeepSpeed's default (DEEPSPEED_TIMEOUT minutes, else 10). DEEPSPEED_TIMEOUT
    alone has only whole minutes."""
    raw = os.environ.get("RLHF_DIST_TIMEOUT", "").strip()
    if not raw:
        from deepspeed.constants import default_pg_timeout
        return default_pg_timeout
    try:
        from rlhf_overlay.errors import UserError
        from rlhf_overlay.runtime import waits
    except ImportError:  # upstream's script run by hand, without rlhf-overlay importable: plain decimals only
        if not re.fullmatch(r"\d*\.?\d+", raw) or float(raw) == 0:
            raise SettingError(f"RLHF_DIST_TIMEOUT={raw!r}: give a number of seconds > 0 (e.g. 300)")
        return timedelta(seconds=math.ceil(float(raw)))
    try:
        return timedelta(seconds=waits.dist_timeout(cuda=not on_cpu()))
    except UserError as e:
        raise SettingError(str(e)) from None


def roll_call():
    """Before deepspeed.init_distributed: every rank signs in at MASTER_ADDR:MASTER_PORT; a rank that has not arrived
    within the timeout is named, with the ranks that did (rlhf_overlay.runtime.waits.roll_call, which also gives
    DeepSpeed's later process groups the same timeout). A no-op for one process, and when rlhf-overlay is not
    importable (upstream's script run by hand)."""
    try:
        from rlhf_overlay.runtime.waits import WaitTimeout, roll_call as sign_in
    except ImportError:
        return
    try:
        sign_in(dist_timeout().total_seconds())
    except WaitTimeout as e:
        raise SettingError(str(e)) from None


def resolve_dtype(dtype):
    """`None` = upstream's fp16 on GPU; fp32 on CPU (fp16 training is unsupported there, and fp32 ran the tiny
    LLaMA ~2x faster than bf16 on a CPU without native bf16 matmul)."""
    if dtype is None:
        return "fp32" if on_cpu() else "fp16"
    if dtype not in SUPPORTED_DTYPES:
        raise SettingError(
            f"--dtype {dtype}: choose one of {', '.join(SUPPORTED_DTYPES)}")
    return dtype


def check_cpu_limits(dtype, zero_stages, hybrid_engine=False,
                     mixed_precision_lora=False):
    """Refuse, with the reason, what is known to fail on CPU (kept for GPU recipes)."""
    if not on_cpu():
        return
    if dtype == "fp16":
        raise SettingError(
            "--dtype fp16: fp16 training is not supported on CPU; use --dtype bf16 or --dtype fp32")
    # ZeRO stage 3 (also with --offload) runs on DeepSpeed's CPU accelerator: steps 2 (reward model, DPO) and 3
    # (PPO) train at 2 CPU ranks with the parameters partitioned (tests/test_dschat_zero3.py), so `zero_stages`
    # is no longer refused here. The hybrid engine stays refused: its inference containers and WorkspaceOp load
    # DeepSpeed's InferenceBuilder, a CUDAOpBuilder (csrc/transformer/inference/*.cu); on the CPU accelerator it
    # is a NotImplementedBuilder whose load() raises "This op had not been implemented on CPU backend".
    if hybrid_engine:
        raise SettingError(
            "--enable_hybrid_engine: the DeepSpeed hybrid engine needs a GPU (its inference kernels do not run "
            "on CPU); drop the flag on CPU")
    if mixed_precision_lora:
        raise SettingError(
            "--enable_mixed_precision_lora: needs ZeRO stage 3 and a GPU; drop the flag on CPU")
