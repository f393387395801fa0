"""Test helpers for the Megatron <-> HF converters, written from Megatron's side, independently of toolkits/.

- tiny HF models (LLaMA GQA, LLaMA MHA, BLOOM) with every weight random (norms and biases too);
- synthetic Megatron checkpoints: per-rank tensors drawn at Megatron's per-rank shapes, written with torch.save
  in any of the spellings real checkpoints use, with `args` pickled from a fake `megatron` package;
- a reader for Megatron rank files and a reference forward pass computed from the per-rank tensors with
  Megatron's equations (vocab-parallel embedding, grouped fused QKV, rotary, SwiGLU, RMSNorm / LayerNorm,
  alibi, row-parallel partial sums added up as the all-reduce would), so that a converter and this reference
  cannot agree on a shared mistake.

Per-rank tensors are kept as {(tp, pp): {"globals": {name: t}, "layers": {global index: {local name: t}}}} with
canonical names (`language_model.embedding.word_embeddings.weight`, `input_layernorm.weight`, ...).
"""
from __future__ import annotations

import argparse
import contextlib
import enum
import math
import random
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

EMBEDDING = "language_model.embedding.word_embeddings.weight"
EMBEDDING_NORM = "language_model.embedding.word_embeddings.norm"
FINAL_NORM = "language_model.encoder.final_layernorm"
OUTPUT_LAYER = "language_model.output_layer.weight"


# ----------------------------------------------------------------------------- tiny HF models
@dataclass(frozen=True)
class TinyModel:
    family: str          # "llama2" | "bloom"
    hidden: int
    heads: int
    groups: int          # KV heads (== heads for MHA and BLOOM)
    ffn: int
    layers: int
    vocab: int
    eps: float = 1e-5
    rope_theta: float = 500000.0   # not the default, so a converter that drops it is caught
    max_positions: int = 96

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


TINY_MODELS = {
    "llama_gqa": TinyModel("llama2", hidden=64, heads=8, groups=4, ffn=96, layers=4, vocab=100),
    "llama_mha": TinyModel("llama2", hidden=48, heads=4, groups=4, ffn=80, layers=4, vocab=90),
    # 12 heads: not a power of two, so alibi's extra slopes are exercised too
    "bloom": TinyModel("bloom", hidden=48, heads=12, groups=12, ffn=192, layers=4, vocab=100),
}


def build_hf_model(tiny: TinyModel, seed: int = 0):
    """A random HF model; norms and biases are random too so that swapping any two of them shows."""
    from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    if tiny.family == "llama2":
        config = LlamaConfig(vocab_size=tiny.vocab, hidden_size=tiny.hidden, intermediate_size=tiny.ffn,
                             num_hidden_layers=tiny.layers, num_attention_heads=tiny.heads,
                             num_key_value_heads=tiny.groups, rms_norm_eps=tiny.eps, rope_theta=tiny.rope_theta,
                             max_position_embeddings=tiny.max_positions, initializer_range=0.15,
                             bos_token_id=1, eos_token_id=2)
        model = LlamaForCausalLM(config)
    else:
        config = BloomConfig(vocab_size=tiny.vocab, hidden_size=tiny.hidden, n_layer=tiny.layers, n_head=tiny.heads,
                             layer_norm_epsilon=tiny.eps, initializer_range=0.15)
        model = BloomForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("ln_f.weight"):
                param.uniform_(0.5, 1.5) if name.endswith("weight") else param.normal_(0, 0.1)
            elif name.endswith("bias"):
                param.normal_(0, 0.1)
    return model.eval()


def hf_logits(folder: Path, tokens: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32).to(dtype).eval()
    with torch.no_grad():  # the head applied by hand: LlamaForCausalLM would cast float64 logits to float32
        return model.get_output_embeddings()(model.base_model(tokens).last_hidden_state)


# ----------------------------------------------------------------------------- synthetic Megatron tensors
def padded_vocab(vocab: int, tp: int, divisible_by: int = 128) -> int:
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple


def stage_layers(layers: int, pp: int) -> list[list[int]]:
    per_stage = layers // pp
    return [list(range(p * per_stage, (p + 1) * per_stage)) for p in range(pp)]


def random_megatron_ranks(tiny: TinyModel, tp: int, pp: int, seed: int = 0, padded: int | None = None) -> dict:
    """Per-rank tensors at Megatron's per-rank shapes; replicated tensors are the same on every TP rank."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.15):
        return torch.randn(*shape, generator=gen) * scale

    def norm_weight(n):
        return 0.5 + torch.rand(n, generator=gen)

    h, hd, ffn_r = tiny.hidden, tiny.head_dim, tiny.ffn // tp
    heads_r, groups_r = tiny.heads // tp, tiny.groups // tp
    vocab_r = (padded or padded_vocab(tiny.vocab, tp)) // tp
    llama = tiny.family == "llama2"

    def replicated(make):
        value = make()
        return [value] * tp

    layers = {}
    for i in range(tiny.layers):
        per_rank: list[dict] = [{} for _ in range(tp)]

        def put(name, values):
            for t in range(tp):
                per_rank[t][name] = values[t]
        put("input_layernorm.weight", replicated(lambda: norm_weight(h)))
        put("post_attention_layernorm.weight", replicated(lambda: norm_weight(h)))
        if llama:
            put("self_attention.query_key_value.weight",
                [rand(groups_r * (tiny.heads // tiny.groups + 2) * hd, h) for _ in range(tp)])
            put("self_attention.dense.weight", [rand(h, heads_r * hd) for _ in range(tp)])
            put("mlp.dense_h_to_4h.weight", [rand(2 * ffn_r, h) for _ in range(tp)])
            put("mlp.dense_4h_to_h.weight", [rand(h, ffn_r) for _ in range(tp)])
        else:
            put("input_layernorm.bias", replicated(lambda: rand(h, scale=0.1)))
            put("post_attention_layernorm.bias", replicated(lambda: rand(h, scale=0.1)))
            put("self_attention.query_key_value.weight", [rand(3 * heads_r * hd, h) for _ in range(tp)])
            put("self_attention.query_key_value.bias", [rand(3 * heads_r * hd, scale=0.1) for _ in range(tp)])
            put("self_attention.dense.weight", [rand(h, heads_r * hd) for _ in range(tp)])
            put("self_attention.dense.bias", replicated(lambda: rand(h, scale=0.1)))
            put("mlp.dense_h_to_4h.weight", [rand(ffn_r, h) for _ in range(tp)])
            put("mlp.dense_h_to_4h.bias", [rand(ffn_r, scale=0.1) for _ in range(tp)])
            put("mlp.dense_4h_to_h.weight", [rand(h, ffn_r) for _ in range(tp)])
            put("mlp.dense_4h_to_h.bias", replicated(lambda: rand(h, scale=0.1)))
        layers[i] = per_rank

    ranks = {}
    final_norm = norm_weight(h)
    final_bias, emb_norm, emb_bias = rand(h, scale=0.1), norm_weight(h), rand(h, scale=0.1)
    embedding = [rand(vocab_r, h) for _ in range(tp)]
    output = [rand(vocab_r, h) for _ in range(tp)]
    for p, layer_ids in enumerate(stage_layers(tiny.layers, pp)):
        for t in range(tp):
            globals_ = {}
            if p == 0:
                globals_[EMBEDDING] = embedding[t]
                if not llama:
                    globals_[EMBEDDING_NORM + ".weight"], globals_[EMBEDDING_NORM + ".bias"] = emb_norm, emb_bias
            if p == pp - 1:
                globals_[FINAL_NORM + ".weight"] = final_norm
                if llama:
                    globals_[OUTPUT_LAYER] = output[t]
                else:
                    globals_[FINAL_NORM + ".bias"] = final_bias
            ranks[(t, p)] = {"globals": globals_, "layers": {i: layers[i][t] for i in layer_ids}}
    return ranks


# ----------------------------------------------------------------------------- fake megatron + writing
@contextlib.contextmanager
def fake_megatron_modules():
    """Install a stand-in `megatron` package so pickles reference megatron.core.enums.* as real runs do."""
    names = ["megatron", "megatron.core", "megatron.core.enums"]
    modules = {name: types.ModuleType(name) for name in names}

    class ModelType(enum.Enum):
        encoder_or_decoder = 1
        encoder_and_decoder = 2

    class AttnMaskType(enum.Enum):
        padding = 1
        causal = 2

    for cls in (ModelType, AttnMaskType):
        cls.__module__, cls.__qualname__ = "megatron.core.enums", cls.__name__
        setattr(modules["megatron.core.enums"], cls.__name__, cls)
    saved = {name: sys.modules.get(name) for name in names}
    sys.modules.update(modules)
    try:
        yield modules["megatron.core.enums"]
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def megatron_args(tiny: TinyModel, tp: int, pp: int, enums, padded: int, **extra) -> argparse.Namespace:
    """Args as a Megatron-LM run pickles them: architecture, parallelism and some Megatron enum values."""
    fields = dict(num_layers=tiny.layers, hidden_size=tiny.hidden, ffn_hidden_size=tiny.ffn,
                  num_attention_heads=tiny.heads, seq_length=tiny.max_positions,
                  max_position_embeddings=tiny.max_positions, tensor_model_parallel_size=tp,
                  pipeline_model_parallel_size=pp, padded_vocab_size=padded, make_vocab_size_divisible_by=128,
                  params_dtype=torch.float32, model_type=enums.ModelType.encoder_or_decoder,
                  attn_mask_type=enums.AttnMaskType.causal, iteration=100, consumed_train_samples=12800)
    if tiny.family == "llama2":
        fields.update(group_query_attention=tiny.groups != tiny.heads, num_query_groups=tiny.groups,
                      norm_epsilon=tiny.eps, rotary_base=tiny.rope_theta, swiglu=True,
                      untie_embeddings_and_output_weights=True, normalization="RMSNorm")
    else:
        fields.update(layernorm_epsilon=tiny.eps, position_embedding_type="alibi")
    fields.update(extra)
    return argparse.Namespace(**fields)


@dataclass
class Spelling:
    """Which of the spellings found in real checkpoints to write."""
    encoder_key: str = "encoder"            # or "transformer" (older Megatron-LM)
    norm_names: str = "layernorm"           # or "norm" (input_norm, post_attention_norm, final_norm)
    split_qkv: bool = False                 # query + key_value (Pai-Megatron-Patch llama2-70b)
    split_h_to_4h: bool = False             # dense_h_to_4h_1 (gate) + dense_h_to_4h_2 (up)
    file_name: str = "model_optim_rng.pt"   # or model_rng.pt
    iteration: str = "release"              # or a number -> iter_%07d
    virtual_chunks: int = 1                 # > 1: model0, model1, ... interleaved layers
    rotary_inv_freq: bool = False           # rotary buffers saved per layer
    pai_lm_head: bool = False               # Pai-Megatron-Patch's extra model.lm_head copy


def _spell_layer(local: dict, tiny: TinyModel, spelling: Spelling) -> dict:
    out = {}
    for name, tensor in local.items():
        if spelling.norm_names == "norm":
            name = name.replace("input_layernorm", "input_norm").replace("post_attention_layernorm",
                                                                         "post_attention_norm")
        if spelling.split_qkv and name == "self_attention.query_key_value.weight":
            per_group = tensor.reshape(-1, tiny.heads // tiny.groups + 2, tiny.head_dim, tiny.hidden)
            out["self_attention.query.weight"] = per_group[:, :-2].reshape(-1, tiny.hidden).clone()
            out["self_attention.key_value.weight"] = per_group[:, -2:].reshape(-1, tiny.hidden).clone()
        elif spelling.split_h_to_4h and name == "mlp.dense_h_to_4h.weight":
            gate, up = tensor.chunk(2, dim=0)
            out["mlp.dense_h_to_4h_1.weight"], out["mlp.dense_h_to_4h_2.weight"] = gate.clone(), up.clone()
        else:
            out[name] = tensor
    if spelling.rotary_inv_freq:
        out["self_attention.rotary_emb.inv_freq"] = torch.ones(tiny.head_dim // 2)
    return out


def _model_dict(globals_: dict, layers: dict[int, dict], tiny: TinyModel, spelling: Spelling) -> dict:
    language_model: dict = {}
    encoder = {f"layers.{i}.{name}": t for i, local in layers.items()
               for name, t in _spell_layer(local, tiny, spelling).items()}
    for name, tensor in globals_.items():
        if name == EMBEDDING:
            language_model.setdefault("embedding", {}).setdefault("word_embeddings", {})["weight"] = tensor
        elif name.startswith(EMBEDDING_NORM):
            language_model["embedding"]["word_embeddings"]["norm." + name.rsplit(".", 1)[1]] = tensor
        elif name.startswith(FINAL_NORM):
            final = "final_norm" if spelling.norm_names == "norm" else "final_layernorm"
            encoder[f"{final}.{name.rsplit('.', 1)[1]}"] = tensor
        elif name == OUTPUT_LAYER:
            language_model["output_layer"] = {"weight": tensor}
    language_model[spelling.encoder_key] = encoder
    model = {"language_model": language_model}
    if spelling.pai_lm_head and OUTPUT_LAYER in globals_:
        model["lm_head"] = {"weight": globals_[OUTPUT_LAYER]}
    return model


def write_megatron_checkpoint(root: Path, tiny: TinyModel, ranks: dict, tp: int, pp: int,
                              spelling: Spelling | None = None, padded: int | None = None, **extra_args) -> Path:
    """torch.save every rank as Megatron-LM does: tracker file, iteration folder, mp_rank_* folders, args with
    Megatron enums (from a fake megatron package that is gone again afterwards), rng state with numpy arrays."""
    spelling = spelling or Spelling()
    padded = padded or padded_vocab(tiny.vocab, tp)
    root.mkdir(parents=True, exist_ok=True)
    (root / "latest_checkpointed_iteration.txt").write_text(spelling.iteration)
    folder = root / ("release" if spelling.iteration == "release" else f"iter_{int(spelling.iteration):07d}")
    with fake_megatron_modules() as enums:
        args = megatron_args(tiny, tp, pp, enums, padded, **extra_args)
        for (t, p), rank in ranks.items():
            state = {"args": args, "checkpoint_version": 3.0, "iteration": 100,
                     "rng_state": [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                                    "torch_rng_state": torch.get_rng_state()}]}
            if spelling.virtual_chunks == 1:
                state["model"] = _model_dict(rank["globals"], _local(rank["layers"]), tiny, spelling)
            else:
                for c, (globals_, layers) in enumerate(_virtual_chunks(rank, tiny, pp, p, spelling.virtual_chunks)):
                    state[f"model{c}"] = _model_dict(globals_, layers, tiny, spelling)
            if tiny.family == "bloom" and pp > 1 and p == pp - 1 and "model" in state:
                # Megatron's last stage keeps its own copy of the tied embedding
                state["model"]["word_embeddings_for_head"] = {"weight": ranks[(t, 0)]["globals"][EMBEDDING]}
            rank_dir = folder / (f"mp_rank_{t:02d}" if pp == 1 else f"mp_rank_{t:02d}_{p:03d}")
            rank_dir.mkdir(parents=True)
            torch.save(state, rank_dir / spelling.file_name)
    return root


def _local(layers: dict[int, dict]) -> dict[int, dict]:
    first = min(layers) if layers else 0
    return {i - first: local for i, local in layers.items()}


def _virtual_chunks(rank: dict, tiny: TinyModel, pp: int, p: int, vp: int):
    """Megatron's interleaved schedule: chunk c of stage p holds layers c*L/vp + p*L/(pp*vp) + [0, L/(pp*vp))."""
    per_chunk = tiny.layers // (pp * vp)
    for c in range(vp):
        is_first, is_last = c == 0 and p == 0, c == vp - 1 and p == pp - 1
        start = c * (tiny.layers // vp) + p * per_chunk
        globals_ = {n: t for n, t in rank["globals"].items()
                    if (is_first if n == EMBEDDING or n.startswith(EMBEDDING_NORM) else is_last)}
        yield globals_, {i: rank["all_layers"][start + i] for i in range(per_chunk)}


def virtual_pipeline_ranks(tiny: TinyModel, tp: int, pp: int, vp: int, seed: int = 0) -> dict:
    """random_megatron_ranks regrouped for an interleaved (virtual) pipeline; `layers` keep global indices."""
    flat = random_megatron_ranks(tiny, tp, 1, seed)
    per_chunk = tiny.layers // (pp * vp)
    ranks = {}
    for t in range(tp):
        all_layers = flat[(t, 0)]["layers"]
        for p in range(pp):
            mine = {c * (tiny.layers // vp) + p * per_chunk + i for c in range(vp) for i in range(per_chunk)}
            ranks[(t, p)] = {"globals": dict(flat[(t, 0)]["globals"]), "all_layers": all_layers,
                             "layers": {i: all_layers[i] for i in sorted(mine)}}
    return ranks


# ----------------------------------------------------------------------------- reading Megatron files
def read_megatron_checkpoint(root: Path) -> tuple[dict, argparse.Namespace, int, int]:
    """Per-rank canonical tensors of a checkpoint written by the converter (release/, `layernorm` names)."""
    folder = root / "release"
    rank_dirs = sorted(folder.glob("mp_rank_*"))
    tp = len({d.name[8:10] for d in rank_dirs})
    pp = len(rank_dirs) // tp
    ranks, offset, args = {}, 0, None
    for p in range(pp):
        count = 0
        for t in range(tp):
            name = f"mp_rank_{t:02d}" if pp == 1 else f"mp_rank_{t:02d}_{p:03d}"
            state = torch.load(folder / name / "model_optim_rng.pt", weights_only=False)
            args = state["args"]
            lm = state["model"]["language_model"]
            globals_, layers = {}, {}
            if "embedding" in lm:
                we = lm["embedding"]["word_embeddings"]
                globals_[EMBEDDING] = we["weight"]
                for key in ("norm.weight", "norm.bias"):
                    if key in we:
                        globals_[f"{EMBEDDING_NORM}.{key[5:]}"] = we[key]
            for key, tensor in lm["encoder"].items():
                if key.startswith("layers."):
                    _, i, local = key.split(".", 2)
                    layers.setdefault(offset + int(i), {})[local] = tensor
                else:
                    globals_[f"{FINAL_NORM}.{key.rsplit('.', 1)[1]}"] = tensor
            if "output_layer" in lm:
                globals_[OUTPUT_LAYER] = lm["output_layer"]["weight"]
            ranks[(t, p)] = {"globals": globals_, "layers": layers}
            count = len(layers)
        offset += count
    return ranks, args, tp, pp


# ----------------------------------------------------------------------------- reference forward
def _vocab_parallel_embedding(tables: list[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    rows = tables[0].shape[0]
    out = 0
    for r, table in enumerate(tables):
        local = tokens - r * rows
        inside = (local >= 0) & (local < rows)
        out = out + table[local.clamp(0, rows - 1)] * inside[..., None]  # the all-reduce of VocabParallelEmbedding
    return out


def _rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotary(x, theta):  # x: [b, s, heads, hd]; Megatron's rotate_half form
    hd, seq = x.shape[-1], x.shape[1]
    freqs = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), freqs)
    angles = torch.cat([angles, angles], dim=-1)[None, :, None, :].to(x.dtype)
    x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
    return x * angles.cos() + torch.cat([-x2, x1], dim=-1) * angles.sin()


def _alibi_slopes(heads: int) -> torch.Tensor:
    closest = 2 ** math.floor(math.log2(heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base ** k for k in range(1, closest + 1)]
    if closest != heads:
        extra_base = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra_base ** k for k in range(1, 2 * (heads - closest), 2)]
    return torch.tensor(slopes, dtype=torch.float64)


def _attention(q, k, v, bias=None):  # [b, s, heads, hd] each; causal
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    seq = q.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v).flatten(2)


def reference_logits(ranks: dict, tiny: TinyModel, tp: int, pp: int, tokens: torch.Tensor, vocab: int,
                     dtype=torch.float64) -> torch.Tensor:
    """Logits of the Megatron model held in `ranks`, computed rank by rank as Megatron's TP forward does."""
    def rank_layer(i, t):
        return next(r["layers"][i] for (rt, _), r in ranks.items() if rt == t and i in r["layers"])

    def glob(name):
        return [next(r["globals"][name] for (rt, _), r in ranks.items() if rt == t and name in r["globals"])
                .to(dtype) for t in range(tp)]

    hd, llama = tiny.head_dim, tiny.family == "llama2"
    x = _vocab_parallel_embedding(glob(EMBEDDING), tokens)
    if not llama:
        x = F.layer_norm(x, (tiny.hidden,), glob(EMBEDDING_NORM + ".weight")[0], glob(EMBEDDING_NORM + ".bias")[0],
                         tiny.eps)
        heads_r = tiny.heads // tp
        slopes = _alibi_slopes(tiny.heads).to(dtype)
        key_positions = torch.arange(tokens.shape[1], dtype=dtype)
    for i in range(tiny.layers):
        w = [{n: t.to(dtype) for n, t in rank_layer(i, t).items()} for t in range(tp)]
        if llama:
            y = _rms_norm(x, w[0]["input_layernorm.weight"], tiny.eps)
            attn = 0
            for t in range(tp):
                per_group = tiny.heads // tiny.groups
                qkv = (y @ w[t]["self_attention.query_key_value.weight"].T).unflatten(-1, (-1, per_group + 2, hd))
                q = qkv[..., :per_group, :].flatten(2, 3)
                k = qkv[..., per_group, :].repeat_interleave(per_group, dim=2)
                v = qkv[..., per_group + 1, :].repeat_interleave(per_group, dim=2)
                ctx = _attention(_rotary(q, tiny.rope_theta), _rotary(k, tiny.rope_theta), v)
                attn = attn + ctx @ w[t]["self_attention.dense.weight"].T  # row-parallel: partial sums
            x = x + attn
            y = _rms_norm(x, w[0]["post_attention_layernorm.weight"], tiny.eps)
            mlp = 0
            for t in range(tp):
                gate, up = (y @ w[t]["mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
                mlp = mlp + (F.silu(gate) * up) @ w[t]["mlp.dense_4h_to_h.weight"].T
            x = x + mlp
        else:
            y = F.layer_norm(x, (tiny.hidden,), w[0]["input_layernorm.weight"], w[0]["input_layernorm.bias"], tiny.eps)
            attn = w[0]["self_attention.dense.bias"]
            for t in range(tp):
                qkv = y @ w[t]["self_attention.query_key_value.weight"].T + w[t]["self_attention.query_key_value.bias"]
                q, k, v = qkv.unflatten(-1, (heads_r, 3, hd)).unbind(dim=3)
                alibi = (slopes[t * heads_r:(t + 1) * heads_r, None, None] * key_positions)[None]
                attn = attn + _attention(q, k, v, alibi) @ w[t]["self_attention.dense.weight"].T
            x = x + attn
            y = F.layer_norm(x, (tiny.hidden,), w[0]["post_attention_layernorm.weight"],
                             w[0]["post_attention_layernorm.bias"], tiny.eps)
            mlp = w[0]["mlp.dense_4h_to_h.bias"]
            for t in range(tp):
                a = F.gelu(y @ w[t]["mlp.dense_h_to_4h.weight"].T + w[t]["mlp.dense_h_to_4h.bias"], approximate="tanh")
                mlp = mlp + a @ w[t]["mlp.dense_4h_to_h.weight"].T
            x = x + mlp
    if llama:
        x = _rms_norm(x, glob(FINAL_NORM + ".weight")[0], tiny.eps)
        head = glob(OUTPUT_LAYER)
    else:
        x = F.layer_norm(x, (tiny.hidden,), glob(FINAL_NORM + ".weight")[0], glob(FINAL_NORM + ".bias")[0], tiny.eps)
        head = glob(EMBEDDING)
    logits = torch.cat([x @ table.T for table in head], dim=-1)  # column-parallel head, gathered
    return logits[..., :vocab]
