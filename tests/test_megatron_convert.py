"""Megatron <-> HF converters (toolkits/megatron_hf) on tiny random models: LLaMA GQA, LLaMA MHA, BLOOM.

Two independent checks per direction:
- HF -> Megatron at TP in {1, 2, 4}, PP in {1, 2}: the written rank files, run through the reference forward
  (tests/megatron_fixtures.py, Megatron's equations), give the HF model's logits; converting back gives
  bit-identical tensors and identical logits.
- Megatron -> HF from checkpoints the tests write themselves (random per-rank tensors, args pickled from a fake
  `megatron` package): the HF model's logits equal the reference forward of those rank tensors.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from rlhf_overlay import PROJECT_ROOT
from megatron_fixtures import (EMBEDDING, TINY_MODELS, Spelling, build_hf_model, hf_logits, padded_vocab,
                                     random_megatron_ranks, read_megatron_checkpoint, reference_logits,
                                     virtual_pipeline_ranks, write_megatron_checkpoint)
from toolkits.megatron_hf.convert import main as convert_main
from toolkits.megatron_hf.errors import ConversionError

LLAMA_WRAPPER = PROJECT_ROOT / "toolkits/model_checkpoints_convertor/llama2/model_convertor.sh"
BLOOM_WRAPPER = PROJECT_ROOT / "toolkits/model_checkpoints_convertor/bloom/model_convertor_huggingface_megatron.sh"
GRID = [(tp, pp) for tp in (1, 2, 4) for pp in (1, 2)]
# Float64 on both sides; what remains is HF computing rotary cos/sin and alibi slopes in float32 (~1e-6).
# A wrong layout (a swapped head, gate/up, norm or bias) moves logits by far more than this.
REFERENCE_TOLERANCE = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tokens_for(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(7))


def convert(*argv: str | Path) -> int:
    """The CLI; hf2mg writes the legacy format here unless a test asks for another (Megatron-Core: test_megatron_core*)."""
    legacy = ["--format", "legacy"] if argv[0] == "hf2mg" and "--format" not in argv else []
    return convert_main([str(a) for a in argv] + legacy + ["--no-progress"])


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    """Each tiny model saved once as an HF folder (safetensors)."""
    folders = {}
    for key, tiny in TINY_MODELS.items():
        folder = tmp_path_factory.mktemp(f"hf-{key}")
        build_hf_model(tiny).save_pretrained(folder)
        folders[key] = folder
    return folders


def family(key: str) -> str:
    return TINY_MODELS[key].family


# ----------------------------------------------------------------------------- both directions
@pytest.mark.parametrize("tp,pp", GRID)
@pytest.mark.parametrize("key", list(TINY_MODELS))
def test_hf_to_megatron_and_back_is_exact(hf_models, tmp_path, key, tp, pp):
    tiny, source = TINY_MODELS[key], hf_models[key]
    tokens = tokens_for(tiny.vocab)
    assert convert("hf2mg", "--model", family(key), "--source", source, "--target", tmp_path / "mg",
                   "--tp", tp, "--pp", pp) == 0

    ranks, args, found_tp, found_pp = read_megatron_checkpoint(tmp_path / "mg")
    assert (found_tp, found_pp) == (tp, pp)
    assert args.padded_vocab_size == padded_vocab(tiny.vocab, tp)
    expected = hf_logits(source, tokens, torch.float64)
    torch.testing.assert_close(reference_logits(ranks, tiny, tp, pp, tokens, tiny.vocab), expected,
                               **REFERENCE_TOLERANCE)

    assert convert("mg2hf", "--model", family(key), "--source", tmp_path / "mg", "--target", tmp_path / "hf") == 0
    assert_same_tensors(hf_tensors(source), hf_tensors(tmp_path / "hf"))
    assert torch.equal(hf_logits(source, tokens), hf_logits(tmp_path / "hf", tokens))
    from transformers import AutoConfig
    original, written = AutoConfig.from_pretrained(source), AutoConfig.from_pretrained(tmp_path / "hf")
    for field in ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                  "bos_token_id", "eos_token_id", "torch_dtype", "tie_word_embeddings", "rms_norm_eps",
                  "rope_theta", "max_position_embeddings", "num_key_value_heads", "intermediate_size",
                  "layer_norm_epsilon"):
        assert getattr(written, field, None) == getattr(original, field, None), field


@pytest.mark.parametrize("tp,pp", GRID)
@pytest.mark.parametrize("key", list(TINY_MODELS))
def test_megatron_to_hf_matches_reference_forward(tmp_path, key, tp, pp):
    tiny = TINY_MODELS[key]
    ranks = random_megatron_ranks(tiny, tp, pp, seed=tp * 10 + pp)
    write_megatron_checkpoint(tmp_path / "mg", tiny, ranks, tp, pp)
    assert convert("mg2hf", "--model", family(key), "--source", tmp_path / "mg", "--target", tmp_path / "hf",
                   "--vocab-size", tiny.vocab) == 0
    tokens = tokens_for(tiny.vocab)
    torch.testing.assert_close(hf_logits(tmp_path / "hf", tokens, torch.float64),
                               reference_logits(ranks, tiny, tp, pp, tokens, tiny.vocab), **REFERENCE_TOLERANCE)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    if family(key) == "llama2":  # taken from the checkpoint args, not from defaults
        assert (config["rope_theta"], config["rms_norm_eps"], config["max_position_embeddings"]) == \
               (tiny.rope_theta, tiny.eps, tiny.max_positions)
        assert config["num_key_value_heads"] == tiny.groups
    assert "megatron" not in sys.modules


# ----------------------------------------------------------------------------- spellings and layouts
SPELLINGS = {
    "transformer-key": Spelling(encoder_key="transformer"),
    "norm-names": Spelling(norm_names="norm"),
    "split-query-key-value": Spelling(split_qkv=True),
    "split-h-to-4h": Spelling(split_h_to_4h=True),
    "model-rng-file": Spelling(file_name="model_rng.pt"),
    "iteration-folder": Spelling(iteration="100"),
    "rotary-inv-freq-and-pai-lm-head": Spelling(rotary_inv_freq=True, pai_lm_head=True),
}


@pytest.fixture(scope="module")
def canonical_llama(tmp_path_factory):
    """llama_gqa at TP=2, PP=2 in the canonical spelling, converted once."""
    tiny, root = TINY_MODELS["llama_gqa"], tmp_path_factory.mktemp("canonical")
    ranks = random_megatron_ranks(tiny, 2, 2, seed=3)
    write_megatron_checkpoint(root / "mg", tiny, ranks, 2, 2)
    assert convert("mg2hf", "--model", "llama2", "--source", root / "mg", "--target", root / "hf",
                   "--vocab-size", tiny.vocab) == 0
    return ranks, hf_tensors(root / "hf")


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_other_spellings_convert_identically(canonical_llama, tmp_path, name):
    ranks, expected = canonical_llama
    write_megatron_checkpoint(tmp_path / "mg", TINY_MODELS["llama_gqa"], ranks, 2, 2, SPELLINGS[name])
    assert convert("mg2hf", "--model", "llama2", "--source", tmp_path / "mg", "--target", tmp_path / "hf",
                   "--vocab-size", 100) == 0
    assert_same_tensors(expected, hf_tensors(tmp_path / "hf"))


def test_virtual_pipeline_chunks_are_interleaved(tmp_path):
    tiny = TINY_MODELS["llama_gqa"]
    ranks = virtual_pipeline_ranks(tiny, tp=2, pp=2, vp=2, seed=5)
    write_megatron_checkpoint(tmp_path / "mg", tiny, ranks, 2, 2, Spelling(virtual_chunks=2))
    assert convert("mg2hf", "--model", "llama2", "--source", tmp_path / "mg", "--target", tmp_path / "hf",
                   "--vocab-size", tiny.vocab) == 0
    tokens = tokens_for(tiny.vocab)
    torch.testing.assert_close(hf_logits(tmp_path / "hf", tokens, torch.float64),
                               reference_logits(ranks, tiny, 2, 2, tokens, tiny.vocab), **REFERENCE_TOLERANCE)


@pytest.mark.parametrize("subfolder", ["", "release", "release/mp_rank_00_000"])
def test_source_may_be_root_or_iteration_folder(canonical_llama, tmp_path, subfolder):
    ranks, expected = canonical_llama
    write_megatron_checkpoint(tmp_path / "mg", TINY_MODELS["llama_gqa"], ranks, 2, 2)
    source = tmp_path / "mg" / subfolder
    if subfolder.endswith("mp_rank_00_000"):  # one rank is not a checkpoint: the message says what to pass
        with pytest.raises(ConversionError, match="mp_rank_00_000 is a single rank folder; pass the checkpoint root"):
            mg2hf_error(source, tmp_path / "hf")
        return
    assert convert("mg2hf", "--model", "llama2", "--source", source, "--target", tmp_path / "hf",
                   "--vocab-size", 100) == 0
    assert_same_tensors(expected, hf_tensors(tmp_path / "hf"))


def test_bloom_without_transformer_prefix_reads_the_same(hf_models, tmp_path):
    """BloomModel checkpoints (as bigscience publishes some) name tensors without `transformer.`."""
    from safetensors.torch import save_file
    source = tmp_path / "bloom-model"
    source.mkdir()
    shutil.copy(hf_models["bloom"] / "config.json", source)
    save_file({k.removeprefix("transformer."): v for k, v in hf_tensors(hf_models["bloom"]).items()},
              source / "model.safetensors", metadata={"format": "pt"})
    for folder, target in [(hf_models["bloom"], "mg-reference"), (source, "mg")]:
        assert convert("hf2mg", "--model", "bloom", "--source", folder, "--target", tmp_path / target, "--tp", 2) == 0
    reference, converted = (read_megatron_checkpoint(tmp_path / t)[0] for t in ("mg-reference", "mg"))
    for rank in reference:
        assert_same_tensors(reference[rank]["globals"], converted[rank]["globals"])
        for i in reference[rank]["layers"]:
            assert_same_tensors(reference[rank]["layers"][i], converted[rank]["layers"][i])


def test_uneven_pipeline_split_round_trip(hf_models, tmp_path):
    assert convert("hf2mg", "--model", "llama2", "--source", hf_models["llama_gqa"], "--target", tmp_path / "mg",
                   "--tp", 2, "--pp", 2, "--decoder-first-pipeline-num-layers", 1) == 0
    ranks, args, _, _ = read_megatron_checkpoint(tmp_path / "mg")
    assert sorted(ranks[(0, 0)]["layers"]) == [0] and sorted(ranks[(0, 1)]["layers"]) == [1, 2, 3]
    assert args.decoder_first_pipeline_num_layers == 1
    assert convert("mg2hf", "--model", "llama2", "--source", tmp_path / "mg", "--target", tmp_path / "hf") == 0
    assert_same_tensors(hf_tensors(hf_models["llama_gqa"]), hf_tensors(tmp_path / "hf"))


def test_written_checkpoint_has_what_megatron_loads(hf_models, tmp_path):
    """The nesting Megatron-LM's load_state_dict walks, its checkpoint_version, and args it checks; loadable with
    plain weights_only torch.load (argparse.Namespace is the only class pickled)."""
    assert convert("hf2mg", "--model", "bloom", "--source", hf_models["bloom"], "--target", tmp_path / "mg",
                   "--tp", 2, "--pp", 2, "--norm-names", "norm", "--dtype", "bf16") == 0
    assert (tmp_path / "mg" / "latest_checkpointed_iteration.txt").read_text() == "release"
    import argparse
    with torch.serialization.safe_globals([argparse.Namespace]):
        first = torch.load(tmp_path / "mg/release/mp_rank_01_000/model_optim_rng.pt", weights_only=True)
        last = torch.load(tmp_path / "mg/release/mp_rank_01_001/model_optim_rng.pt", weights_only=True)
    assert first["checkpoint_version"] == 3.0 and first["iteration"] == 0
    word_embeddings = first["model"]["language_model"]["embedding"]["word_embeddings"]
    assert set(word_embeddings) == {"weight", "norm.weight", "norm.bias"}
    assert word_embeddings["weight"].dtype == torch.bfloat16
    assert "layers.1.input_norm.weight" in first["model"]["language_model"]["encoder"]
    assert "final_norm.weight" in last["model"]["language_model"]["encoder"]
    assert torch.equal(last["model"]["word_embeddings_for_head"]["weight"], word_embeddings["weight"])
    for path in (tmp_path / "mg/release").glob("*/model_optim_rng.pt"):  # a valid zip, CRCs included
        assert zipfile.ZipFile(path).testzip() is None
    args = first["args"]
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (4, 48, 12)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.padded_vocab_size) == (2, 2, 256)
    assert args.params_dtype == torch.bfloat16 and args.bf16 and args.position_embedding_type == "alibi"


def test_streamed_rank_file_reads_like_torch_save(tmp_path):
    """RankFileWriter writes tensor records one at a time; torch.load (with and without mmap) must read back
    what torch.save of the same state reads back, and the zip must be valid."""
    import argparse
    from toolkits.megatron_hf.megatron_format import RankFileWriter
    gen = torch.Generator().manual_seed(0)
    tensors = {"language_model.embedding.word_embeddings.weight": torch.randn(8, 4, generator=gen),
               "language_model.encoder.layers.0.input_layernorm.weight": torch.randn(4, generator=gen),
               "language_model.encoder.layers.0.mlp.dense_4h_to_h.weight": torch.randn(4, 6, generator=gen)[:, :3],
               "language_model.encoder.final_layernorm.weight": torch.randn(4, generator=gen).bfloat16(),
               "language_model.output_layer.weight": torch.randn(8, 4, generator=gen)}
    args = argparse.Namespace(hidden_size=4, params_dtype=torch.float32)
    specs = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    writer = RankFileWriter(tmp_path / "mp_rank_00" / "model_optim_rng.pt", specs, args, "layernorm")
    with pytest.raises(AssertionError, match="expected language_model.embedding.word_embeddings.weight next"):
        writer.write("language_model.output_layer.weight", tensors["language_model.output_layer.weight"])
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    path = tmp_path / "mp_rank_00" / "model_optim_rng.pt"
    assert zipfile.ZipFile(path).testzip() is None
    with torch.serialization.safe_globals([argparse.Namespace]):
        for mmap in (False, True):
            state = torch.load(path, weights_only=True, mmap=mmap)
            assert state["checkpoint_version"] == 3.0 and state["args"].hidden_size == 4
            encoder = state["model"]["language_model"]["encoder"]
            assert torch.equal(encoder["layers.0.mlp.dense_4h_to_h.weight"],
                               tensors["language_model.encoder.layers.0.mlp.dense_4h_to_h.weight"])
            assert encoder["final_layernorm.weight"].dtype == torch.bfloat16
            assert torch.equal(state["model"]["language_model"]["output_layer"]["weight"],
                               tensors["language_model.output_layer.weight"])


# ----------------------------------------------------------------------------- vocabulary and tokenizer
def save_tiny_tokenizer(folder: Path, size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)


def test_tokenizer_in_checkpoint_root_trims_vocab_and_is_copied(tmp_path):
    tiny = TINY_MODELS["llama_gqa"]
    ranks = random_megatron_ranks(tiny, 2, 1)
    write_megatron_checkpoint(tmp_path / "mg", tiny, ranks, 2, 1)
    save_tiny_tokenizer(tmp_path / "mg", size=97)
    assert convert("mg2hf", "--model", "llama2", "--source", tmp_path / "mg", "--target", tmp_path / "hf") == 0
    tensors = hf_tensors(tmp_path / "hf")
    full = torch.cat([ranks[(t, 0)]["globals"][EMBEDDING] for t in range(2)])
    assert torch.equal(tensors["model.embed_tokens.weight"], full[:97])
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["vocab_size"], config["bos_token_id"], config["eos_token_id"]) == (97, 1, 2)


def test_extra_vocab_rows_are_added_then_kept(hf_models, tmp_path):
    source = hf_models["llama_mha"]
    assert convert("hf2mg", "--model", "llama2", "--source", source, "--target", tmp_path / "mg", "--tp", 2,
                   "--extra-vocab-size", 3) == 0
    ranks, args, _, _ = read_megatron_checkpoint(tmp_path / "mg")
    embedding = torch.cat([ranks[(t, 0)]["globals"][EMBEDDING] for t in range(2)])
    original = hf_tensors(source)["model.embed_tokens.weight"]
    assert (args.vocab_size, args.extra_vocab_size, embedding.shape[0]) == (90, 3, 256)
    assert torch.equal(embedding[:90], original)
    assert torch.allclose(embedding[90:93], original.mean(dim=0).expand(3, -1))  # new tokens start as the mean
    assert not embedding[93:].any()  # padding
    assert convert("mg2hf", "--model", "llama2", "--source", tmp_path / "mg", "--target", tmp_path / "hf") == 0
    back = hf_tensors(tmp_path / "hf")["model.embed_tokens.weight"]
    assert back.shape[0] == 93 and torch.equal(back, embedding[:93])


def test_model_name_fills_only_what_the_args_lack(canonical_llama, tmp_path, monkeypatch):
    from toolkits.megatron_hf import llama2
    tiny = TINY_MODELS["llama_gqa"]
    monkeypatch.setitem(llama2.PRESETS, "llama2-tiny", dict(
        hidden_size=64, num_attention_heads=8, num_query_groups=4, norm_epsilon=1e-6, rope_theta=tiny.rope_theta,
        max_position_embeddings=77, vocab_size=100, bos_token_id=1, eos_token_id=2))
    ranks, expected = canonical_llama
    write_megatron_checkpoint(tmp_path / "mg", tiny, ranks, 2, 2, num_attention_heads=None, rotary_base=None,
                              max_position_embeddings=None, seq_length=None)
    with pytest.raises(ConversionError, match="args do not give num_attention_heads; pass MODEL_NAME"):
        mg2hf_error(tmp_path / "mg", tmp_path / "hf")
    assert convert("mg2hf", "--model", "llama2", "--source", tmp_path / "mg", "--target", tmp_path / "hf",
                   "--model-name", "llama2-tiny") == 0
    assert_same_tensors(expected, hf_tensors(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    # heads, rope theta, max positions and vocab come from the preset; eps stays the checkpoint's
    assert (config["num_attention_heads"], config["rope_theta"], config["max_position_embeddings"],
            config["vocab_size"], config["rms_norm_eps"]) == (8, tiny.rope_theta, 77, 100, tiny.eps)


def test_dtype_cast_and_small_shards_load_in_transformers(hf_models, tmp_path):
    source = hf_models["llama_gqa"]
    assert convert("hf2mg", "--model", "llama2", "--source", source, "--target", tmp_path / "mg", "--tp", 2) == 0
    assert convert("mg2hf", "--model", "llama2", "--source", tmp_path / "mg", "--target", tmp_path / "hf",
                   "--dtype", "bf16", "--max-shard-size", "100KB") == 0
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / "hf" / s).is_file() for s in shards)
    original, written = hf_tensors(source), hf_tensors(tmp_path / "hf")
    assert all(torch.equal(written[k], original[k].to(torch.bfloat16)) for k in original)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype="auto")
    assert model.dtype == torch.bfloat16 and model(tokens_for(100)).logits.isfinite().all()


# ----------------------------------------------------------------------------- safe loading
def test_args_with_megatron_classes_load_without_megatron(canonical_llama, tmp_path):
    from toolkits.megatron_hf.megatron_format import PickledStandIn, safe_torch_load
    ranks, _ = canonical_llama
    write_megatron_checkpoint(tmp_path / "mg", TINY_MODELS["llama_gqa"], ranks, 2, 2)
    assert "megatron" not in sys.modules  # megatron-core is installed (tests use it); loading must not import it
    state = safe_torch_load(tmp_path / "mg/release/mp_rank_00_000/model_optim_rng.pt")
    assert isinstance(state["args"].model_type, PickledStandIn)
    assert state["args"].model_type.pickled_args == (1,)
    assert "megatron.core.enums.ModelType" in repr(state["args"].model_type)
    assert state["args"].hidden_size == 64 and "megatron" not in sys.modules


class RunsShellCommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_malicious_pickle_is_refused(canonical_llama, tmp_path, capsys):
    ranks, _ = canonical_llama
    write_megatron_checkpoint(tmp_path / "mg", TINY_MODELS["llama_gqa"], ranks, 2, 2)
    marker = tmp_path / "pwned"
    path = tmp_path / "mg/release/mp_rank_00_000/model_optim_rng.pt"
    torch.save({"model": {}, "args": RunsShellCommand(f"touch {marker}")}, path)
    assert convert("mg2hf", "--model", "llama2", "--source", tmp_path / "mg", "--target", tmp_path / "hf") == 2
    assert re.search(r"refusing to load: its pickle references (posix|os)\.system", capsys.readouterr().err)
    assert not marker.exists() and not (tmp_path / "hf").exists()


# ----------------------------------------------------------------------------- refusals
def mg2hf_error(source: Path, target: Path, **options) -> None:
    from toolkits.megatron_hf import llama2
    from toolkits.megatron_hf.megatron_to_hf import MegatronToHFOptions, megatron_to_hf
    megatron_to_hf(llama2, MegatronToHFOptions(source=source, target=target, vocab_size=100, progress=False,
                                               **options))


def test_missing_rank_folder_is_named(canonical_llama, tmp_path):
    ranks, _ = canonical_llama
    write_megatron_checkpoint(tmp_path / "mg", TINY_MODELS["llama_gqa"], ranks, 2, 2)
    shutil.rmtree(tmp_path / "mg/release/mp_rank_01_001")
    with pytest.raises(ConversionError, match=r"missing rank folder\(s\) mp_rank_01_001 for TP=2, PP=2"):
        mg2hf_error(tmp_path / "mg", tmp_path / "hf")


def test_shapes_that_do_not_fit_are_listed_with_tensor_names(canonical_llama, tmp_path):
    ranks, _ = canonical_llama
    broken = {k: {"globals": v["globals"], "layers": {i: dict(t) for i, t in v["layers"].items()}}
              for k, v in ranks.items()}
    broken[(1, 1)]["layers"][3]["mlp.dense_4h_to_h.weight"] = torch.zeros(64, 40)
    write_megatron_checkpoint(tmp_path / "mg", TINY_MODELS["llama_gqa"], broken, 2, 2)
    with pytest.raises(ConversionError, match=r"mp_rank_01_001/model_optim_rng.pt: language_model.encoder.layers.1"
                                              r".mlp.dense_4h_to_h.weight has shape \(64, 40\), expected \(64, 48\)"):
        mg2hf_error(tmp_path / "mg", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_args_that_contradict_the_weights_are_refused(canonical_llama, tmp_path):
    ranks, _ = canonical_llama
    write_megatron_checkpoint(tmp_path / "mg", TINY_MODELS["llama_gqa"], ranks, 2, 2, num_query_groups=2)
    with pytest.raises(ConversionError, match="args declare num_query_groups=2 but .*query_key_value.* implies 4"):
        mg2hf_error(tmp_path / "mg", tmp_path / "hf")


def test_unexpected_tensor_is_not_dropped_silently(canonical_llama, tmp_path):
    ranks, _ = canonical_llama
    extra = {k: {"globals": v["globals"], "layers": {i: dict(t) for i, t in v["layers"].items()}}
             for k, v in ranks.items()}
    for (t, p), rank in extra.items():
        for local in rank["layers"].values():
            local["self_attention.dense.bias"] = torch.zeros(32)
    write_megatron_checkpoint(tmp_path / "mg", TINY_MODELS["llama_gqa"], extra, 2, 2)
    with pytest.raises(ConversionError, match="unexpected tensor .*self_attention.dense.bias"):
        mg2hf_error(tmp_path / "mg", tmp_path / "hf")


def test_uneven_split_in_args_must_match_the_files(canonical_llama, tmp_path):
    ranks, _ = canonical_llama
    write_megatron_checkpoint(tmp_path / "mg", TINY_MODELS["llama_gqa"], ranks, 2, 2,
                              decoder_first_pipeline_num_layers=1)
    with pytest.raises(ConversionError, match="mp_rank_00_000.* holds 2 layers but the args .* imply 1"):
        mg2hf_error(tmp_path / "mg", tmp_path / "hf")


def test_incomplete_megatron_core_rank_is_explained(tmp_path):
    folder = tmp_path / "mg/release/mp_rank_00"
    folder.mkdir(parents=True)
    torch.save({"model": {"decoder.layers.0.self_attention.linear_qkv.weight": torch.zeros(3, 3)}},
               folder / "model_optim_rng.pt")
    with pytest.raises(ConversionError, match="no language_model.embedding.word_embeddings.weight; the first pipeline "
                                              "stage must hold the embedding"):
        mg2hf_error(tmp_path / "mg", tmp_path / "hf")


def test_tensor_parallel_size_must_divide_heads_and_vocab(hf_models, tmp_path):
    from toolkits.megatron_hf import llama2
    from toolkits.megatron_hf.hf_to_megatron import HFToMegatronOptions, hf_to_megatron
    with pytest.raises(ConversionError, match="TP=3 does not divide the 8 attention heads"):
        hf_to_megatron(llama2, HFToMegatronOptions(source=hf_models["llama_gqa"], target=tmp_path / "mg", tp=3,
                                                   progress=False))
    with pytest.raises(ConversionError, match=r"--padded-vocab-size 130 must be >= the 100 vocabulary rows .* "
                                              r"divisible by TP=4"):
        hf_to_megatron(llama2, HFToMegatronOptions(source=hf_models["llama_gqa"], target=tmp_path / "mg", tp=4,
                                                   padded_vocab_size=130, progress=False))
    with pytest.raises(ConversionError, match="4 layers cannot be split over PP=3"):
        hf_to_megatron(llama2, HFToMegatronOptions(source=hf_models["llama_gqa"], target=tmp_path / "mg", pp=3,
                                                   progress=False))


def test_wrong_family_is_refused(hf_models, tmp_path, capsys):
    assert convert("hf2mg", "--model", "llama2", "--source", hf_models["bloom"], "--target", tmp_path / "mg") == 2
    assert "config.json has model_type 'bloom', not 'llama'" in capsys.readouterr().err


def test_non_empty_target_needs_overwrite_and_failures_leave_it_alone(hf_models, tmp_path, monkeypatch):
    target = tmp_path / "mg"
    target.mkdir()
    (target / "keep.txt").write_text("earlier work")
    from toolkits.megatron_hf import llama2
    from toolkits.megatron_hf.hf_to_megatron import HFToMegatronOptions, hf_to_megatron
    options = HFToMegatronOptions(source=hf_models["llama_gqa"], target=target, tp=2, progress=False)
    with pytest.raises(ConversionError, match=r"TARGET .*mg is not empty; .* --overwrite"):
        hf_to_megatron(llama2, options)

    options.overwrite = True
    from toolkits.megatron_hf.megatron_format import RankFileWriter
    closed, close = [], RankFileWriter.close

    def fail_in_second_stage(writer):
        close(writer)
        closed.append(writer.path)
        if len(closed) == 3:
            raise OSError("disk full (simulated)")
    monkeypatch.setattr(RankFileWriter, "close", fail_in_second_stage)
    options.pp = 2
    with pytest.raises(OSError, match="simulated"):
        hf_to_megatron(llama2, options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mg"]  # no partial folder left behind
    assert (target / "keep.txt").read_text() == "earlier work"

    monkeypatch.undo()
    hf_to_megatron(llama2, options)
    assert not (target / "keep.txt").exists() and (target / "release").is_dir()


def test_target_inside_source_is_refused(hf_models, tmp_path, capsys):
    source = tmp_path / "hf"
    shutil.copytree(hf_models["bloom"], source)
    assert convert("hf2mg", "--model", "bloom", "--source", source, "--target", source / "mg") == 2
    assert re.search(r"TARGET .*/hf/mg overlaps SOURCE .*/hf; write to a separate folder", capsys.readouterr().err)


# ----------------------------------------------------------------------------- entry points
def run(cmd: list, env_extra: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=300, **kwargs)


def test_cli_help_shows_examples_without_importing_torch():
    for argv in (["--help"], ["mg2hf", "--help"], ["hf2mg", "--help"]):
        result = run([sys.executable, "-m", "toolkits.megatron_hf.convert", *argv], cwd=PROJECT_ROOT)
        assert result.returncode == 0 and "usage: python -m toolkits.megatron_hf.convert" in result.stdout
    top = run([sys.executable, "-m", "toolkits.megatron_hf.convert", "--help"], cwd=PROJECT_ROOT)
    assert "python -m toolkits.megatron_hf.convert hf2mg --model llama2" in top.stdout
    probe = run([sys.executable, "-c", "import sys, toolkits.megatron_hf.convert as c; c.build_parser(); "
                 "print('torch' in sys.modules)"], cwd=PROJECT_ROOT)
    assert probe.stdout.strip() == "False"


@pytest.mark.parametrize("argv, words", [(["mg2hf", "--model", "llama2", "--source", "s", "--target", "t", "--nope"],
                                          ["unrecognized arguments: --nope"]),
                                         (["hf2mg", "--model", "bloom", "--source", "s", "--target", "t", "--tp", "x"],
                                          ["--tp: invalid int value: 'x'", "hf2mg --help"]),
                                         (["mg2hf"], ["required: --model, --source, --target"]),
                                         ([], ["required: {mg2hf,hf2mg}"])])
def test_a_bad_command_line_is_one_error_line_exit_2(argv, words, tmp_path):
    """As for every entry module of the project (rlhf_overlay.errors): one `error:` line, exit 2, no usage block,
    nothing created; the converter and the seed's wrappers alike."""
    res = run([sys.executable, "-m", "toolkits.megatron_hf.convert", *argv], cwd=tmp_path,
              env_extra={"PYTHONPATH": str(PROJECT_ROOT)})
    assert res.returncode == 2 and res.stderr.startswith("error: ") and len(res.stderr.splitlines()) == 1, res.stderr
    assert all(w in res.stderr for w in words) and res.stdout == "" and not any(tmp_path.iterdir()), res.stderr


@pytest.mark.parametrize("wrapper, n", [("LLAMA_WRAPPER", 8), ("BLOOM_WRAPPER", 6)])
def test_wrappers_with_too_few_arguments_say_so_in_one_error_line(wrapper, n):
    res = run(["bash", globals()[wrapper], "only-one-argument"])
    assert res.returncode == 2 and res.stderr.startswith("error: ") and len(res.stderr.splitlines()) == 1, res.stderr
    assert f"needs at least {n} arguments" in res.stderr and "got 1" in res.stderr


# every shell script of the project: setup.sh, the make targets' scripts, the converter wrappers, CI's entry
SHELL_SCRIPTS = sorted([*PROJECT_ROOT.glob("*.sh"), *(PROJECT_ROOT / "training_scripts").glob("*.sh"),
                        *(PROJECT_ROOT / "toolkits").rglob("*.sh"), PROJECT_ROOT / ".ci" / "run"])


def test_shell_scripts_parse():
    assert {LLAMA_WRAPPER, BLOOM_WRAPPER, PROJECT_ROOT / "setup.sh"} <= set(SHELL_SCRIPTS)
    for script in SHELL_SCRIPTS:
        res = run(["bash", "-n", script])
        assert res.returncode == 0, (script, res.stderr)


@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck is not installed (apt-get install shellcheck; "
                    ".ci/run installs it)")
def test_shell_scripts_pass_shellcheck():
    """Every warning and note counts (shellcheck exits non-zero on any); `source`d files are followed
    (.shellcheckrc), so a variable a script gets from lib.sh / common.sh is checked too. Run from another folder:
    nothing depends on the current one."""
    res = run(["shellcheck", "--format", "gcc", *SHELL_SCRIPTS], cwd="/")
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.slow
def test_llama_wrapper_both_directions_from_another_folder(hf_models, tmp_path):
    source = hf_models["llama_gqa"]
    to_mg = run(["bash", LLAMA_WRAPPER, "/path/to/Megatron-LM", source, tmp_path / "mg", 2, 2, "llama2-7b", 0, "false"],
                cwd=tmp_path)
    assert to_mg.returncode == 0, to_mg.stderr
    assert to_mg.stderr.count("MEGATRON_PATH") == 1 and "ignored" in to_mg.stderr
    to_hf = run(["bash", LLAMA_WRAPPER, "/path/to/Megatron-LM", "mg", "hf", 1, 1, "llama2-7b", 0, "true"],
                cwd=tmp_path)
    assert to_hf.returncode == 0, to_hf.stderr
    assert_same_tensors(hf_tensors(source), hf_tensors(tmp_path / "hf"))
    bad = run(["bash", LLAMA_WRAPPER, "x", source, tmp_path / "o", 1, 1, "llama2-7b", 0, "maybe"])
    assert bad.returncode == 2 and "MG2HF must be true or false" in bad.stderr


@pytest.mark.slow
def test_bloom_wrapper_and_make_target(hf_models, tmp_path):
    source = hf_models["bloom"]
    to_mg = run(["bash", BLOOM_WRAPPER, "", source, tmp_path / "mg", 4, 1, "false"])
    assert to_mg.returncode == 0, to_mg.stderr
    to_hf = run(["make", "-s", "-C", PROJECT_ROOT, "convert-bloom-mg2hf", f"SOURCE={tmp_path / 'mg'}",
                 f"TARGET={tmp_path / 'hf'}"])
    assert to_hf.returncode == 0, to_hf.stderr
    assert_same_tensors(hf_tensors(source), hf_tensors(tmp_path / "hf"))


def test_make_help_lists_the_converter_targets():
    result = run(["make", "-s", "-C", PROJECT_ROOT, "help"])
    for target in ("convert-llama2-mg2hf", "convert-llama2-hf2mg", "convert-bloom-mg2hf", "convert-bloom-hf2mg"):
        assert target in result.stdout
    missing = run(["make", "-s", "-C", PROJECT_ROOT, "convert-llama2-mg2hf", "SOURCE=", "TARGET="])
    assert missing.returncode != 0 and "SOURCE" in missing.stderr


def test_main_in_process_keeps_the_callers_grad_mode(tmp_path):
    import torch

    from toolkits.megatron_hf import convert
    assert torch.is_grad_enabled()
    convert.main(["mg2hf", "--model", "llama2", "--source", str(tmp_path / "missing"), "--target",
                  str(tmp_path / "out")])
    assert torch.is_grad_enabled(), "convert.main() must not switch autograd off for its caller"
