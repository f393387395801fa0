"""Megatron-Core checkpoints <-> HF (toolkits/megatron_hf/mcore_format.py), checked against megatron-core itself.

For each model x TP/PP below, one group of processes (gloo, CPU; tests/megatron_core_cpu.py) builds a tiny
Megatron-Core GPTModel with random weights, runs megatron-core's forward, and saves the model as Megatron-LM does
in both formats (`torch` rank files, `torch_dist`). Our mg2hf converts both (format and names detected from the
files, no flags); the HF model's logits must equal megatron-core's. Then our hf2mg writes the HF model back as
torch_dist and as Megatron-Core rank files, and megatron-core's own loaders (dist_checkpointing.load,
load_state_dict(strict=True)) load them into fresh models whose forward must give HF's logits.
"""
from __future__ import annotations

import importlib.metadata
import json
import pickle
import shutil
import socket
from pathlib import Path

import pytest
import torch

from megatron_fixtures import TINY_MODELS, TinyModel, build_hf_model, hf_logits
from toolkits.megatron_hf.convert import main as convert_main

def _has_megatron_core() -> bool:
    """Without importing it: megatron-core must not enter this process (the converters never import it, and
    test_megatron_convert checks that), only the spawned reference processes."""
    try:
        importlib.metadata.version("megatron-core")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_mcore = pytest.mark.skipif(not _has_megatron_core(),
                                 reason="megatron-core is not installed (requirements.txt pins it; run make setup)")
TOLERANCE = 2e-5  # float32 on both sides; measured differences are <= 5e-6, a wrong layout moves logits by > 0.1


def convert(*argv) -> int:
    return convert_main([str(a) for a in argv] + ["--no-progress"])


def tokens_for(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 13), generator=torch.Generator().manual_seed(11))


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """max |a - b| and the share of tokens whose top-1 prediction agrees."""
    return (a - b).abs().max().item(), (a.argmax(-1) == b.argmax(-1)).float().mean().item()


# ----------------------------------------------------------------------------- the megatron-core side
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, m, tp: int, pp: int, out: str, port: int) -> None:
    """Runs in each spawned process: megatron-core builds, saves, and later loads our conversions."""
    import megatron_core_cpu as mc
    out = Path(out)
    torch.set_num_threads(1)
    with mc.cpu_shims():
        mc.init_parallel(tp, pp, rank, world, port)
        tokens = tokens_for(m.vocab)
        model = mc.build_model(m, tp, pp, seed=1)
        logits = mc.forward_logits(model, tokens, m)
        if logits is not None:
            torch.save(logits, out / "mcore_logits.pt")
        mc.save_torch(model, m, out / "mg-torch", tp, pp)
        mc.save_torch_dist(model, m, out / "mg-dist", tp, pp)
        torch.distributed.barrier()
        if rank == 0:  # our converters, both directions (rank 0 alone, the others wait)
            for fmt in ("torch", "dist"):
                assert convert("mg2hf", "--model", "llama2", "--source", out / f"mg-{fmt}",
                               "--target", out / f"hf-{fmt}") == 0
            assert convert("hf2mg", "--model", "llama2", "--source", out / "hf-torch", "--target", out / "ours-dist",
                           "--tp", tp) == 0  # default format: torch_dist
            assert convert("hf2mg", "--model", "llama2", "--source", out / "hf-torch", "--target",
                           out / "ours-torch", "--tp", tp, "--pp", pp, "--format", "torch", "--layer-spec",
                           "local") == 0
        torch.distributed.barrier()
        for fmt, load in [("dist", lambda mdl: mc.load_torch_dist(mdl, out / "ours-dist" / "release")),
                          ("torch", lambda mdl: mc.load_torch(mdl, out / "ours-torch" / "release", tp, pp))]:
            fresh = mc.build_model(m, tp, pp, seed=2)  # other weights: everything must come from the files
            load(fresh)
            logits = mc.forward_logits(fresh, tokens, m)
            if logits is not None:
                torch.save(logits, out / f"mcore_from_ours_{fmt}.pt")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def run_megatron_core(m, tp: int, pp: int, out: Path) -> None:
    import torch.multiprocessing as mp
    mp.spawn(_worker, args=(tp * pp, m, tp, pp, str(out), _free_port()), nprocs=tp * pp, join=True)


def mcore_models():
    import megatron_core_cpu as mc
    return {
        "llama2-mha": mc.McoreModel("llama2-mha", hidden=48, heads=4, groups=4, ffn=80, rope_theta=10000.0),
        "llama2-gqa": mc.McoreModel("llama2-gqa"),
        "llama3.1": mc.McoreModel("llama3.1", heads=4, groups=2, hidden=64, vocab=300, rope_scaling=True),
        "qwen2-tied": mc.McoreModel("qwen2-tied", qkv_bias=True, tied=True, rope_theta=1000000.0),
    }


CASES = [("llama2-mha", 1, 1), ("llama2-gqa", 2, 1), ("llama3.1", 1, 2), ("qwen2-tied", 2, 1), ("qwen2-tied", 2, 2)]


@pytest.mark.slow
@needs_mcore
@pytest.mark.parametrize("name,tp,pp", CASES, ids=[f"{n}-tp{t}-pp{p}" for n, t, p in CASES])
def test_megatron_core_logits_both_directions(tmp_path, name, tp, pp):
    m = mcore_models()[name]
    run_megatron_core(m, tp, pp, tmp_path)
    tokens = tokens_for(m.vocab)
    reference = torch.load(tmp_path / "mcore_logits.pt")
    assert reference.shape == (*tokens.shape, m.vocab)
    rows = []
    for fmt in ("torch", "dist"):  # Megatron-Core -> HF
        logits = hf_logits(tmp_path / f"hf-{fmt}", tokens)
        rows.append((f"mg2hf {fmt}", *agreement(logits, reference)))
    hf_reference = hf_logits(tmp_path / "hf-torch", tokens)
    for fmt in ("dist", "torch"):  # HF -> Megatron-Core, loaded by megatron-core
        rows.append((f"hf2mg {fmt}", *agreement(torch.load(tmp_path / f"mcore_from_ours_{fmt}.pt"), hf_reference)))
    for label, max_diff, top1 in rows:
        print(f"{name} TP={tp} PP={pp} {label}: max|d| {max_diff:.2e}, top-1 agreement {top1:.3f}")
    assert all(max_diff < TOLERANCE and top1 == 1.0 for _, max_diff, top1 in rows), rows

    # both formats give the same HF model, and its config says what the model is
    assert hf_tensors(tmp_path / "hf-torch").keys() == hf_tensors(tmp_path / "hf-dist").keys()
    for key, value in hf_tensors(tmp_path / "hf-torch").items():
        assert torch.equal(value, hf_tensors(tmp_path / "hf-dist")[key]), key
    config = json.loads((tmp_path / "hf-dist" / "config.json").read_text())
    assert config["model_type"] == ("qwen2" if m.qkv_bias else "llama")
    assert (config["vocab_size"], config["tie_word_embeddings"], config["rope_theta"]) == \
           (m.vocab, m.tied, m.rope_theta)
    assert config["rope_scaling"] == ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
                                      if m.rope_scaling else None)
    if m.tied:
        assert "lm_head.weight" not in hf_tensors(tmp_path / "hf-dist")
    if (name, tp, pp) == ("llama2-gqa", 2, 1):
        check_te_names_read_the_same(tmp_path)


def check_te_names_read_the_same(tmp_path: Path) -> None:
    """A Transformer-Engine run names the norms after the linear they are fused into; rename megatron-core's
    local-spec rank files that way and the HF model must not change."""
    te_names = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
    te = tmp_path / "mg-te"
    shutil.copytree(tmp_path / "mg-torch", te)
    for path in te.rglob("model_optim_rng.pt"):
        state = torch.load(path, weights_only=False)
        renamed = {}
        for key, value in state["model"].items():
            for local, fused in te_names.items():
                key = key.replace(local, fused)
            renamed[key] = value
        assert renamed.keys() != state["model"].keys()
        state["model"] = renamed
        torch.save(state, path)
    assert convert("mg2hf", "--model", "llama2", "--source", te, "--target", tmp_path / "hf-te") == 0
    expected = hf_tensors(tmp_path / "hf-torch")
    assert all(torch.equal(v, expected[k]) for k, v in hf_tensors(tmp_path / "hf-te").items())


# ----------------------------------------------------------------------------- without megatron-core
QWEN = TinyModel("llama2", hidden=64, heads=8, groups=2, ffn=96, layers=3, vocab=100)


def build_qwen2(folder: Path, tied: bool = True) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=QWEN.vocab, hidden_size=QWEN.hidden, intermediate_size=QWEN.ffn,
                         num_hidden_layers=QWEN.layers, num_attention_heads=QWEN.heads,
                         num_key_value_heads=QWEN.groups, tie_word_embeddings=tied, initializer_range=0.15)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def llama_hf(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf-llama")
    build_hf_model(TINY_MODELS["llama_gqa"]).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("fmt,tp,pp,spec", [("torch_dist", 1, 1, "te"), ("torch_dist", 2, 1, "te"),
                                            ("torch", 2, 2, "te"), ("torch", 1, 2, "local")])
def test_round_trip_is_exact(llama_hf, tmp_path, fmt, tp, pp, spec):
    assert convert("hf2mg", "--model", "llama2", "--source", llama_hf, "--target", tmp_path / "mg", "--tp", tp,
                   "--pp", pp, "--format", fmt, "--layer-spec", spec) == 0
    assert convert("mg2hf", "--model", "llama2", "--source", tmp_path / "mg", "--target", tmp_path / "hf") == 0
    original, back = hf_tensors(llama_hf), hf_tensors(tmp_path / "hf")
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)


def test_qwen2_tied_round_trip_and_config(tmp_path):
    build_qwen2(tmp_path / "qwen")
    assert convert("hf2mg", "--model", "qwen2", "--source", tmp_path / "qwen", "--target", tmp_path / "mg") == 0
    assert (tmp_path / "mg/release/.metadata").is_file()  # the default is torch_dist
    assert convert("mg2hf", "--model", "qwen2", "--source", tmp_path / "mg/release", "--target",
                   tmp_path / "hf") == 0
    original, back = hf_tensors(tmp_path / "qwen"), hf_tensors(tmp_path / "hf")
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
    tokens = tokens_for(QWEN.vocab)
    assert torch.equal(hf_logits(tmp_path / "qwen", tokens), hf_logits(tmp_path / "hf", tokens))
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"] is True


def test_torch_dist_layout_is_megatron_cores(llama_hf, tmp_path):
    """Stacked layers, whole tensors, [gate; up] in linear_fc1, every chunk one layer, common.pt with args."""
    from toolkits.megatron_hf.mcore_format import read_dcp_metadata
    assert convert("hf2mg", "--model", "llama2", "--source", llama_hf, "--target", tmp_path / "mg", "--tp", 2) == 0
    folder = tmp_path / "mg/release"
    md = read_dcp_metadata(folder / ".metadata").state_dict_metadata
    tiny = TINY_MODELS["llama_gqa"]
    assert tuple(md["decoder.layers.self_attention.linear_qkv.weight"].size) == \
           (tiny.layers, (tiny.heads + 2 * tiny.groups) * tiny.head_dim, tiny.hidden)
    assert tuple(md["embedding.word_embeddings.weight"].size) == (256, tiny.hidden)  # padded for TP=2
    assert len(md["decoder.layers.mlp.linear_fc1.weight"].chunks) == tiny.layers
    assert "decoder.layers.self_attention.linear_qkv._extra_state/shard_0_4" in md
    fc1 = read_fc1_layer(folder, layer=1)
    hf = hf_tensors(llama_hf)
    assert torch.equal(fc1, torch.cat([hf["model.layers.1.mlp.gate_proj.weight"],
                                       hf["model.layers.1.mlp.up_proj.weight"]]))
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save  # torch's own reader agrees
    dcp_to_torch_save(str(folder), str(tmp_path / "whole.pt"))
    whole = torch.load(tmp_path / "whole.pt", weights_only=False)
    assert torch.equal(whole["decoder.layers.mlp.linear_fc1.weight"][1], fc1)
    common = torch.load(folder / "common.pt", weights_only=False)
    assert common["args"].use_mcore_models and common["args"].num_query_groups == tiny.groups
    assert json.loads((folder / "metadata.json").read_text())["sharded_backend"] == "torch_dist"


def read_fc1_layer(folder: Path, layer: int) -> torch.Tensor:
    from toolkits.megatron_hf.mcore_format import TorchDistCheckpoint
    return TorchDistCheckpoint.open(None, folder).read("decoder.layers.mlp.linear_fc1.weight", layer)


def test_malicious_torch_dist_metadata_is_refused(llama_hf, tmp_path, capsys):
    assert convert("hf2mg", "--model", "llama2", "--source", llama_hf, "--target", tmp_path / "mg") == 0
    marker = tmp_path / "pwned"

    class RunsShellCommand:
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)
    (tmp_path / "mg/release/.metadata").write_bytes(pickle.dumps(RunsShellCommand()))
    assert convert("mg2hf", "--model", "llama2", "--source", tmp_path / "mg", "--target", tmp_path / "hf") == 2
    err = capsys.readouterr().err
    assert "refusing to load" in err and "system is not part of torch's checkpoint metadata" in err
    assert not marker.exists() and not (tmp_path / "hf").exists()


def test_missing_torch_dist_chunk_is_named(llama_hf, tmp_path, capsys):
    from toolkits.megatron_hf.mcore_format import read_dcp_metadata
    assert convert("hf2mg", "--model", "llama2", "--source", llama_hf, "--target", tmp_path / "mg") == 0
    path = tmp_path / "mg/release/.metadata"
    metadata = read_dcp_metadata(path)
    metadata.state_dict_metadata["decoder.layers.mlp.linear_fc2.weight"].chunks.pop(2)
    path.write_bytes(pickle.dumps(metadata))
    assert convert("mg2hf", "--model", "llama2", "--source", tmp_path / "mg", "--target", tmp_path / "hf") == 2
    assert "the chunks of layer 2 of decoder.layers.mlp.linear_fc2.weight cover 0 of" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_refusals_and_the_legacy_gqa_warning(llama_hf, tmp_path, capsys):
    build_qwen2(tmp_path / "qwen")
    assert convert("hf2mg", "--model", "llama2", "--source", tmp_path / "qwen", "--target", tmp_path / "a",
                   "--format", "legacy") == 2
    assert "bias on q/k/v (Qwen2) has no legacy Megatron-LM equivalent" in capsys.readouterr().err
    bloom = tmp_path / "bloom"
    build_hf_model(TINY_MODELS["bloom"]).save_pretrained(bloom)
    assert convert("hf2mg", "--model", "bloom", "--source", bloom, "--target", tmp_path / "b",
                   "--format", "torch_dist") == 2
    assert "write bloom with --format legacy" in capsys.readouterr().err
    config = json.loads((llama_hf / "config.json").read_text())
    linear = tmp_path / "linear-rope"
    shutil.copytree(llama_hf, linear)
    (linear / "config.json").write_text(json.dumps({**config, "rope_scaling": {"type": "linear", "factor": 2.0}}))
    assert convert("hf2mg", "--model", "llama2", "--source", linear, "--target", tmp_path / "c") == 2
    assert "Megatron-Core implements only Llama 3.1's scaling" in capsys.readouterr().err
    qwen_config = json.loads((tmp_path / "qwen/config.json").read_text())
    (tmp_path / "qwen/config.json").write_text(json.dumps({**qwen_config, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}}))
    assert convert("hf2mg", "--model", "qwen2", "--source", tmp_path / "qwen", "--target", tmp_path / "d") == 2
    assert "HF's Qwen2 (transformers 4.44) does not apply rope_scaling" in capsys.readouterr().err
    assert not any((tmp_path / t).exists() for t in "abcd")

    # 8 heads in 4 query groups: TP=1 and TP=2 put several groups on a rank (legacy Megatron-LM #875), TP=4 not
    for tp, warned in [(2, True), (4, False)]:
        assert convert("hf2mg", "--model", "llama2", "--source", llama_hf, "--target", tmp_path / f"legacy-{tp}",
                       "--tp", tp, "--format", "legacy") == 0
        assert ("warning: GQA with 4 query groups" in capsys.readouterr().err) == warned


def test_virtual_pipeline_rank_files_read_the_same(llama_hf, tmp_path):
    """Megatron-Core rank files of an interleaved pipeline (PP=2, 2 chunks): `model0`/`model1` per rank, layers
    numbered from 0 in each chunk; chunk c of stage p holds layer c * L/2 + p * L/4 (here one layer per chunk)."""
    assert convert("hf2mg", "--model", "llama2", "--source", llama_hf, "--target", tmp_path / "mg", "--pp", 4,
                   "--format", "torch", "--layer-spec", "local") == 0
    stages = [torch.load(tmp_path / f"mg/release/mp_rank_00_{p:03d}/model_optim_rng.pt", weights_only=False)
              for p in range(4)]  # one layer per stage: stage s holds global layer s
    for p in range(2):
        state = dict(stages[p], model0=stages[p]["model"], model1=stages[p + 2]["model"])
        del state["model"]
        state["args"].pipeline_model_parallel_size, state["args"].virtual_pipeline_model_parallel_size = 2, 2
        folder = tmp_path / f"vp/release/mp_rank_00_{p:03d}"
        folder.mkdir(parents=True)
        torch.save(state, folder / "model_optim_rng.pt")
    (tmp_path / "vp/latest_checkpointed_iteration.txt").write_text("release")
    assert convert("mg2hf", "--model", "llama2", "--source", tmp_path / "vp", "--target", tmp_path / "hf") == 0
    original, back = hf_tensors(llama_hf), hf_tensors(tmp_path / "hf")
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)


@pytest.mark.slow
def test_seed_wrapper_and_make_target_take_megatron_core_without_flags(llama_hf, tmp_path):
    import os
    import subprocess
    from rlhf_overlay import PROJECT_ROOT
    wrapper = PROJECT_ROOT / "toolkits/model_checkpoints_convertor/llama2/model_convertor.sh"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(cmd):
        result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr
    run(["bash", wrapper, "", llama_hf, tmp_path / "dist", 2, 1, "llama2-7b", 0, "false"])  # torch_dist by default
    assert (tmp_path / "dist/release/.metadata").is_file()
    run(["make", "-s", "-C", PROJECT_ROOT, "convert-llama2-mg2hf", f"SOURCE={tmp_path / 'dist'}",
         f"TARGET={tmp_path / 'hf-dist'}"])
    assert convert("hf2mg", "--model", "llama2", "--source", llama_hf, "--target", tmp_path / "ranks", "--tp", 2,
                   "--pp", 2, "--format", "torch") == 0
    run(["bash", wrapper, "", tmp_path / "ranks", tmp_path / "hf-ranks", 1, 1, "llama2-7b", 0, "true"])
    original = hf_tensors(llama_hf)
    for folder in ("hf-dist", "hf-ranks"):
        back = hf_tensors(tmp_path / folder)
        assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
