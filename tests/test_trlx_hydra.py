"""trlx hydra heads on the pinned transformers: the frozen reference head must reproduce the policy exactly at
initialisation (max |logits diff| == 0) for every architecture trlx has a branch for (GPT-2, GPT-J, GPT-Neo,
GPT-NeoX, OPT, BLOOM, LLaMA, GPTBigCode), under every attention implementation the model supports on CPU (SDPA,
eager) — GPT-J is silently wrong on transformers 4.45+, BLOOM/LLaMA needed patch 0003, GPT-2/GPT-NeoX under SDPA,
OPT and GPTBigCode patch 0010. Also the other library patches that need no training run.

Skipped, with the reason, when upstream/trlx is not set up.
"""
from __future__ import annotations

import pytest

pytestmark = [pytest.mark.upstream]

ARCHES = ["tiny-bloom", "tiny-gptj", "tiny-llama"]


@pytest.fixture(scope="module")
def trlx_modules(trlx_dir):
    from rlhf_overlay.trlx_jobs.common import import_trlx

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


# One tiny random config per architecture trlx has a hydra branch for (trlx.models.modeling_ppo.hf_get_branch_class);
# 3 layers, so 1 or 2 unfrozen layers leave a trunk below the branch. GPT-Neo mixes global and local (window 4)
# attention; LLaMA uses grouped-query attention; GPTBigCode comes as multi-query (StarCoder) and multi-head.
BRANCH_CONFIGS = {
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=3, n_head=4, n_positions=64)),
    "gptj": ("GPTJConfig", dict(n_embd=32, n_layer=3, n_head=4, rotary_dim=4, n_positions=64)),
    "gpt_neo": ("GPTNeoConfig", dict(hidden_size=32, num_layers=3, num_heads=4, max_position_embeddings=64,
                                     attention_types=[[["global", "local", "global"], 1]], window_size=4)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                       intermediate_size=64, rotary_pct=0.25, max_position_embeddings=64)),
    "opt": ("OPTConfig", dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, ffn_dim=64,
                              word_embed_proj_dim=32, max_position_embeddings=64)),
    "bloom": ("BloomConfig", dict(hidden_size=32, n_layer=3, n_head=4)),
    "llama": ("LlamaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=64)),
    "gpt_bigcode": ("GPTBigCodeConfig", dict(n_embd=32, n_layer=3, n_head=4, n_positions=64, multi_query=True)),
    "gpt_bigcode_mha": ("GPTBigCodeConfig", dict(n_embd=32, n_layer=3, n_head=4, n_positions=64, multi_query=False)),
}
VOCAB = 97


def _branch_cases():
    """(architecture, attention implementation) for every implementation the architecture has on CPU."""
    import transformers

    cases = []
    for arch, (config_name, kwargs) in BRANCH_CONFIGS.items():
        config = getattr(transformers, config_name)(vocab_size=VOCAB, **kwargs)
        model_class = transformers.AutoModelForCausalLM._model_mapping[type(config)]
        cases += [(arch, impl) for impl in ("sdpa", "eager") if impl == "eager" or model_class._supports_sdpa]
    return cases


@pytest.fixture(scope="module")
def branch_model_dirs(tmp_path_factory):
    """Each architecture of BRANCH_CONFIGS saved once as a random-init HF folder."""
    import torch
    import transformers

    dirs = {}
    for arch, (config_name, kwargs) in BRANCH_CONFIGS.items():
        config = getattr(transformers, config_name)(vocab_size=VOCAB, **kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config)
        dirs[arch] = tmp_path_factory.mktemp(arch)
        model.save_pretrained(dirs[arch])
    return dirs


@pytest.mark.parametrize("unfrozen", [1, 2])
@pytest.mark.parametrize("arch,implementation", _branch_cases())
def test_every_branch_is_exact_under_its_attention_implementation(trlx_modules, branch_model_dirs, arch,
                                                                   implementation, unfrozen):
    import torch

    model = trlx_modules.AutoModelForCausalLMWithHydraValueHead.from_pretrained(
        str(branch_model_dirs[arch]), num_layers_unfrozen=unfrozen, attn_implementation=implementation).eval()
    assert model.base_model.config._attn_implementation == implementation
    assert type(model.frozen_head) is trlx_modules.hf_get_branch_class(model.base_model.config)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0   # left padding, as trlx batches prompts
    mask[1, :9] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        policy = model(ids, attention_mask=mask, position_ids=pos, return_dict=True).logits
        ref = model.forward_hydra(ids, attention_mask=mask, position_ids=pos, return_dict=True).logits
        unpadded = model(ids[2:], return_dict=True).logits
        ref_unpadded = model.forward_hydra(ids[2:], return_dict=True).logits
    assert torch.isfinite(ref[mask.bool()]).all()
    assert (policy - ref).abs()[mask.bool()].max().item() == 0.0, f"{arch}/{implementation}: real tokens differ"
    assert (policy - ref).abs().max().item() == 0.0, f"{arch}/{implementation}: padded positions differ"
    assert (unpadded - ref_unpadded).abs().max().item() == 0.0, f"{arch}/{implementation}: without a mask"


def test_tied_embeddings_survive_save_and_load(trlx_modules, tiny_assets, tmp_path):
    """Patch 0009: BLOOM ties lm_head to the word embeddings; safetensors stores the tensor once and trlx's strict
    reload failed with "Missing key(s) in state_dict: base_model.lm_head.weight" (resuming a trlx BLOOM run)."""
    import torch

    cls = trlx_modules.AutoModelForCausalLMWithHydraValueHead
    model = cls.from_pretrained(str(tiny_assets / "models" / "tiny-bloom"), num_layers_unfrozen=1)
    assert model.base_model.lm_head.weight is model.base_model.transformer.word_embeddings.weight
    with torch.no_grad():
        model.base_model.transformer.word_embeddings.weight.add_(0.5)   # a trained model differs from the base
        model.v_head[-1].bias.fill_(3.0)
    model.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(str(tmp_path))
    assert loaded.base_model.lm_head.weight is loaded.base_model.transformer.word_embeddings.weight
    saved, back = model.state_dict(), loaded.state_dict()
    assert saved.keys() == back.keys()
    for key in saved:
        assert torch.equal(saved[key], back[key]), key


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

    from rlhf_overlay.trlx_jobs.common import trlx_env

    assert importlib.util.find_spec("ray") is None and importlib.util.find_spec("wandb") is None, \
        "this test is only meaningful in an environment without ray and wandb (the project's venv)"
    code = ("import trlx; from trlx.trainer.accelerate_ppo_trainer import AcceleratePPOTrainer; "
            "from trlx.trainer.accelerate_rft_trainer import AccelerateRFTTrainer; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=trlx_env(cpu=True),
                         timeout=300, cwd="/")
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]
