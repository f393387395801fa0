"""rlhf_overlay.tools.seed_launch without launching anything: the launcher's `--local_rank`, the make variables as flags,
and what of a DeepSpeed config is changed (and said) so that this machine runs it. The commands themselves run in
tests/test_seed_commands.py."""
from __future__ import annotations

import json
import os

import pytest

from rlhf_overlay.tools import seed_launch as sl
from rlhf_overlay.errors import UserError

# the seed's ds_config_trlx_gptj_summarize.json as Pai-Megatron-Patch ships it (before our overlay's fixes)
SEED_PPO_JSON = {
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "fp16": {"enabled": True, "min_loss_scale": 0.5, "fp16_scale_tolerance": 0.25, "opt_level": "02"},
    "zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "cpu"},
                          "allgather_partitions": True, "contiguous_gradients": True},
}


def test_local_rank_flag_is_taken_from_the_arguments(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert sl.take_local_rank(["--local_rank=1", "--steps", "3"]) == (["--steps", "3"], "1")
    assert sl.take_local_rank(["--local_rank", "0", "--x"]) == (["--x"], "0")
    assert sl.take_local_rank(["--x"]) == (["--x"], None)
    assert "LOCAL_RANK" not in os.environ, "splitting arguments leaves the process environment alone"
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RLHF_OVERLAY_WORKER", "1")
    assert not sl.under_launcher(), "a worker the entry module started itself is not a seed rank"


def test_make_variables_become_flags_and_launch_shape_only_without_a_launcher(monkeypatch):
    for k, v in {"MODEL": "/m", "DATA": "/d", "OUTPUT": "/o", "OVERWRITE": "1", "RM": "/rm", "REWARD": "model",
                 "NUM_GPUS": "2", "ZERO_STAGE": "2"}.items():
        monkeypatch.setenv(k, v)
    ppo = sl.env_flags(sl.SEEDS["ppo-smoke-test"], launched=True)
    assert ppo == ["--model", "/m", "--data", "/d", "--output", "/o", "--overwrite", "--rm", "/rm", "--reward", "model"]
    rm = sl.env_flags(sl.SEEDS["rm-bloom"], launched=False)
    assert "--rm" not in rm and rm[-4:] == ["--zero-stage", "2", "--num-processes", "2"]
    assert sl.flag_value(["--model", "a", "--model=b"], "--model") == "b"


def test_seed_ppo_json_on_cpu_keeps_zero2_and_says_every_change():
    ds, notes = sl.adapt_ds_config(SEED_PPO_JSON, cuda=False, source="seed.json")
    assert ds["zero_optimization"]["stage"] == 2 and "offload_optimizer" not in ds["zero_optimization"]
    assert ds["fp16"] == {"enabled": False, "min_loss_scale": 1}
    assert SEED_PPO_JSON["fp16"]["enabled"] is True, "the caller's dict is not changed"
    text = "\n".join(notes)
    for what in ("opt_level", "fp16_scale_tolerance", "min_loss_scale 0.5 -> 1", "fp16 off", "offload_optimizer",
                 "offload_param"):
        assert what in text, what
    assert len(notes) == 6


def test_on_gpu_only_what_deepspeed_rejects_changes():
    ds, notes = sl.adapt_ds_config(SEED_PPO_JSON, cuda=True, source="seed.json")
    assert ds["fp16"]["enabled"] is True and ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert len(notes) == 3 and all("DeepSpeed 0.19" in n for n in notes)
    ds3, notes3 = sl.adapt_ds_config({"zero_optimization": {"stage": 3}}, cuda=True, source="x")
    assert ds3["zero_optimization"]["stage"] == 3 and not notes3


def test_numbers_contradicting_the_run_become_auto():
    ds, notes = sl.adapt_ds_config({"train_batch_size": 32, "optimizer": {"params": {"lr": 1e-5}},
                                    "gradient_accumulation_steps": 1}, cuda=True, source="gptj.json",
                                   run={"train_batch_size": (16, "--batch-size"), "optimizer.params.lr": (1e-3, "--lr"),
                                        "gradient_accumulation_steps": (1, "--grad-accum")})
    assert ds == {"train_batch_size": "auto", "optimizer": {"params": {"lr": "auto"}}, "gradient_accumulation_steps": 1}
    assert len(notes) == 2 and "train_batch_size 32 -> auto (= 16" in notes[0]


def test_accelerate_settings(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for k in list(sl.os.environ):
        if k.startswith("ACCELERATE_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    env, notes = sl.accelerate_ds_settings(cuda=False)
    assert env == {"ACCELERATE_MIXED_PRECISION": "no"} and len(notes) == 1
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "configs/ds.json")
    with pytest.raises(UserError, match="does not exist"):
        sl.accelerate_ds_settings(cuda=False)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "ds.json").write_text(json.dumps(SEED_PPO_JSON))
    env, notes = sl.accelerate_ds_settings(cuda=False)
    assert env["deepspeed_config"]["fp16"]["enabled"] is False and len(notes) == 7
