"""Benchmark: Megatron -> HF and back on a synthetic >= 1 B-parameter LLaMA at TP=2, PP=2, and the same HF model
through Megatron-Core's torch_dist format (HF -> torch_dist -> HF).

    flock /tmp/rlhf-heavy.lock .venv/bin/python benchmarks/bench_converters.py              # 1.1 B params, bf16
    .venv/bin/python benchmarks/bench_converters.py --layers 2 --hidden 1024 --ffn 2816      # a quick dry run
    .venv/bin/python benchmarks/bench_converters.py --keep /tmp/bench                       # keep the files

Writes a Megatron checkpoint with torch.save per rank (TinyLlama-1.1B shapes: GQA with 4 groups), then runs
each direction in a child process and prints: wall time, bytes, the time to copy the same bytes (shutil.copyfile
and a plain read/write loop), the child's peak anonymous memory (RssAnon from /proc/<pid>/status, sampled
every 5 ms: mmap'd checkpoint pages are file-backed and reclaimable, so they are not counted), the same for a
child that only imports the converter (interpreter + torch), and the largest layer plus the embeddings, which
the conversion's own memory must stay within ~1.5x of. Finally it checks the round trips are bit-exact
(legacy rank files against the originals, the HF model after torch_dist against the HF model before).
Everything lives in a temporary folder that is deleted afterwards (unless --keep).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--groups", type=int, default=4, help="query groups (KV heads)")
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder)")
    return parser


# ----------------------------------------------------------------------------- synthetic checkpoint
def rank_shapes(a) -> tuple[dict, dict]:
    """Per-rank Megatron shapes: (one layer, globals)."""
    hd = a.hidden // a.heads
    layer = {"input_layernorm.weight": (a.hidden,), "post_attention_layernorm.weight": (a.hidden,),
             "self_attention.query_key_value.weight": ((a.heads + 2 * a.groups) * hd // a.tp, a.hidden),
             "self_attention.dense.weight": (a.hidden, a.hidden // a.tp),
             "mlp.dense_h_to_4h.weight": (2 * a.ffn // a.tp, a.hidden),
             "mlp.dense_4h_to_h.weight": (a.hidden, a.ffn // a.tp)}
    globals_ = {"embedding": (a.vocab // a.tp, a.hidden), "output_layer": (a.vocab // a.tp, a.hidden),
                "final_layernorm.weight": (a.hidden,)}
    return layer, globals_


def write_synthetic_megatron(root: Path, a) -> int:
    import torch
    layer_shapes, global_shapes = rank_shapes(a)
    per_stage = a.layers // a.pp
    args = argparse.Namespace(num_layers=a.layers, hidden_size=a.hidden, num_attention_heads=a.heads,
                              group_query_attention=True, num_query_groups=a.groups, ffn_hidden_size=a.ffn,
                              tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=a.pp,
                              padded_vocab_size=a.vocab, vocab_size=a.vocab, max_position_embeddings=2048,
                              norm_epsilon=1e-5, rotary_base=10000.0, params_dtype=torch.bfloat16)
    root.mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text("release")
    gen = torch.Generator().manual_seed(0)

    def rand(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(torch.bfloat16)

    total = 0
    for p in range(a.pp):
        # norms are replicated: every TP rank of a stage holds the same values
        replicated = {f"layers.{i}.{n}": rand(s) for i in range(per_stage) for n, s in layer_shapes.items()
                      if n.endswith("layernorm.weight")}
        replicated["final_layernorm.weight"] = rand(global_shapes["final_layernorm.weight"])
        for t in range(a.tp):
            encoder = {f"layers.{i}.{n}": replicated.get(f"layers.{i}.{n}") if n.endswith("layernorm.weight")
                       else rand(s) for i in range(per_stage) for n, s in layer_shapes.items()}
            language_model = {"encoder": encoder}
            if p == 0:
                language_model["embedding"] = {"word_embeddings": {"weight": rand(global_shapes["embedding"])}}
            if p == a.pp - 1:
                encoder["final_layernorm.weight"] = replicated["final_layernorm.weight"]
                language_model["output_layer"] = {"weight": rand(global_shapes["output_layer"])}
            folder = root / "release" / f"mp_rank_{t:02d}_{p:03d}"
            folder.mkdir(parents=True)
            torch.save({"model": {"language_model": language_model}, "args": args, "checkpoint_version": 3.0,
                        "iteration": 0}, folder / "model_optim_rng.pt")
            total += (folder / "model_optim_rng.pt").stat().st_size
    return total


# ----------------------------------------------------------------------------- measuring
def rss_anon_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def run_measured(cmd: list[str]) -> tuple[float, int]:
    """Wall time and peak RssAnon (bytes) of a child process."""
    os.sync()  # every timed phase starts without a backlog of dirty pages from the previous one
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    start = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    peak = 0
    while child.poll() is None:
        peak = max(peak, rss_anon_kib(child.pid) or 0)
        time.sleep(0.005)
    wall = time.perf_counter() - start
    output = child.stdout.read()
    if child.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({child.returncode}):\n{output}")
    return wall, peak * 1024


def import_floor() -> tuple[float, int]:
    """Start-up time and RssAnon of a child that only imports the converter and torch: the interpreter's share."""
    pause = 0.3  # so the sampler sees the settled footprint
    code = ("import time, torch, toolkits.megatron_hf.megatron_to_hf, toolkits.megatron_hf.hf_to_megatron; "
            f"import safetensors, tqdm; time.sleep({pause})")
    wall, peak = run_measured([sys.executable, "-c", code])
    return wall - pause, peak


def copy_baselines(files: list[Path], scratch: Path) -> tuple[float, float]:
    scratch.mkdir()
    os.sync()
    start = time.perf_counter()
    for i, f in enumerate(files):
        shutil.copyfile(f, scratch / f"cp-{i}")
    copyfile = time.perf_counter() - start
    os.sync()
    start = time.perf_counter()
    for i, f in enumerate(files):
        with open(f, "rb") as src, open(scratch / f"rw-{i}", "wb") as dst:
            while chunk := src.read(64 << 20):
                dst.write(chunk)
    read_write = time.perf_counter() - start
    shutil.rmtree(scratch)
    return copyfile, read_write


def verify_round_trip(original: Path, converted: Path, a) -> int:
    """Compare every tensor of the two Megatron checkpoints (mmap'd, one at a time); returns the count."""
    import torch
    with torch.serialization.safe_globals([argparse.Namespace]):
        compared = 0
        for folder in sorted((original / "release").glob("mp_rank_*")):
            left = torch.load(folder / "model_optim_rng.pt", mmap=True, weights_only=True)["model"]
            right = torch.load(converted / "release" / folder.name / "model_optim_rng.pt", mmap=True,
                               weights_only=True)["model"]
            for name, tensor in flatten(left).items():
                if not torch.equal(tensor, flatten(right)[name]):
                    raise SystemExit(f"round trip differs: {folder.name} {name}")
                compared += 1
    return compared


def verify_same_hf(left: Path, right: Path) -> int:
    """Every tensor of two HF folders equal (safetensors, opened lazily, one tensor at a time)."""
    import json

    import torch
    from safetensors import safe_open
    index = [json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
             for folder in (left, right)]
    if index[0].keys() != index[1].keys():
        raise SystemExit(f"HF tensor names differ: {sorted(index[0].keys() ^ index[1].keys())[:5]}")
    for name in index[0]:
        with safe_open(str(left / index[0][name]), "pt") as a, safe_open(str(right / index[1][name]), "pt") as b:
            if not torch.equal(a.get_tensor(name), b.get_tensor(name)):
                raise SystemExit(f"round trip through torch_dist differs: {name}")
    return len(index[0])


def flatten(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    work = a.keep or Path(tempfile.mkdtemp(prefix="bench-converters-", dir=os.environ.get("TMPDIR", "/tmp")))
    work.mkdir(parents=True, exist_ok=True)
    try:
        hd = a.hidden // a.heads
        layer_params = (a.heads + 2 * a.groups) * hd * a.hidden + a.hidden * a.hidden + 3 * a.ffn * a.hidden
        params = a.layers * layer_params + 2 * a.vocab * a.hidden
        layer_bytes, embeddings_bytes = 2 * layer_params, 2 * 2 * a.vocab * a.hidden  # bf16
        print(f"synthetic LLaMA: {params / 1e9:.2f} B params, bf16, TP={a.tp} PP={a.pp}, {a.layers} layers, "
              f"hidden {a.hidden}, {a.heads} heads / {a.groups} groups, FFN {a.ffn}, vocab {a.vocab}")
        t0 = time.perf_counter()
        source_bytes = write_synthetic_megatron(work / "megatron", a)
        print(f"generated {source_bytes / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s")
        files = sorted((work / "megatron").rglob("*.pt"))
        copyfile, read_write = copy_baselines(files, work / "copy")
        startup, floor = import_floor()

        convert = [sys.executable, "-m", "toolkits.megatron_hf.convert"]
        mg2hf = run_measured(convert + ["mg2hf", "--model", "llama2", "--source", str(work / "megatron"),
                                        "--target", str(work / "hf"), "--no-progress"])
        hf2mg = run_measured(convert + ["hf2mg", "--model", "llama2", "--source", str(work / "hf"),
                                        "--target", str(work / "megatron-again"), "--tp", str(a.tp), "--pp",
                                        str(a.pp), "--format", "legacy", "--no-progress"])
        compared = verify_round_trip(work / "megatron", work / "megatron-again", a)
        to_dist = run_measured(convert + ["hf2mg", "--model", "llama2", "--source", str(work / "hf"),
                                          "--target", str(work / "megatron-dist"), "--tp", str(a.tp),
                                          "--format", "torch_dist", "--no-progress"])
        from_dist = run_measured(convert + ["mg2hf", "--model", "llama2", "--source", str(work / "megatron-dist"),
                                            "--target", str(work / "hf-from-dist"), "--no-progress"])
        compared_dist = verify_same_hf(work / "hf", work / "hf-from-dist")
        dist_bytes = sum(f.stat().st_size for f in (work / "megatron-dist").rglob("*") if f.is_file())

        budget = 1.5 * (layer_bytes + embeddings_bytes)
        mb = 1e6
        print(f"\nlargest layer {layer_bytes / mb:.0f} MB + embeddings (input + output) {embeddings_bytes / mb:.0f} MB"
              f" -> 1.5x budget {budget / mb:.0f} MB; model {source_bytes / mb:.0f} MB")
        print(f"copy baseline ({source_bytes / 1e9:.2f} GB): shutil.copyfile {copyfile:.1f} s, "
              f"read/write loop {read_write:.1f} s")
        print(f"a child that only imports torch + the converter: {startup:.1f} s, RssAnon {floor / mb:.0f} MB")
        print(f"torch_dist checkpoint: {dist_bytes / 1e9:.2f} GB")
        for label, (wall, peak) in [("Megatron -> HF", mg2hf), ("HF -> Megatron", hf2mg),
                                    ("HF -> Megatron-Core torch_dist", to_dist),
                                    ("Megatron-Core torch_dist -> HF", from_dist)]:
            print(f"{label}: {wall:.1f} s, {wall - startup:.1f} s after start-up ({(wall - startup) / read_write:.2f}x "
                  f"read/write copy, {(wall - startup) / copyfile:.2f}x copyfile); "
                  f"peak RssAnon {peak / mb:.0f} MB, {(peak - floor) / mb:.0f} MB above the import floor "
                  f"({(peak - floor) / budget:.2f} of the budget)")
        print(f"round trip Megatron -> HF -> Megatron: {compared} tensors bit-identical")
        print(f"round trip HF -> torch_dist -> HF: {compared_dist} tensors bit-identical")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
