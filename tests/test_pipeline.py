"""make pipeline-llama2 / pipeline-bloom — the seed's whole chain: Megatron SFT -> HF -> reward model -> PPO -> Megatron.

Slow + upstream: both tiny pipelines end to end through make (every stage a subprocess reading the previous stage's
files): one folder per stage, a summary.md with the end result, a final Megatron checkpoint with the input's TP/PP
whose logits (converted back) equal the HF policy's — checked here again, independently of the pipeline's own check;
RESUME skips done stages and redoes an unfinished one. Unit: bad input is refused before anything is created.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_overlay import PROJECT_ROOT
from rlhf_overlay.tools.pipeline import DONE, STAGES, hf2mg_format_flags, tiny_flags


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MODEL", "RM", "DATA", "MEGATRON_SFT", "TOKENIZER", "RESUME", "OUTPUT", "NUM_GPUS")}
    env.update(extra)
    return env


def _make(target, **extra):
    return subprocess.run(["make", "-s", target], cwd=PROJECT_ROOT, env=_env(**extra), capture_output=True,
                          text=True, timeout=1200)


def test_bad_input_is_refused_before_anything_is_created(tmp_path):
    out = tmp_path / "p"
    res = subprocess.run([sys.executable, "-m", "rlhf_overlay.tools.pipeline", "run", "--family", "llama2",
                          "--megatron-sft", str(tmp_path / "nope"), "--output", str(out)],
                         cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.startswith("error: MEGATRON_SFT=") and len(res.stderr.strip().splitlines()) == 1
    assert not out.exists()
    res = subprocess.run([sys.executable, "-m", "rlhf_overlay.tools.pipeline", "run", "--family", "bloom",
                          "--resume", str(tmp_path)], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "not a pipeline folder" in res.stderr


def test_tiny_flags_select_the_tiny_recipe_for_a_given_model(tiny_assets):
    from rlhf_overlay.trlx_jobs.ppo import PPORunConfig

    model = tiny_assets / "models" / "tiny-bloom"
    flags = tiny_flags(PPORunConfig, "bloom", model, rm=str(model))
    tiny = PPORunConfig(arch="bloom").resolve()
    got = dict(zip(flags[::2], flags[1::2]))
    assert got["--lr"] == str(tiny.lr) and got["--steps"] == str(tiny.steps)
    assert got["--init-kl-coef"] == str(tiny.init_kl_coef) and got["--num-layers-unfrozen"] == "-1"


def test_hf2mg_format_flag_is_found_only_when_offered():
    flags = hf2mg_format_flags("legacy")
    assert flags == [] or (flags[0].startswith("--") and flags[1] == "legacy")


def _logits_equal(a: Path, b: Path) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a)
    ids = tok("Human: tell me about the river. Assistant: the river is calm and bright.", return_tensors="pt")
    with torch.no_grad():
        la = AutoModelForCausalLM.from_pretrained(a).eval()(**ids).logits
        lb = AutoModelForCausalLM.from_pretrained(b).eval()(**ids).logits
    assert la.shape == lb.shape
    return float((la - lb).abs().max())


@pytest.mark.upstream
@pytest.mark.slow
@pytest.mark.parametrize("family,tp,pp", [("llama2", 2, 2), ("bloom", 2, 1)])
def test_pipeline_end_to_end_and_resume(trlx_dir, dschat_dir, tiny_assets, tmp_path, family, tp, pp):
    from toolkits.megatron_hf.megatron_format import MegatronCheckpoint

    out = tmp_path / f"pipeline-{family}"
    res = _make(f"pipeline-{family}", OUTPUT=str(out))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert all((out / s / DONE).is_file() for s in STAGES)
    # the stand-in Megatron SFT checkpoint and the final one share TP/PP
    sft = MegatronCheckpoint.open(out / "0-megatron-sft" / "checkpoint")
    final = MegatronCheckpoint.open(out / "4-megatron-policy" / "checkpoint")
    assert (sft.tp, sft.pp) == (final.tp, final.pp) == (tp, pp)
    # each stage read the previous stage's files
    rm_cmd = (out / "2-reward-model" / "command.txt").read_text()
    ppo_cmd = (out / "3-ppo" / "command.txt").read_text()
    assert str(out / "1-sft-hf" / "model") in rm_cmd and str(out / "1-sft-hf" / "model") in ppo_cmd
    assert str(out / "2-reward-model" / "run") in ppo_cmd
    ppo = json.loads((out / "3-ppo" / DONE).read_text())
    assert str(out / "3-ppo" / "run") in ppo["policy"]
    assert str(out / "0-megatron-sft" / "checkpoint") in (out / "1-sft-hf" / "command.txt").read_text()
    assert ppo["policy"] in (out / "4-megatron-policy" / "command.txt").read_text()
    # the final Megatron checkpoint, converted back, gives the HF policy's logits (checked again here)
    check = json.loads((out / "5-check" / "logits.json").read_text())
    assert check["same"] and check["max_abs_diff"] <= 1e-4
    assert _logits_equal(Path(ppo["policy"]), out / "5-check" / "policy-from-megatron") <= 1e-4
    rm = json.loads((out / "2-reward-model" / DONE).read_text())
    assert rm["eval_accuracy"] >= 0.9, rm
    summary = (out / "summary.md").read_text()
    assert f"reward model eval accuracy: **{rm['eval_accuracy']:.3f}**" in summary
    assert "PPO mean reward:" in summary and "nats per answer token" in summary and "fluency" in summary
    assert "**the same logits**" in summary
    for link in re.findall(r"\]\(([^)]+)\)", summary):
        assert (out / link).exists(), link
    assert (out / "3-ppo" / "run" / "summary.md").is_file() and (out / "2-reward-model" / "run" / "summary.md").is_file()
    # RESUME: done stages are skipped; an unfinished stage is redone from scratch
    (out / "5-check" / DONE).unlink()
    again = _make(f"pipeline-{family}", RESUME=str(out))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for stage in STAGES[:-1]:
        assert f"[pipeline] {stage}: done in an earlier run, skipped" in again.stdout
    assert "[pipeline] 5-check: starting" in again.stdout and (out / "5-check" / DONE).is_file()
