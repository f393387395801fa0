"""trlx hydra heads on the pinned transformers: the frozen reference head must reproduce the policy exactly at
initialisation (max |logits diff| == 0) for BLOOM, GPT-J and LLaMA — GPT-J is silently wrong on transformers
4.45+, BLOOM/LLaMA needed patch 0003. Also the other library patches that need no training run.

Skipped, with the reason, when upstream/trlx is not set up.
"""
from __future__ import annotations

import pytest

pytestmark = [pytest.mark.upstream]

ARCHES = ["tiny-bloom", "tiny-gptj", "tiny-llama"]


@pytest.fixture(scope="module")
def trlx_modules(trlx_dir):
    from rlhf_overlay.trlx_common import import_trlx

    import_trlx()
    from trlx.models import modeling_ppo

    return modeling_ppo


def _batch(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # as trlx generates and scores: left padding, explicit position ids
    enc = tok(["Human: tell me about the garden. Assistant: here is", "hi", "a b c d e f g h i j k l m n o p"],
              return_tensors="pt", padding=True)
    mask = enc.attention_mask
    pos = mask.long().cumsum(-1) - 1
    pos.masked_fill_(mask == 0, 1)
    assert (mask == 0).any(), "the batch must contain padding to test the masks"
    return enc.input_ids, mask, pos


@pytest.mark.parametrize("name", ARCHES)
@pytest.mark.parametrize("unfrozen", [1, 2])
def test_frozen_head_equals_policy_at_init(trlx_modules, tiny_assets, name, unfrozen):
    import torch

    path = tiny_assets / "models" / name
    model = trlx_modules.AutoModelForCausalLMWithHydraValueHead.from_pretrained(
        str(path), num_layers_unfrozen=unfrozen).eval()
    assert model.frozen_head is not None
    ids, mask, pos = _batch(path)
    with torch.no_grad():
        policy = model(ids, attention_mask=mask, position_ids=pos, return_dict=True).logits
        ref = model.forward_hydra(ids, attention_mask=mask, position_ids=pos, return_dict=True).logits
    assert policy.shape == ref.shape
    real = mask.bool()
    assert torch.isfinite(ref[real]).all()
    assert (policy - ref).abs()[real].max().item() == 0.0, f"{name}: frozen head differs on real tokens"
    assert (policy - ref).abs().max().item() == 0.0, f"{name}: frozen head differs on padded positions"


def test_hydra_model_loads_local_safetensors_folder(trlx_modules, tiny_assets):
    """Patch 0002: a local folder with model.safetensors is read from disk (the pin asked the hub)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = tiny_assets / "models" / "tiny-bloom"
    assert (path / "model.safetensors").is_file()
    wrapped = trlx_modules.AutoModelForCausalLMWithValueHead.from_pretrained(str(path))
    plain = AutoModelForCausalLM.from_pretrained(path)
    for (k, a), (k2, b) in zip(wrapped.base_model.state_dict().items(), plain.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_state_dict_takes_a_caller_prefix(trlx_modules, tiny_assets):
    """Patch 0004: DeepSpeed calls state_dict(prefix=...); the pin raised 'multiple values for prefix'."""
    model = trlx_modules.AutoModelForCausalLMWithHydraValueHead.from_pretrained(
        str(tiny_assets / "models" / "tiny-gptj"), num_layers_unfrozen=1)
    sd = model.state_dict(prefix="module.")
    assert sd and all(k.startswith("module.") for k in sd)
    assert any(k.startswith("module.v_head.") for k in sd)
    assert any(k.startswith("module.frozen_head.") for k in sd)
    assert any(k.startswith("module.base_model.") for k in sd)
    heads = model.state_dict(heads_only=True)
    assert heads and all(k.startswith("v_head.") for k in heads)


def test_import_without_ray_and_wandb(trlx_dir):
    """Patch 0001: `import trlx` and the trainers work with neither ray nor wandb installed."""
    import importlib.util
    import subprocess
    import sys

    from rlhf_overlay.trlx_common import trlx_env

    assert importlib.util.find_spec("ray") is None and importlib.util.find_spec("wandb") is None, \
        "this test is only meaningful in an environment without ray and wandb (the project's venv)"
    code = ("import trlx; from trlx.trainer.accelerate_ppo_trainer import AcceleratePPOTrainer; "
            "from trlx.trainer.accelerate_rft_trainer import AccelerateRFTTrainer; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=trlx_env(cpu=True),
                         timeout=300, cwd="/")
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]
