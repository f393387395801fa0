"""Small stand-ins for every kind of folder this project writes, built from the tiny assets in well under a second
each (the layouts are the ones the training targets write; the weights are tiny or zero):

    causal_lm      a base model / trlx policy/ (safetensors, plain keys)
    dschat_actor   DeepSpeed-Chat actor/ or DPO model/ (pytorch_model.bin, plain keys)
    dschat_critic  DeepSpeed-Chat critic (rm-llama2 model/, ppo-llama2 critic/): rwtransformer.* + v_head.weight
    trlx_rm        trlx value-head reward model (rm-bloom reward_model/): trunk + value_head.safetensors + json
    trlx_checkpoint  trlx save_state checkpoint: wrapped keys, optimizer.bin, hf_model/
    run_folder     a run folder (command.txt, config.json of settings) holding `inner` under `sub`/
    megatron       a Megatron checkpoint root (latest_checkpointed_iteration.txt, release/)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file


def causal_lm(tiny_assets: Path, out: Path, arch: str = "llama") -> Path:
    shutil.copytree(tiny_assets / "models" / f"tiny-{arch}", out)
    return out


def _dschat_folder(tiny_assets: Path, out: Path, weights: dict) -> Path:
    """A DeepSpeed-Chat save_hf_format folder: the tiny LLaMA's config.json + pytorch_model.bin with these keys."""
    out.mkdir(parents=True)
    shutil.copy(tiny_assets / "models" / "tiny-llama" / "config.json", out / "config.json")
    torch.save(weights, out / "pytorch_model.bin")
    return out


def dschat_actor(tiny_assets: Path, out: Path) -> Path:
    return _dschat_folder(tiny_assets, out, {"model.embed_tokens.weight": torch.zeros(4, 2),
                                             "lm_head.weight": torch.zeros(4, 2)})


def dschat_critic(tiny_assets: Path, out: Path) -> Path:
    return _dschat_folder(tiny_assets, out, {"rwtransformer.embed_tokens.weight": torch.zeros(4, 2),
                                             "v_head.weight": torch.zeros(1, 2)})


def trlx_rm(tiny_assets: Path, out: Path) -> Path:
    causal_lm(tiny_assets, out, "bloom")
    save_file({"weight": torch.zeros(1, 8)}, str(out / "value_head.safetensors"))
    (out / "reward_model.json").write_text(json.dumps({"format": "rlhf-overlay/value-head-reward-model/1"}))
    return out


def trlx_checkpoint(tiny_assets: Path, out: Path) -> Path:
    out.mkdir(parents=True)
    shutil.copy(tiny_assets / "models" / "tiny-bloom" / "config.json", out / "config.json")
    save_file({"base_model.transformer.word_embeddings.weight": torch.zeros(4, 2),
               "v_head.0.weight": torch.zeros(1, 2)}, str(out / "model.safetensors"))
    torch.save({}, out / "optimizer.bin")
    causal_lm(tiny_assets, out / "hf_model", "bloom")
    return out


def run_folder(out: Path, sub: str | None = None, make_inner=None) -> Path:
    out.mkdir(parents=True)
    (out / "command.txt").write_text("cd /x && python -m rlhf_overlay.something\n")
    (out / "config.json").write_text(json.dumps({"run_dir": str(out)}))
    if sub:
        make_inner(out / sub)
    return out


def megatron(out: Path) -> Path:
    (out / "release" / "mp_rank_00").mkdir(parents=True)
    (out / "latest_checkpointed_iteration.txt").write_text("release")
    return out


def truncate(file: Path, keep: int) -> int:
    """Cut `file` to its first `keep` bytes (an interrupted copy); returns its former size."""
    size = file.stat().st_size
    with open(file, "r+b") as f:
        f.truncate(keep)
    return size


def snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folders` with its size and mtime, to assert nothing was created or changed."""
    out = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")) if Path(folder).exists() else []:
            st = p.stat()
            out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out
