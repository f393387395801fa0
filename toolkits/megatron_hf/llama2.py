"""The LLaMA family: LLaMA / LLaMA2 (MHA and GQA, e.g. 70B with 8 query groups), Llama 3 / 3.1 (GQA, RoPE
scaling) and Qwen2 (bias on q/k/v): name map, layouts, configs.

    Megatron (under `model.`)                                   HF                               layout
    language_model.embedding.word_embeddings.weight             model.embed_tokens.weight        vocab-parallel
    layers.i.input_layernorm.weight                             model.layers.i.input_layernorm   replicated
    layers.i.self_attention.query_key_value.weight              self_attn.{q,k,v}_proj           grouped QKV
    layers.i.self_attention.dense.weight                        self_attn.o_proj                 row
    layers.i.post_attention_layernorm.weight                    post_attention_layernorm         replicated
    layers.i.mlp.dense_h_to_4h.weight                           mlp.{gate,up}_proj               [gate_r; up_r]
    layers.i.mlp.dense_4h_to_h.weight                           mlp.down_proj                    row
    language_model.encoder.final_layernorm.weight               model.norm.weight                replicated
    language_model.output_layer.weight                          lm_head.weight                   vocab-parallel

    layers.i.self_attention.query_key_value.bias (Qwen2)        self_attn.{q,k,v}_proj.bias      grouped QKV

Megatron-Core names (decoder.layers.i.self_attention.linear_qkv, ...) are mapped onto these in mcore_format.py.
Read-only aliases: `query` + `key_value` (Pai-Megatron-Patch llama2-70b), `dense_h_to_4h_1` / `_2` (gate / up).
Megatron's rotary embedding rotates halves (rotate_half), as HF does, so q/k rows need no permutation.
"""
from __future__ import annotations

from typing import Any

import torch

from toolkits.megatron_hf.errors import ConversionError, note
from toolkits.megatron_hf.megatron_format import arg, check_declared
from toolkits.megatron_hf.tensor_parallel import (COLUMN, REPLICATED, ROW, VOCAB, GroupedQKV, GroupedQueryAndKeyValue,
                                                  ModelDims, Param, SwiGLUGateUp)

FAMILY = "llama2"
HF_LAYER_PREFIX = "model.layers.{}."
EMBEDDING = "language_model.embedding.word_embeddings.weight"
FINAL_NORM = "language_model.encoder.final_layernorm.weight"
OUTPUT_LAYER = "language_model.output_layer.weight"
QKV = "self_attention.query_key_value.weight"
H_TO_4H = "mlp.dense_h_to_4h.weight"
QKV_BIAS = "self_attention.query_key_value.bias"
# Megatron-Core's Llama 3.1 RoPE scaling has these fixed (only the factor is an argument, --rope-scaling-factor).
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

_LLAMA2 = dict(norm_epsilon=1e-5, rope_theta=10000.0, max_position_embeddings=4096, vocab_size=32000,
               bos_token_id=1, eos_token_id=2)
_LLAMA1 = dict(_LLAMA2, norm_epsilon=1e-6, max_position_embeddings=2048)
# MODEL_NAME only fills what a checkpoint's args lack (heads, eps, rope theta, max positions, vocab, bos/eos).
PRESETS = {
    "llama2-7b": dict(_LLAMA2, hidden_size=4096, num_attention_heads=32, num_query_groups=32),
    "llama2-13b": dict(_LLAMA2, hidden_size=5120, num_attention_heads=40, num_query_groups=40),
    "llama2-70b": dict(_LLAMA2, hidden_size=8192, num_attention_heads=64, num_query_groups=8),
    "llama-7b": dict(_LLAMA1, hidden_size=4096, num_attention_heads=32, num_query_groups=32),
    "llama-13b": dict(_LLAMA1, hidden_size=5120, num_attention_heads=40, num_query_groups=40),
    "llama-30b": dict(_LLAMA1, hidden_size=6656, num_attention_heads=52, num_query_groups=52),
    "llama-65b": dict(_LLAMA1, hidden_size=8192, num_attention_heads=64, num_query_groups=64),
}
FAMILY_DEFAULTS = _LLAMA2

LAYER_PARAMS = [
    Param(("input_layernorm.weight",), ("input_layernorm.weight",), REPLICATED),
    Param((QKV,), ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), GroupedQKV()),
    Param(("self_attention.dense.weight",), ("self_attn.o_proj.weight",), ROW),
    Param(("post_attention_layernorm.weight",), ("post_attention_layernorm.weight",), REPLICATED),
    Param((H_TO_4H,), ("mlp.gate_proj.weight", "mlp.up_proj.weight"), SwiGLUGateUp()),
    Param(("mlp.dense_4h_to_h.weight",), ("mlp.down_proj.weight",), ROW),
]
# Present only in some models (Qwen2's q/k/v bias): read when found, written when the HF model has it.
OPTIONAL_LAYER_PARAMS = [
    Param((QKV_BIAS,), ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), GroupedQKV()),
]
# Other spellings of a canonical Param, accepted when reading (the key is the canonical megatron names).
LAYER_ALIASES = {
    (QKV,): Param(("self_attention.query.weight", "self_attention.key_value.weight"),
                  ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
                  GroupedQueryAndKeyValue()),
    (H_TO_4H,): Param(("mlp.dense_h_to_4h_1.weight", "mlp.dense_h_to_4h_2.weight"),
                      ("mlp.gate_proj.weight", "mlp.up_proj.weight"), COLUMN),
}


def first_stage_params(dims: ModelDims) -> list[Param]:
    return [Param((EMBEDDING,), ("model.embed_tokens.weight",), VOCAB)]


def last_stage_params(dims: ModelDims, pp: int) -> list[Param]:
    params = [Param((FINAL_NORM,), ("model.norm.weight",), REPLICATED)]
    if not dims.tie_word_embeddings:
        params.append(Param((OUTPUT_LAYER,), ("lm_head.weight",), VOCAB))
    return params


def write_only_last_stage_params(dims: ModelDims, pp: int) -> list[Param]:
    """Written for Megatron, skipped when reading: a tied head on a last stage without the embedding (PP > 1)
    is computed from Megatron's copy `word_embeddings_for_head`. LLaMA2 itself is untied."""
    if pp == 1 or not dims.tie_word_embeddings:
        return []
    return [Param(("word_embeddings_for_head.weight",), ("model.embed_tokens.weight",), VOCAB)]


def layer_hf_shapes(d: ModelDims) -> dict[str, tuple[int, ...]]:
    h, q, kv, f = d.hidden_size, d.num_attention_heads * d.head_dim, d.num_query_groups * d.head_dim, d.ffn_hidden_size
    return {"input_layernorm.weight": (h,), "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
            "post_attention_layernorm.weight": (h,), "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h),
            "mlp.down_proj.weight": (h, f),
            **({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
               if d.qkv_bias else {})}


def layer_params(d: ModelDims) -> list[Param]:
    """The layer table of this model (with Qwen2's q/k/v bias when it has one)."""
    return LAYER_PARAMS + (OPTIONAL_LAYER_PARAMS if d.qkv_bias else [])


def global_hf_shapes(d: ModelDims) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (d.hf_vocab_size, d.hidden_size), "model.norm.weight": (d.hidden_size,)}
    if not d.tie_word_embeddings:
        shapes["lm_head.weight"] = (d.hf_vocab_size, d.hidden_size)
    return shapes


def canonical_hf_name(name: str) -> str | None:
    """HF names we read as they are; None for tensors that carry nothing to convert."""
    return None if name.endswith("rotary_emb.inv_freq") else name


# ----------------------------------------------------------------------------- Megatron -> dims
def dims_from_megatron(args: Any, global_shapes: dict, layer_shapes: dict, tp: int, num_layers: int,
                       preset: dict) -> ModelDims:
    """Architecture from tensor shapes first, then checkpoint args, then MODEL_NAME's preset."""
    rows_per_rank, hidden = global_shapes[EMBEDDING]
    check_declared(args, ("hidden_size",), hidden, f"{EMBEDDING} of shape {(rows_per_rank, hidden)}")
    heads = arg(args, "num_attention_heads", default=preset.get("num_attention_heads"))
    if heads is None:
        raise ConversionError("the checkpoint args do not give num_attention_heads; pass MODEL_NAME / --model-name "
                              f"(one of {', '.join(PRESETS)}) so the heads can be taken from it")
    head_dim = arg(args, "kv_channels", default=hidden // heads)
    if head_dim * heads != hidden:
        raise ConversionError(f"{heads} heads x head_dim {head_dim} != hidden size {hidden}; HF LLaMA (transformers "
                              f"4.44) needs head_dim = hidden / heads")
    if heads % tp:
        raise ConversionError(f"TP={tp} does not divide the {heads} attention heads declared by the checkpoint")
    if QKV in layer_shapes:
        rows = layer_shapes[QKV][0] * tp
        groups, evidence = (rows // head_dim - heads) / 2, f"layers.*.{QKV} with {layer_shapes[QKV][0]} rows per rank"
        fits = rows % head_dim == 0
    elif "self_attention.key_value.weight" in layer_shapes:
        rows = layer_shapes["self_attention.key_value.weight"][0] * tp
        groups, evidence = rows / (2 * head_dim), f"layers.*.self_attention.key_value.weight with {rows // tp} rows"
        fits = True
    else:
        raise ConversionError(f"no {QKV} (or query + key_value) in the first layer; names found: "
                              f"{', '.join(sorted(layer_shapes))}")
    fits = fits and groups == int(groups) and groups >= 1 and heads % int(groups) == 0 and int(groups) % tp == 0
    if not fits:
        raise ConversionError(f"{evidence} (TP={tp}) does not fit {heads} heads of size {head_dim}: a rank must hold "
                              f"(heads + 2 x query groups) x head_dim / TP rows, with TP dividing the query groups")
    groups = int(groups)
    if arg(args, "group_query_attention"):
        check_declared(args, ("num_query_groups",), groups, evidence)
    check_declared(args, ("n_head_kv",), groups, evidence)
    if H_TO_4H in layer_shapes:
        ffn, evidence = layer_shapes[H_TO_4H][0] * tp // 2, f"layers.*.{H_TO_4H}"
    elif "mlp.dense_h_to_4h_1.weight" in layer_shapes:
        ffn, evidence = layer_shapes["mlp.dense_h_to_4h_1.weight"][0] * tp, "layers.*.mlp.dense_h_to_4h_1.weight"
    else:
        raise ConversionError(f"no {H_TO_4H} (or dense_h_to_4h_1/_2) in the first layer")
    check_declared(args, ("ffn_hidden_size",), ffn, evidence)
    rope_scaling = None
    if arg(args, "use_rope_scaling"):
        rope_scaling = {"rope_type": "llama3", "factor": float(arg(args, "rope_scaling_factor", default=8.0)),
                        **MEGATRON_LLAMA3_ROPE}
        if QKV_BIAS in layer_shapes:
            raise ConversionError(_QWEN2_ROPE_SCALING)
    return ModelDims(
        hidden_size=hidden, num_layers=num_layers, num_attention_heads=heads, num_query_groups=groups,
        head_dim=head_dim, ffn_hidden_size=ffn, hf_vocab_size=rows_per_rank * tp,
        megatron_vocab_size=rows_per_rank * tp,
        norm_epsilon=_with_default(args, ("norm_epsilon", "layernorm_epsilon"), preset, "norm_epsilon"),
        rope_theta=_with_default(args, ("rotary_base", "rope_theta"), preset, "rope_theta"),
        max_position_embeddings=_with_default(args, ("max_position_embeddings", "seq_length"), preset,
                                              "max_position_embeddings"),
        tie_word_embeddings=OUTPUT_LAYER not in global_shapes, qkv_bias=QKV_BIAS in layer_shapes,
        rope_scaling=rope_scaling, bos_token_id=arg(args, "bos_token_id", default=preset.get("bos_token_id")),
        eos_token_id=arg(args, "eos_token_id", default=preset.get("eos_token_id")),
        pad_token_id=arg(args, "pad_token_id"))


def _with_default(args: Any, names: tuple[str, ...], preset: dict, key: str):
    value = arg(args, *names, default=preset.get(key))
    if value is None:
        value = FAMILY_DEFAULTS[key]
        note(f"the checkpoint args have no {names[0]}; using the LLaMA2 default {value} (pass MODEL_NAME to choose)")
    return value


# ----------------------------------------------------------------------------- HF -> dims
def dims_from_hf(config: dict, hf_shapes: dict) -> ModelDims:
    model_type = config.get("model_type")
    if model_type not in ("llama", "qwen2"):
        raise ConversionError(f"config.json has model_type {model_type!r}, not 'llama' or 'qwen2'; "
                              f"use the converter for that family")
    unsupported = {"hidden_act": (config.get("hidden_act", "silu"), "silu"),
                   "attention_bias": (config.get("attention_bias", False), False),
                   "mlp_bias": (config.get("mlp_bias", False), False),
                   "use_sliding_window": (config.get("use_sliding_window", False), False)}
    for key, (value, wanted) in unsupported.items():
        if value != wanted:
            raise ConversionError(f"config.json {key}={value!r}: Megatron's LLaMA has {key}={wanted!r}; this model "
                                  f"cannot be represented without changing its outputs")
    rope_scaling = _megatron_rope_scaling(config.get("rope_scaling"))
    qkv_bias = model_type == "qwen2"
    if qkv_bias and rope_scaling:
        raise ConversionError(_QWEN2_ROPE_SCALING)
    if qkv_bias and "model.layers.0.self_attn.q_proj.bias" not in hf_shapes:
        raise ConversionError("config.json says qwen2 but model.layers.0.self_attn.q_proj.bias is missing")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise ConversionError(f"config.json head_dim={head_dim} x {heads} heads != hidden_size {hidden}")
    vocab_rows = hf_shapes["model.embed_tokens.weight"][0]
    if vocab_rows != config["vocab_size"]:
        raise ConversionError(f"model.embed_tokens.weight has {vocab_rows} rows but config.json vocab_size is "
                              f"{config['vocab_size']}; fix config.json")
    return ModelDims(
        hidden_size=hidden, num_layers=config["num_hidden_layers"], num_attention_heads=heads,
        num_query_groups=config.get("num_key_value_heads") or heads, head_dim=head_dim,
        ffn_hidden_size=config["intermediate_size"], hf_vocab_size=vocab_rows, megatron_vocab_size=vocab_rows,
        norm_epsilon=config.get("rms_norm_eps", 1e-6), rope_theta=config.get("rope_theta", 10000.0),
        max_position_embeddings=config.get("max_position_embeddings", 2048),
        tie_word_embeddings=config.get("tie_word_embeddings", False), qkv_bias=qkv_bias, rope_scaling=rope_scaling,
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"), pad_token_id=config.get("pad_token_id"))


_QWEN2_ROPE_SCALING = ("RoPE scaling with bias on q/k/v (Qwen2): HF's Qwen2 (transformers 4.44) does not apply "
                       "rope_scaling, Megatron-Core does, so the two models would differ; not converted")


def _megatron_rope_scaling(scaling: dict | None) -> dict | None:
    """HF rope_scaling that Megatron-Core can reproduce: none, or Llama 3.1's (its fixed frequencies)."""
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    fixed = {k: scaling.get(k) for k in MEGATRON_LLAMA3_ROPE}
    if kind != "llama3" or any(float(fixed[k] or 0) != v for k, v in MEGATRON_LLAMA3_ROPE.items()):
        raise ConversionError(f"config.json rope_scaling={scaling!r}: Megatron-Core implements only Llama 3.1's "
                              f"scaling (rope_type llama3 with {MEGATRON_LLAMA3_ROPE}); this model cannot be "
                              f"represented without changing its outputs")
    return {"rope_type": "llama3", "factor": float(scaling["factor"]), **MEGATRON_LLAMA3_ROPE}


# ----------------------------------------------------------------------------- configs written
def hf_config(d: ModelDims, dtype: torch.dtype) -> dict:
    shared = {
        "hidden_size": d.hidden_size, "intermediate_size": d.ffn_hidden_size,
        "num_hidden_layers": d.num_layers, "num_attention_heads": d.num_attention_heads,
        "num_key_value_heads": d.num_query_groups, "hidden_act": "silu",
        "max_position_embeddings": d.max_position_embeddings, "rms_norm_eps": d.norm_epsilon,
        "rope_theta": d.rope_theta, "rope_scaling": d.rope_scaling, "attention_dropout": 0.0,
        "initializer_range": 0.02, "use_cache": True,
        "vocab_size": d.hf_vocab_size, "tie_word_embeddings": d.tie_word_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."), **d.special_tokens(),
    }
    if d.qkv_bias:  # Qwen2: the only LLaMA-family HF model with bias on q/k/v alone
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **shared, "use_sliding_window": False,
                "sliding_window": d.max_position_embeddings, "max_window_layers": d.num_layers}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **shared, "attention_bias": False,
            "mlp_bias": False, "pretraining_tp": 1}


def megatron_args(d: ModelDims) -> dict:
    """Megatron args of a LLaMA2 run (the driver adds parallelism, vocab, dtype)."""
    return {**d.megatron_architecture_args(),
            "position_embedding_type": "rope", "use_rotary_position_embeddings": True, "rotary_base": d.rope_theta,
            "rotary_percent": 1.0, "normalization": "RMSNorm", "swiglu": True, "add_bias_linear": False,
            "add_qkv_bias": d.qkv_bias, "use_rope_scaling": d.rope_scaling is not None,
            "rope_scaling_factor": (d.rope_scaling or {}).get("factor", 8.0)}
