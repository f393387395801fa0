"""trlx PPO at DeepSpeed ZeRO-3 on 2 CPU ranks (ZERO_STAGE=3: configs/accelerate/zero3.yaml; issue 14), and at
ZeRO-2 with the optimizer offloaded to the CPU (the seed's DeepSpeed JSONs offload; DeepSpeedCPUAdam then steps).

Both reference models trlx has: the hydra branch (num_layers_unfrozen > 0: frozen copies of the top blocks inside
the prepared policy) and the separate full copy (num_layers_unfrozen -1: built after accelerator.prepare, so under
ZeRO-3 inside deepspeed.zero.Init; trlx patch 0014 runs it in a DeepSpeed engine). Each run must score step 1 at
KL exactly 0 (the reference is the policy's starting point), generate with synced_gpus on both ranks, export a whole
policy (gathered: zero3_save_16bit_model) and RANK_REPORT must show the parameters partitioned (each rank about half).
The trlx reward models stay refused at ZeRO-3 on CPU (trlx_jobs/common.py says why).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_overlay import PROJECT_ROOT
from rlhf_overlay.runtime import rank_report

pytestmark = [pytest.mark.upstream, pytest.mark.slow]


@pytest.mark.parametrize("stage,unfrozen", [(3, "-1"), (3, "2"), (2, "-1")],
                         ids=["zero3-full-reference", "zero3-hydra-2", "zero2-offload"])
def test_trlx_ppo_deepspeed_two_cpu_ranks(trlx_dir, tiny_assets, tmp_path, stage, unfrozen):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    if stage == 3:
        launch = ["--zero-stage", "3"]
        config = str(PROJECT_ROOT / "configs" / "accelerate" / "zero3.yaml")
    else:   # our ZeRO-2 config with the optimizer offloaded, as the seed's JSONs do
        config = str(tmp_path / "zero2-offload.yaml")
        text = (PROJECT_ROOT / "configs" / "accelerate" / "zero2.yaml").read_text()
        assert "offload_optimizer_device: none" in text
        (tmp_path / "zero2-offload.yaml").write_text(text.replace("offload_optimizer_device: none",
                                                                  "offload_optimizer_device: cpu"))
        launch = ["--accelerate-config", config]
    env = {k: v for k, v in os.environ.items() if k not in (rank_report.ENV, "OUTPUT", "ZERO_STAGE")}
    env.update(OMP_NUM_THREADS="1", RANK_REPORT="1")
    cmd = [sys.executable, "-m", "rlhf_overlay.trlx_jobs.smoke_test", *launch, "--num-processes", "2",
           "--steps", "3", "--num-layers-unfrozen", unfrozen, "--output", str(out)]
    res = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert (out / "metrics.json").is_file(), res.stdout[-4000:] + res.stderr[-4000:]
    assert json.loads((out / "status.json").read_text())["state"] == "completed", res.stdout[-3000:]
    recorded = json.loads((out / "config.json").read_text())["launch"]["accelerate_config"]
    assert Path(recorded).resolve() == Path(config).resolve(), recorded
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    assert len(steps) == 3 and steps[0]["kl_per_token"] < 1e-6 and abs(steps[0]["kl"]) < 1e-6, steps[0]
    for r in rank_report.load(out / "ranks", "ppo"):
        f = r["optimizers"]["policy"]
        assert r["world_size"] == 2 and f["zero_stage"] == stage, f
        if stage == 3:
            full = f["zero3_param_numel"]
            assert abs(f["zero3_param_partition_numel"] - full / 2) <= 0.02 * full, f   # each rank about half
        else:   # trlx's torch AdamW became DeepSpeed's CPU Adam, each rank stepping half of the moments
            assert "DeepSpeedCPUAdam" in f["optimizer_classes"], f
            half = f["trainable_numel"] / 2
            assert abs(f["optimizer_state_numel"]["exp_avg"] - half) <= 0.02 * half, f
    # the exported policy: every weight found under its plain name (none left at random init), whole (gathered from
    # both ranks, not one rank's shard or placeholder), and trained
    model, info = AutoModelForCausalLM.from_pretrained(out / "policy", output_loading_info=True)
    assert not any(info.values()), info
    policy = model.state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_assets / "models" / "tiny-bloom").state_dict()
    assert {k: v.shape for k, v in policy.items()} == {k: v.shape for k, v in base.items()}
    assert any(not policy[k].equal(base[k]) for k in base)
