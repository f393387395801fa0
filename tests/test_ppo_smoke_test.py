"""make ppo-smoke-test — the project's main job on its embedded default.

Integration (upstream + slow): the default run (tiny BLOOM, rule reward, CPU) finishes well under 5 minutes,
prints a line per PPO step and `mean reward: <first> -> <last>`, and the reward clearly rises; the seed's form
(MODEL=<folder> REWARD=model: an untrained value-head RM on the same base, reward minus the reference's score)
runs too. Unit: --help, the rise verdict.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from rlhf_overlay import PROJECT_ROOT
from rlhf_overlay.ppo_smoke_test import SMOKE_DEFAULTS, verdict


def test_help_is_instant_and_defaults_are_the_embedded_run():
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "rlhf_overlay.ppo_smoke_test", "--help"], capture_output=True,
                         text=True, cwd=PROJECT_ROOT, timeout=60)
    assert res.returncode == 0 and time.time() - t0 < 5
    assert "make ppo-smoke-test" in res.stdout and "REWARD=model" in res.stdout
    c = SMOKE_DEFAULTS.resolve()
    assert (c.arch, c.reward, c.model, c.run_kind) == ("bloom", "rule", "", "ppo-smoke-test")


def _steps(means, std=0.1, n=32):
    return [{"reward_mean": m, "reward_std": std, "samples": n} for m in means]


def test_verdict_needs_a_clear_rise():
    up = verdict(_steps([0.5, 0.5, 0.5, 0.6, 0.7, 0.8, 0.8, 0.8]), window=3)
    assert up["rose"] and up["first"] == pytest.approx(0.5) and up["last"] == pytest.approx(0.8)
    flat = verdict(_steps([0.5, 0.51, 0.49, 0.5, 0.5, 0.51]), window=3)
    assert not flat["rose"]
    down = verdict(_steps([0.8, 0.8, 0.7, 0.6, 0.5, 0.5]), window=3)
    assert not down["rose"] and down["rise"] < 0
    noisy = verdict(_steps([0.5, 0.5, 0.5, 0.53, 0.53, 0.53], std=0.5), window=3)
    assert not noisy["rose"], "a rise within the noise is not a rise"
    short = verdict(_steps([0.4, 0.9]), window=3)
    assert short["window"] == 1 and short["rose"]


@pytest.fixture(scope="module")
def default_run(trlx_dir, tiny_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL", "REWARD", "RM", "DATA")}
    env.update(OUTPUT=str(out), OVERWRITE="1")
    t0 = time.time()
    res = subprocess.run(["make", "-s", "ppo-smoke-test"], cwd=PROJECT_ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    return out, res, time.time() - t0


@pytest.mark.upstream
@pytest.mark.slow
def test_default_smoke_test_reward_rises(default_run):
    out, res, seconds = default_run
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert seconds < 300, f"the embedded smoke test must finish in under 5 minutes (took {seconds:.0f} s)"
    lines = res.stdout.splitlines()
    steps = [ln for ln in lines if re.match(r"step +\d+/40 +mean reward [+-]\d", ln)]
    assert len(steps) == 40, "one progress line per PPO step"
    m = re.search(r"^mean reward: (-?\d+\.\d+) -> (-?\d+\.\d+)$", res.stdout, re.M)
    assert m, "the closing line `mean reward: <first> -> <last>`"
    first, last = float(m.group(1)), float(m.group(2))
    assert last > first + 0.1, (first, last)
    assert "PASS: the mean reward rose" in res.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rose"] and metrics["verdict"]["rise"] > 3 * metrics["verdict"]["standard_error"]
    assert metrics["reward_first"] == pytest.approx(first, abs=1e-3)
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert samples[-1]["step"] == 40


@pytest.mark.upstream
@pytest.mark.slow
def test_default_smoke_test_leaves_a_reportable_run(default_run, tiny_assets):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM

    out, res, _ = default_run
    assert res.returncode == 0
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    rewards = [e.value for e in acc.Scalars("ppo/reward_mean")]
    assert len(rewards) == 40 and sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5
    for f in ("command.txt", "config.json", "training.log"):
        assert (out / f).is_file()
    _, info = AutoModelForCausalLM.from_pretrained(out / "policy", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # OUTPUT is never overwritten without OVERWRITE=1
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL", "REWARD", "OVERWRITE")}
    again = subprocess.run(["make", "-s", "ppo-smoke-test"], cwd=PROJECT_ROOT, env=dict(env, OUTPUT=str(out)),
                           capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "OVERWRITE=1" in again.stderr


@pytest.mark.upstream
@pytest.mark.slow
def test_seed_form_with_model_and_untrained_reward_model(trlx_dir, tiny_assets, tmp_path):
    """MODEL=<folder> REWARD=model: the seed's trlx_bloom_rlhf_test.py (hydra heads, untrained value-head RM from
    the same base, reward minus the reference's score), shrunk to CPU size through the same options."""
    out = tmp_path / "seed"
    env = {k: v for k, v in os.environ.items() if k not in ("RM", "DATA")}
    env.update(MODEL=str(tiny_assets / "models" / "tiny-bloom"), REWARD="model", OUTPUT=str(out))
    res = subprocess.run(["bash", "training_scripts/ppo_smoke_test.sh", "--steps", "2", "--rollouts", "16",
                          "--chunk-size", "16", "--batch-size", "8", "--seq-length", "64", "--max-new-tokens", "8",
                          "--num-layers-unfrozen", "1", "--eval-prompts", "4"],
                         cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rm_path"] == "untrained" and cfg["reward_baseline"] == "reference"
    assert cfg["ppo"]["num_layers_unfrozen"] == 1 and cfg["ppo"]["lr"] == 1e-6  # the seed recipe's values
    assert "minus the reference's score" in res.stdout and "mean reward:" in res.stdout
