"""make eval-rm: tells a trained reward model from an untrained one, for DeepSpeed-Chat critics (rebuilt here in
their on-disk format, trained with a few pairwise steps) and trlx value-head RMs; clear errors for bad input."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from rlhf_overlay import PROJECT_ROOT

from rlhf_overlay.tools import eval_rm
from rlhf_overlay.data.preference_data import load_preference_rows

pytestmark = pytest.mark.slow


def _dschat_critic(tiny_assets, out, train_steps: int):
    """A folder in DeepSpeed-Chat's critic format (rwtransformer.* + v_head.weight in pytorch_model.bin), its
    trunk and head trained for `train_steps` pairwise steps as DeepSpeed-Chat's step 2 scores them."""
    from transformers import AutoModel, AutoTokenizer

    src = tiny_assets / "models" / "tiny-llama"
    torch.manual_seed(0)
    trunk = AutoModel.from_pretrained(src)
    tok = AutoTokenizer.from_pretrained(src)
    tok.pad_token = tok.eos_token
    v_head = torch.nn.Linear(trunk.config.hidden_size, 1, bias=False)
    rows = load_preference_rows(tiny_assets / "data" / "preference" / "train.jsonl")
    opt = torch.optim.Adam(list(trunk.parameters()) + list(v_head.parameters()), lr=2e-3)

    def scores(texts):
        b = tok([t + tok.eos_token for t in texts], max_length=48, padding="max_length", truncation=True,
                return_tensors="pt")
        values = v_head(trunk(**b)[0]).squeeze(-1)
        ends = [(ids == tok.pad_token_id).nonzero().flatten()[0].item() - 1 for ids in b["input_ids"]]
        return values[torch.arange(len(texts)), torch.tensor(ends)]

    for step in range(train_steps):
        batch = rows[step * 16:(step + 1) * 16]
        c = scores([r["prompt"] + r["chosen"] for r in batch])
        r_ = scores([r["prompt"] + r["rejected"] for r in batch])
        loss = -torch.nn.functional.logsigmoid(c - r_).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out.mkdir(parents=True)
    state = {f"rwtransformer.{k}": v for k, v in trunk.state_dict().items()}
    state["v_head.weight"] = v_head.weight.detach()
    torch.save(state, out / "pytorch_model.bin")
    trunk.config.to_json_file(out / "config.json")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def critics(tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("critics")
    return {"untrained": _dschat_critic(tiny_assets, root / "untrained", 0),
            "trained": _dschat_critic(tiny_assets, root / "trained", 60)}


def test_trained_dschat_critic_beats_untrained(critics, tmp_path):
    acc = {}
    for name, folder in critics.items():
        metrics, run_dir = eval_rm.evaluate(eval_rm.EvalConfig(rm=str(folder), output=str(tmp_path / name),
                                                               limit=200))
        assert metrics["rm_kind"] == "dschat-critic" and metrics["pairs"] == 200
        acc[name] = metrics["accuracy"]
        saved = json.loads((run_dir / "metrics.json").read_text())
        assert saved["accuracy"] == metrics["accuracy"]
        assert len((run_dir / "scores.jsonl").read_text().splitlines()) == 200
        img = np.asarray(Image.open(run_dir / "score_hist.png").convert("L"), dtype=float)
        assert img.shape == (320, 560) and img.std() > 10
    assert acc["trained"] > 0.8, acc
    assert abs(acc["untrained"] - 0.5) < 0.2, acc
    assert acc["trained"] - acc["untrained"] > 0.25, acc


def test_make_eval_rm_through_the_script(critics, tmp_path):
    env = dict(os.environ, RM=str(critics["trained"]), OUTPUT=str(tmp_path / "ev"))
    res = subprocess.run(["make", "-s", "eval-rm"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "accuracy" in res.stdout and (tmp_path / "ev" / "metrics.json").exists()


def test_bad_inputs_fail_clearly(critics, tmp_path, capsys):
    assert eval_rm.main([]) == 2
    assert "pass RM=" in capsys.readouterr().err
    assert eval_rm.main(["--rm", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert eval_rm.main(["--rm", str(tmp_path / "empty"), "--output", str(tmp_path / "o1")]) == 2
    assert "neither a DeepSpeed-Chat critic" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    assert eval_rm.main(["--rm", str(critics["trained"]), "--data", str(bad), "--output", str(tmp_path / "o2")]) == 2
    assert f"{bad}:2" in capsys.readouterr().err
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    torch.save({"transformer.wte.weight": torch.zeros(2, 2)}, wrong / "pytorch_model.bin")
    (wrong / "config.json").write_text((critics["trained"] / "config.json").read_text())
    assert eval_rm.main(["--rm", str(wrong), "--output", str(tmp_path / "o3")]) == 2
    assert "is not a DeepSpeed-Chat reward model" in capsys.readouterr().err


def test_trained_trlx_value_head_rm_beats_untrained(tiny_assets, tmp_path):
    """The trlx path's value-head RMs: 40 training steps (seconds on the tiny BLOOM) vs the same model untrained."""
    from rlhf_overlay.trlx_jobs import reward_model as trm
    from rlhf_overlay.trlx_jobs import value_head
    assert trm.main(["--arch", "bloom", "--max-steps", "40", "--output", str(tmp_path / "trained")]) == 0
    trained = tmp_path / "trained" / "reward_model"
    model, tok = value_head.new_reward_model(str(tiny_assets / "models" / "tiny-bloom"))
    meta = json.loads((trained / value_head.META_FILE).read_text())
    meta.pop("eval_accuracy", None)
    value_head.save_reward_model(model, tok, tmp_path / "untrained", meta)
    acc = {}
    for name, folder in (("trained", trained), ("untrained", tmp_path / "untrained")):
        metrics, _ = eval_rm.evaluate(eval_rm.EvalConfig(rm=str(folder), output=str(tmp_path / f"ev-{name}"),
                                                         limit=200))
        assert metrics["rm_kind"] == "trlx-value-head"
        acc[name] = metrics["accuracy"]
    assert acc["trained"] > 0.8 and abs(acc["untrained"] - 0.5) < 0.2 and acc["trained"] - acc["untrained"] > 0.25, acc
