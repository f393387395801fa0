"""rlhf_overlay.runtime.verdict: the tiny-world verdict shared by trlx and DeepSpeed-Chat PPO — the reward must
clearly rise, the answers stay fluent and the KL per answer token bounded; judged only for tiny-world runs long
enough to compare first and last steps; DeepSpeed-Chat's steps read back from its tensorboard scalars."""
from __future__ import annotations

import json
import math

import pytest

from rlhf_overlay.runtime import verdict as vd


def _steps(rewards, std=None, fluency=1.0, kl=0.1):
    return [{"reward_mean": r, "reward_std": std, "samples": 32 if std is not None else None, "fluency": fluency,
             "kl_per_token": kl} for r in rewards]


def test_without_per_sample_spread_the_steps_spread_is_the_noise():
    noisy = vd.verdict(_steps([-1.5, -3.3, -3.9, -2.7, -0.6, -5.1]), window=3)   # measured DS-Chat steps: no rise
    assert not noisy["rose"] and noisy["standard_error"] > 1
    clear = vd.verdict(_steps([-3.0, -2.9, -3.1, 4.0, 4.1, 3.9]), window=3)
    assert clear["rose"] and clear["rise"] == pytest.approx(7.0)
    one = vd.verdict(_steps([0.0, 5.0]), window=3)                                # one step a side: no noise estimate
    assert one["standard_error"] == math.inf and not one["rose"]


def test_per_sample_spread_is_used_when_every_step_has_it():
    v = vd.verdict(_steps([0.5, 0.5, 0.5, 0.6, 0.6, 0.6], std=0.1), window=3)
    assert v["standard_error"] == pytest.approx(math.sqrt(2 * 0.01 / 96)) and v["rose"]


def test_judge_and_report_pass(capsys):
    result = vd.judge(_steps([0.5, 0.5, 0.5, 0.8, 0.8, 0.8], std=0.1), window=3, tiny=True)
    assert result["judged"] and result["passed"] and result["failed"] == []
    assert vd.report(result, "ppo-x") == 0
    out = capsys.readouterr().out
    assert "mean reward: 0.500 -> 0.800" in out and "fluency: base 1.00" in out
    assert "KL per answer token at the end: 0.100 nats" in out and "PASS: ppo-x" in out


def test_report_names_each_failure(capsys, tmp_path):
    steps = _steps([0.5, 0.5, 0.5, 0.5, 0.5, 0.5], std=0.1, kl=2.0)
    steps[0]["fluency"] = 0.99
    for s in steps[1:]:
        s["fluency"] = 0.4
    result = vd.judge(steps, window=3, tiny=True)
    assert vd.report(result, "ppo-x", log=tmp_path / "training.log") == 1
    err = capsys.readouterr().err
    assert err.startswith("FAIL: ppo-x: the mean reward did not clearly rise")
    assert "the answers stopped being fluent (fluency at the end 0.40 < 0.9)" in err
    assert "the KL to the reference ran away (2.000 nats per answer token at the end > 0.5)" in err
    assert str(tmp_path / "training.log") in err


def test_own_models_and_short_runs_are_measured_not_judged(capsys):
    bad = _steps([0.5] * 6, std=0.1, kl=3.0)
    own = vd.judge(bad, window=3, tiny=False)
    assert not own["judged"] and own["passed"] is None and own["would_fail"] and own["failed"] == []
    assert vd.report(own, "ppo-x") == 0
    out = capsys.readouterr().out
    assert "KL per answer token at the end: 3.000" in out and "note: not judged" in out and "tiny world" in out
    short = vd.judge(bad[:4], window=3, tiny=True)
    assert not short["judged"] and "4 PPO steps are too few to judge (needs >= 6)" in short["not_judged"]


def test_record_adds_the_result_to_the_results_file(tmp_path):
    f = tmp_path / "ppo_results.json"
    f.write_text(json.dumps({"ppo/steps": 6}))
    vd.record(f, vd.judge(_steps([0.5] * 6, std=0.1), window=3, tiny=True))
    data = json.loads(f.read_text())
    assert data["ppo/steps"] == 6 and data["verdict_of_run"]["passed"] is False
    assert [p.name for p in tmp_path.iterdir()] == ["ppo_results.json"]   # no temporary file left


def test_dschat_steps_from_tensorboard(tmp_path):
    from torch.utils.tensorboard import SummaryWriter
    w = SummaryWriter(str(tmp_path))
    for step, (reward, kl, length, fluency) in enumerate([(-3.0, 0.0, 16, 1.0), (4.0, 6.0, 12, 0.9)]):
        for tag, value in (("ppo/reward_mean", reward), ("ppo/kl", kl), ("ppo/response_length", length),
                           ("ppo/fluency", fluency)):
            w.add_scalar(tag, value, step)
    w.close()
    steps = vd.dschat_steps(tmp_path)
    assert [s["reward_mean"] for s in steps] == [-3.0, 4.0]
    assert steps[1]["kl_per_token"] == pytest.approx(0.5) and steps[1]["fluency"] == pytest.approx(0.9)
    assert steps[0]["kl_per_token"] == 0.0 and steps[0].get("reward_std") is None


def test_dschat_steps_name_missing_scalars(tmp_path):
    from torch.utils.tensorboard import SummaryWriter
    w = SummaryWriter(str(tmp_path))
    w.add_scalar("ppo/reward_mean", 1.0, 0)
    w.close()
    with pytest.raises(ValueError, match="no ppo/kl, ppo/response_length, ppo/fluency scalars"):
        vd.dschat_steps(tmp_path)


@pytest.mark.parametrize("settings, judged", [({"model": "", "rm": "", "data": ""}, True),
                                              ({"model": "", "rm": "runs/rm-bloom-x", "data": ""}, False)])
def test_trlx_run_folder_is_judged_only_for_the_tiny_default(tmp_path, capsys, settings, judged):
    (tmp_path / "config.json").write_text(json.dumps({"ppo": {**settings, "summary_window": 3}}))
    (tmp_path / "metrics.json").write_text(json.dumps({"steps": _steps([0.5] * 6, std=0.1, kl=0.9),
                                                       "summary_window": 3}))
    assert vd.judge_trlx_run(tmp_path, "ppo-bloom") == (1 if judged else 0)
    out, err = capsys.readouterr()
    assert ("FAIL: ppo-bloom: the mean reward did not clearly rise" in err) == judged
    assert ("note: not judged" in out) == (not judged)
    assert json.loads((tmp_path / "metrics.json").read_text())["verdict_of_run"]["judged"] == judged


def test_a_run_shorter_than_the_tiny_default_is_measured_not_judged():
    bad = _steps([0.5] * 6, std=0.1, kl=0.9)                        # flat reward, KL past the bound
    short = vd.judge(bad, window=3, tiny=True, full_length=40)
    assert not short["judged"] and "shorter than the tiny default's 40" in short["not_judged"]
    assert short["would_fail"] and short["failed"] == []
    full = vd.judge(bad, window=3, tiny=True, full_length=6)
    assert full["judged"] and full["failed"]
