"""BLOOM: name map, layouts, configs.

    Megatron (under `model.`)                                      HF (under `transformer.`)       layout
    language_model.embedding.word_embeddings.weight                word_embeddings.weight          vocab-parallel
    language_model.embedding.word_embeddings.norm.{weight,bias}    word_embeddings_layernorm       replicated
    layers.i.input_layernorm.{weight,bias}                         h.i.input_layernorm             replicated
    layers.i.self_attention.query_key_value.{weight,bias}          self_attention.query_key_value  column
    layers.i.self_attention.dense.weight / .bias                   self_attention.dense            row / replicated
    layers.i.post_attention_layernorm.{weight,bias}                post_attention_layernorm        replicated
    layers.i.mlp.dense_h_to_4h.{weight,bias}                       mlp.dense_h_to_4h               column
    layers.i.mlp.dense_4h_to_h.weight / .bias                      mlp.dense_4h_to_h               row / replicated
    language_model.encoder.final_layernorm.{weight,bias}           ln_f                            replicated

The fused QKV is per head [heads, 3, head_dim] in both, so a rank's rows are whole heads and a plain column
split is right. The LM head is tied to the embedding (no tensor of its own); with PP > 1 Megatron also keeps
a copy of the embedding on the last stage as `word_embeddings_for_head`, which we write and never read.
"""
from __future__ import annotations

from typing import Any

import torch

from toolkits.megatron_hf.errors import ConversionError
from toolkits.megatron_hf.megatron_format import arg, check_declared
from toolkits.megatron_hf.tensor_parallel import COLUMN, REPLICATED, ROW, VOCAB, ModelDims, Param

FAMILY = "bloom"
HF_LAYER_PREFIX = "transformer.h.{}."
EMBEDDING = "language_model.embedding.word_embeddings.weight"
QKV = "self_attention.query_key_value.weight"

_BLOOM = dict(norm_epsilon=1e-5, vocab_size=250880, max_position_embeddings=2048,
              bos_token_id=1, eos_token_id=2, pad_token_id=3)
PRESETS = {
    "bloom-560m": dict(_BLOOM, hidden_size=1024, num_attention_heads=16),
    "bloom-1b1": dict(_BLOOM, hidden_size=1536, num_attention_heads=16),
    "bloom-1b7": dict(_BLOOM, hidden_size=2048, num_attention_heads=16),
    "bloom-3b": dict(_BLOOM, hidden_size=2560, num_attention_heads=32),
    "bloom-7b1": dict(_BLOOM, hidden_size=4096, num_attention_heads=32),
    "bloom": dict(_BLOOM, hidden_size=14336, num_attention_heads=112),
}
FAMILY_DEFAULTS = _BLOOM


def _pair(megatron: str, hf: str, weight_layout, bias_layout) -> list[Param]:
    return [Param((f"{megatron}.weight",), (f"{hf}.weight",), weight_layout),
            Param((f"{megatron}.bias",), (f"{hf}.bias",), bias_layout)]


LAYER_PARAMS = [
    *_pair("input_layernorm", "input_layernorm", REPLICATED, REPLICATED),
    *_pair("self_attention.query_key_value", "self_attention.query_key_value", COLUMN, COLUMN),
    *_pair("self_attention.dense", "self_attention.dense", ROW, REPLICATED),
    *_pair("post_attention_layernorm", "post_attention_layernorm", REPLICATED, REPLICATED),
    *_pair("mlp.dense_h_to_4h", "mlp.dense_h_to_4h", COLUMN, COLUMN),
    *_pair("mlp.dense_4h_to_h", "mlp.dense_4h_to_h", ROW, REPLICATED),
]
LAYER_ALIASES: dict = {}
OPTIONAL_LAYER_PARAMS: list[Param] = []


def layer_params(d: ModelDims) -> list[Param]:
    return LAYER_PARAMS


def first_stage_params(dims: ModelDims) -> list[Param]:
    return [Param((EMBEDDING,), ("transformer.word_embeddings.weight",), VOCAB),
            *_pair("language_model.embedding.word_embeddings.norm", "transformer.word_embeddings_layernorm",
                   REPLICATED, REPLICATED)]


def last_stage_params(dims: ModelDims, pp: int) -> list[Param]:
    return _pair("language_model.encoder.final_layernorm", "transformer.ln_f", REPLICATED, REPLICATED)


def write_only_last_stage_params(dims: ModelDims, pp: int) -> list[Param]:
    """Written for Megatron, skipped when reading: with PP > 1 the last stage computes the tied head from its
    own copy of the embedding."""
    if pp == 1:
        return []
    return [Param(("word_embeddings_for_head.weight",), ("transformer.word_embeddings.weight",), VOCAB)]


def layer_hf_shapes(d: ModelDims) -> dict[str, tuple[int, ...]]:
    h, f = d.hidden_size, d.ffn_hidden_size
    return {"input_layernorm.weight": (h,), "input_layernorm.bias": (h,),
            "self_attention.query_key_value.weight": (3 * h, h), "self_attention.query_key_value.bias": (3 * h,),
            "self_attention.dense.weight": (h, h), "self_attention.dense.bias": (h,),
            "post_attention_layernorm.weight": (h,), "post_attention_layernorm.bias": (h,),
            "mlp.dense_h_to_4h.weight": (f, h), "mlp.dense_h_to_4h.bias": (f,),
            "mlp.dense_4h_to_h.weight": (h, f), "mlp.dense_4h_to_h.bias": (h,)}


def global_hf_shapes(d: ModelDims) -> dict[str, tuple[int, ...]]:
    h = d.hidden_size
    return {"transformer.word_embeddings.weight": (d.hf_vocab_size, h),
            "transformer.word_embeddings_layernorm.weight": (h,), "transformer.word_embeddings_layernorm.bias": (h,),
            "transformer.ln_f.weight": (h,), "transformer.ln_f.bias": (h,)}


def canonical_hf_name(name: str) -> str | None:
    """BloomModel checkpoints (e.g. bigscience/bloom-560m) lack the `transformer.` prefix; the tied lm_head,
    when saved at all, is the embedding again."""
    if name == "lm_head.weight":
        return None
    return name if name.startswith("transformer.") else f"transformer.{name}"


# ----------------------------------------------------------------------------- Megatron -> dims
def dims_from_megatron(args: Any, global_shapes: dict, layer_shapes: dict, tp: int, num_layers: int,
                       preset: dict) -> ModelDims:
    rows_per_rank, hidden = global_shapes[EMBEDDING]
    check_declared(args, ("hidden_size",), hidden, f"{EMBEDDING} of shape {(rows_per_rank, hidden)}")
    if not preset:  # the BLOOM wrapper has no MODEL_NAME: the published size with this hidden size
        preset = next((p for p in PRESETS.values() if p["hidden_size"] == hidden), {})
    heads = arg(args, "num_attention_heads", default=preset.get("num_attention_heads"))
    if heads is None:
        raise ConversionError(f"the checkpoint args do not give num_attention_heads and no published BLOOM has "
                              f"hidden size {hidden}; pass --model-name or fix the args")
    if hidden % heads or heads % tp:
        raise ConversionError(f"{heads} heads do not fit hidden size {hidden} split over TP={tp} ranks")
    if QKV not in layer_shapes:
        raise ConversionError(f"no {QKV} in the first layer; names found: {', '.join(sorted(layer_shapes))}")
    if layer_shapes[QKV][0] * tp != 3 * hidden:
        raise ConversionError(f"layers.*.{QKV} has {layer_shapes[QKV][0]} rows per rank; with TP={tp} BLOOM needs "
                              f"3 x hidden / TP = {3 * hidden // tp}")
    ffn = layer_shapes["mlp.dense_h_to_4h.weight"][0] * tp
    check_declared(args, ("ffn_hidden_size",), ffn, "layers.*.mlp.dense_h_to_4h.weight")
    if ffn != 4 * hidden:
        raise ConversionError(f"layers.*.mlp.dense_h_to_4h.weight gives an FFN size of {ffn}; HF BLOOM is fixed "
                              f"at 4 x hidden = {4 * hidden}")
    return ModelDims(
        hidden_size=hidden, num_layers=num_layers, num_attention_heads=heads, num_query_groups=heads,
        head_dim=hidden // heads, ffn_hidden_size=ffn, hf_vocab_size=rows_per_rank * tp,
        megatron_vocab_size=rows_per_rank * tp,
        norm_epsilon=arg(args, "layernorm_epsilon", "norm_epsilon", default=FAMILY_DEFAULTS["norm_epsilon"]),
        max_position_embeddings=arg(args, "max_position_embeddings", "seq_length",
                                    default=FAMILY_DEFAULTS["max_position_embeddings"]),
        tie_word_embeddings=True,
        bos_token_id=arg(args, "bos_token_id", default=FAMILY_DEFAULTS["bos_token_id"]),
        eos_token_id=arg(args, "eos_token_id", default=FAMILY_DEFAULTS["eos_token_id"]),
        pad_token_id=arg(args, "pad_token_id", default=FAMILY_DEFAULTS["pad_token_id"]))


# ----------------------------------------------------------------------------- HF -> dims
def dims_from_hf(config: dict, hf_shapes: dict) -> ModelDims:
    if config.get("model_type") != "bloom":
        raise ConversionError(f"config.json has model_type {config.get('model_type')!r}, not 'bloom'; "
                              f"use the converter for that family")
    if config.get("apply_residual_connection_post_layernorm", False):
        raise ConversionError("config.json apply_residual_connection_post_layernorm=true is not what Megatron's "
                              "BLOOM computes; this model cannot be converted without changing its outputs")
    hidden = config.get("hidden_size") or config["n_embed"]
    heads = config.get("n_head") or config["num_attention_heads"]
    vocab_rows = hf_shapes["transformer.word_embeddings.weight"][0]
    if vocab_rows != config["vocab_size"]:
        raise ConversionError(f"transformer.word_embeddings.weight has {vocab_rows} rows but config.json "
                              f"vocab_size is {config['vocab_size']}; fix config.json")
    return ModelDims(
        hidden_size=hidden, num_layers=config.get("n_layer") or config["num_hidden_layers"],
        num_attention_heads=heads, num_query_groups=heads, head_dim=hidden // heads, ffn_hidden_size=4 * hidden,
        hf_vocab_size=vocab_rows, megatron_vocab_size=vocab_rows,
        norm_epsilon=config.get("layer_norm_epsilon", 1e-5), tie_word_embeddings=True,
        max_position_embeddings=FAMILY_DEFAULTS["max_position_embeddings"],  # alibi: no limit in HF's config
        bos_token_id=config.get("bos_token_id"), eos_token_id=config.get("eos_token_id"),
        pad_token_id=config.get("pad_token_id"))


# ----------------------------------------------------------------------------- configs written
def hf_config(d: ModelDims, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["BloomForCausalLM"], "model_type": "bloom",
        "vocab_size": d.hf_vocab_size, "hidden_size": d.hidden_size, "n_layer": d.num_layers,
        "n_head": d.num_attention_heads, "layer_norm_epsilon": d.norm_epsilon,
        "apply_residual_connection_post_layernorm": False, "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "initializer_range": 0.02, "pretraining_tp": 1, "slow_but_exact": False, "use_cache": True,
        "tie_word_embeddings": True, "torch_dtype": str(dtype).removeprefix("torch."), **d.special_tokens(),
    }


def megatron_args(d: ModelDims) -> dict:
    """Megatron args of a BLOOM run (the driver adds parallelism, vocab, dtype)."""
    return {**d.megatron_architecture_args(),
            "position_embedding_type": "alibi", "embed_layernorm": True, "normalization": "LayerNorm",
            "swiglu": False, "add_bias_linear": True, "add_qkv_bias": True, "bias_gelu_fusion": True,
            "openai_gelu": False, "apply_residual_connection_post_layernorm": False}
