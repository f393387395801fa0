"""make ppo-smoke-test — the project's main job on its embedded default.

Integration (upstream + slow): the default run (pre-trained tiny BLOOM, rule reward, CPU) prints a line per PPO
step, `mean reward: <first> -> <last>` and the three health numbers, and passes: the reward clearly rises, the answers
stay fluent and the KL per answer token stays bounded; a deliberately degenerate run (no KL penalty, a high learning
rate) fails and the verdict names what broke; the seed's form (MODEL=<folder> REWARD=model: an untrained value-head
RM on the same base, reward minus the reference's score) runs too. Unit: --help, the rise verdict, the health
checks.
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
from rlhf_overlay.trlx_jobs.smoke_test import (BASE_FLUENCY_MIN, END_FLUENCY_MIN, END_KL_PER_TOKEN_MAX, SMOKE_DEFAULTS,
                                         failures, health, verdict)
from helpers import tb_scalars


def test_help_is_instant_and_defaults_are_the_embedded_run():
    res = subprocess.run([sys.executable, "-m", "rlhf_overlay.trlx_jobs.smoke_test", "--help"], capture_output=True,
                         text=True, cwd=PROJECT_ROOT, timeout=60)
    assert res.returncode == 0   # "instant": no heavy import for --help (test_help_is_instant in test_trlx_ppo)
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


def _health_steps(fluency, kl):
    return [{"reward_mean": 0.5, "reward_std": 0.1, "samples": 32, "fluency": f, "kl_per_token": k}
            for f, k in zip(fluency, kl)]


def test_health_names_what_failed():
    ok = health(_health_steps([1.0, 0.97, 0.95, 0.93, 0.92, 0.94], [0.0, 0.1, 0.2, 0.3, 0.3, 0.3]), window=3)
    assert ok["fluency_base"] == 1.0 and ok["fluency_end"] == pytest.approx(0.93)
    assert ok["kl_per_token_end"] == pytest.approx(0.3)
    rose = {"rose": True, "rise": 0.2, "standard_error": 0.01}
    assert failures(rose, ok) == []
    bad = health(_health_steps([0.9, 0.9, 0.8, 0.5, 0.4, 0.3], [0.0, 0.5, 1.0, 2.0, 3.0, 4.0]), window=3)
    msgs = failures({"rose": False, "rise": 0.01, "standard_error": 0.01}, bad)
    assert len(msgs) == 4
    assert "reward did not clearly rise" in msgs[0] and "base model is not fluent" in msgs[1]
    assert "stopped being fluent" in msgs[2] and "KL to the reference ran away" in msgs[3]
    assert failures({"rose": True, "rise": 0.2, "standard_error": 0.01}, None) == []   # own model: reward only
    # the bounds are the issue's: fluent base, fluent end, bounded KL
    assert (BASE_FLUENCY_MIN, END_FLUENCY_MIN, END_KL_PER_TOKEN_MAX) == (0.95, 0.9, 0.5)


def _last_numbers(stdout):
    flu = re.search(r"^fluency: base (\d\.\d+) .*-> end (\d\.\d+) ", stdout, re.M)
    kl = re.search(r"^KL per answer token at the end: (\d+\.\d+) nats", stdout, re.M)
    assert flu and kl, stdout[-2000:]
    return float(flu.group(1)), float(flu.group(2)), float(kl.group(1))


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
    lines = res.stdout.splitlines()
    n_steps = SMOKE_DEFAULTS.resolve().steps
    steps = [ln for ln in lines if re.match(rf"step +\d+/{n_steps} +mean reward [+-]\d.* fluency \d", ln)]
    assert len(steps) == n_steps, "one progress line per PPO step"
    m = re.search(r"^mean reward: (-?\d+\.\d+) -> (-?\d+\.\d+)$", res.stdout, re.M)
    assert m, "the closing line `mean reward: <first> -> <last>`"
    first, last = float(m.group(1)), float(m.group(2))
    assert last > first + 0.1, (first, last)
    assert "PASS: the mean reward rose" in res.stdout and "answers stayed fluent, KL bounded" in res.stdout
    base, end, kl = _last_numbers(res.stdout)
    assert base >= 0.95 and end >= 0.9 and kl <= 0.5, (base, end, kl)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rose"] and metrics["verdict"]["rise"] > 3 * metrics["verdict"]["standard_error"]
    assert metrics["passed"] and metrics["failed"] == []
    assert metrics["health"]["kl_per_token_end"] == pytest.approx(kl, abs=1e-3)
    assert metrics["reward_first"] == pytest.approx(first, abs=1e-3)
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert samples[-1]["step"] == n_steps


@pytest.mark.upstream
@pytest.mark.slow
def test_default_smoke_test_leaves_a_reportable_run(default_run, tiny_assets):
    from transformers import AutoModelForCausalLM

    out, res, _ = default_run
    assert res.returncode == 0
    tb = tb_scalars(out / "tensorboard")
    n_steps = SMOKE_DEFAULTS.resolve().steps
    rewards = [v for _, v in tb["ppo/reward_mean"]]
    assert len(rewards) == n_steps and sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5
    fluency = [v for _, v in tb["ppo/fluency"]]
    assert len(fluency) == n_steps and min(fluency) >= 0.8
    assert len(tb["ppo/kl_per_token"]) == n_steps
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


@pytest.mark.upstream
@pytest.mark.slow
def test_a_degenerate_policy_fails_and_the_verdict_says_why(trlx_dir, tiny_assets, tmp_path):
    """No KL penalty and a 30x learning rate: the reward still rises (the policy lists POSITIVE words or loops),
    but it runs away from the reference and/or stops speaking the language; the smoke test must say so."""
    out = tmp_path / "degenerate"
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL", "REWARD", "RM", "DATA")}
    env.update(OUTPUT=str(out))
    res = subprocess.run(["bash", "training_scripts/ppo_smoke_test.sh", "--init-kl-coef", "0", "--lr", "3e-3"],
                         cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    base, end, kl = _last_numbers(res.stdout)
    assert base >= 0.95, "the base itself is fluent"
    fail = [ln for ln in res.stderr.splitlines() if ln.startswith("FAIL: ")]
    assert len(fail) == 1
    named = [("stopped being fluent" in fail[0], end < 0.9), ("KL to the reference ran away" in fail[0], kl > 0.5)]
    assert all(said == broke for said, broke in named) and any(broke for _, broke in named), (fail, end, kl)
    metrics = json.loads((out / "metrics.json").read_text())
    assert not metrics["passed"] and metrics["failed"]
