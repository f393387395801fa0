"""Several ranks (issue 7), the parts that need no upstream: early refusals of setups that cannot run (more ranks
than GPUs, ZeRO-3 / hybrid engine on CPU), the world-size guard and the per-rank report (RANK_REPORT=1).
The 2-rank training runs are in tests/test_scaleout_runs.py."""
from __future__ import annotations

import json

import pytest

from rlhf_overlay.dschat_jobs import ppo as dschat_ppo

from rlhf_overlay.dschat_jobs import reward_model as dschat_reward_model

from rlhf_overlay.runtime import rank_report

from rlhf_overlay.runtime import runs
from rlhf_overlay.trlx_jobs import ppo
from rlhf_overlay.trlx_jobs import reward_model as trlx_reward_model
from rlhf_overlay.dschat_jobs.launch import ConfigError as DSChatConfigError
from rlhf_overlay.trlx_jobs.common import ConfigError as TrlxConfigError
from rlhf_overlay.trlx_jobs.common import check_world_size, deepspeed_cpu_problem


# ------------------------------------------------------------------------------------------- rank counts
def test_more_ranks_than_gpus_is_refused_with_the_numbers(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    msg = runs.rank_count_problem(4, cuda=True, gpus=2)
    assert "NUM_GPUS=4" in msg and "2 visible GPU(s)" in msg and "CUDA_VISIBLE_DEVICES=0,1" in msg
    assert "HOSTFILE" in msg
    assert runs.rank_count_problem(2, cuda=True, gpus=2) is None
    assert runs.rank_count_problem(8, cuda=False) is None        # CPU: ranks are processes, may share cores
    assert runs.rank_count_problem(None, cuda=True, gpus=0) is None
    assert "must be >= 1" in runs.rank_count_problem(0, cuda=False)


def test_dschat_targets_refuse_num_gpus_beyond_the_machine(monkeypatch):
    monkeypatch.setattr(runs, "gpu_count", lambda: 2)
    with pytest.raises(DSChatConfigError, match=r"num_gpus \(NUM_GPUS\)=8: this machine has 2 visible GPU"):
        dschat_reward_model.resolve(dschat_reward_model.RewardModelConfig(num_gpus=8), cuda=True)
    with pytest.raises(DSChatConfigError, match="NUM_GPUS"):
        dschat_ppo.resolve(dschat_ppo.PPOConfig(num_gpus=3), cuda=True)
    assert dschat_reward_model.resolve(dschat_reward_model.RewardModelConfig(num_gpus=2), cuda=True)["num_gpus"] == 2
    assert dschat_reward_model.resolve(dschat_reward_model.RewardModelConfig(num_gpus=2), cuda=False)["num_gpus"] == 2


def test_trlx_targets_refuse_num_gpus_beyond_the_machine(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(runs, "has_cuda", lambda: True)
    monkeypatch.setattr(runs, "gpu_count", lambda: 1)
    out = tmp_path / "rm"
    rc = trlx_reward_model.main(["--arch", "bloom", "--num-processes", "4", "--output", str(out)])
    assert rc == 2 and "num_processes (NUM_GPUS)=4: this machine has 1 visible GPU" in capsys.readouterr().err
    assert not out.exists()                                       # refused before a run folder was made


# ------------------------------------------------------------------------------------ ZeRO-3 / hybrid on CPU
def test_deepspeed_settings_that_fail_on_cpu():
    assert "ZeRO stage 3 fails on CPU" in deepspeed_cpu_problem({"zero_optimization": {"stage": 3}}, "x")
    assert "ZeRO stage 3" in deepspeed_cpu_problem({"zero_stage": 3}, "accelerate")        # accelerate's key
    assert "hybrid engine" in deepspeed_cpu_problem({"hybrid_engine": {"enabled": True}}, "x")
    assert deepspeed_cpu_problem({"zero_optimization": {"stage": 2}}, "x") is None
    assert deepspeed_cpu_problem({"zero_stage": 3}, "x", zero3=True) is None          # trlx PPO runs ZeRO-3 on CPU
    assert deepspeed_cpu_problem({}, "x") is None


def test_trlx_ppo_runs_zero3_on_cpu_also_from_a_user_accelerate_config(tmp_path):
    # tests/test_trlx_zero3.py runs it; ZeRO-1 has no config of ours and is refused
    run = tmp_path / "run"
    _, launch = ppo.plan_launch(ppo.PPORunConfig(reward="rule", zero_stage=3).resolve(), run, cuda=False, gpu_count=0)
    assert launch["accelerate_config"].endswith("configs/accelerate/zero3.yaml"), launch
    user = tmp_path / "mine.yaml"
    user.write_text("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 3\nnum_processes: 2\n")
    _, launch = ppo.plan_launch(ppo.PPORunConfig(reward="rule", accelerate_config=str(user)).resolve(), run,
                                cuda=False, gpu_count=0)
    assert launch["accelerate_config"] == str(user)
    with pytest.raises(TrlxConfigError, match="our accelerate configs are ZeRO-2 and ZeRO-3"):
        ppo.plan_launch(ppo.PPORunConfig(reward="rule", zero_stage=1).resolve(), run, cuda=False, gpu_count=0)


def test_trlx_reward_model_refuses_a_zero3_deepspeed_json_on_cpu(tmp_path, capsys):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}))
    out = tmp_path / "rm"
    rc = trlx_reward_model.main(["--arch", "bloom", "--deepspeed", str(ds), "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and f"deepspeed={ds}: ZeRO stage 3 fails on CPU" in err
    assert not out.exists()


# ------------------------------------------------------------------------------------------ world size guard
def test_world_size_guard(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"accelerate sees 1 process\(es\) but the launcher started 2"):
        check_world_size(1)
    check_world_size(2)
    monkeypatch.delenv("WORLD_SIZE")
    check_world_size(1)


# --------------------------------------------------------------------------------------------- rank report
def test_sample_digest_ignores_padding_on_either_side():
    d = rank_report.sample_digest([5, 6, 7])
    assert rank_report.sample_digest([0, 0, 5, 6, 7], pad_id=0) == d
    assert rank_report.sample_digest([5, 6, 7, 0], pad_id=0) == d
    assert rank_report.sample_digest([5, 7, 6]) != d


def test_rank_report_is_off_unless_asked(monkeypatch, tmp_path):
    monkeypatch.delenv(rank_report.ENV, raising=False)
    r = rank_report.RankReport("rm")
    r.add_samples([[1, 2]])
    assert not r.enabled and r.write() is None and r.samples == []


def test_rank_report_records_samples_and_optimizer_state(monkeypatch, tmp_path):
    import torch

    monkeypatch.setenv(rank_report.ENV, str(tmp_path / "ranks"))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = torch.nn.Linear(4, 3)                      # 15 parameters
    model.bias.requires_grad_(False)                   # 12 trainable
    opt = torch.optim.Adam([model.weight], lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    r = rank_report.RankReport("rm")
    r.add_samples(torch.tensor([[3, 4, 0], [5, 0, 0]]), pad_id=0)
    r.add_sample_ids([7, 9])
    r.add_optimizer("rm", opt, model=model)
    path = r.write()
    assert path == tmp_path / "ranks" / "rm-rank1.json"
    [data] = rank_report.load(tmp_path / "ranks", "rm")
    assert data["rank"] == 1 and data["world_size"] == 2
    assert data["samples"] == [rank_report.sample_digest([3, 4]), rank_report.sample_digest([5]), "row7", "row9"]
    facts = data["optimizers"]["rm"]
    assert facts["trainable_numel"] == 12
    assert facts["optimizer_state_numel"] == {"exp_avg": 12, "exp_avg_sq": 12}


def test_run_folder_turns_on_the_rank_report_for_the_whole_job(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK_REPORT", "1")
    monkeypatch.delenv(rank_report.ENV, raising=False)
    import os

    try:
        outer = runs.prepare_run_dir("ppo", output=str(tmp_path / "ppo"))
        runs.prepare_run_dir("rm", output=str(tmp_path / "ppo" / "reward_model"))  # a run the job starts
        assert os.environ[rank_report.ENV] == str(outer / "ranks")
    finally:
        os.environ.pop(rank_report.ENV, None)


def test_trlx_ppo_refusals_leave_no_run_folder(trlx_dir, tmp_path, capsys):
    out = tmp_path / "ppo"
    assert ppo.main(["--reward", "rule", "--zero-stage", "1", "--output", str(out)]) == 2
    assert "our accelerate configs are ZeRO-2 and ZeRO-3" in capsys.readouterr().err
    assert not out.exists()


def test_hostfile_slots_beyond_this_machines_gpus_are_refused(monkeypatch, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=8\n")
    monkeypatch.setattr(runs, "gpu_count", lambda: 2)
    with pytest.raises(DSChatConfigError, match=r"hosts:1: localhost slots=8 but this machine has 2 visible GPU"):
        dschat_reward_model.resolve(dschat_reward_model.RewardModelConfig(hostfile=str(hosts)), cuda=True)
    # NUM_GPUS given: it decides (and is checked itself); CPU: slots are processes
    assert dschat_reward_model.resolve(dschat_reward_model.RewardModelConfig(hostfile=str(hosts), num_gpus=2),
                                       cuda=True)["num_gpus"] == 2
    assert dschat_reward_model.resolve(dschat_reward_model.RewardModelConfig(hostfile=str(hosts)),
                                       cuda=False)["num_gpus"] is None


def test_trlx_reward_model_checks_hostfile_slots_against_gpus(monkeypatch, tmp_path, capsys):
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=4\n")
    monkeypatch.setattr(runs, "has_cuda", lambda: True)
    monkeypatch.setattr(runs, "gpu_count", lambda: 1)
    out = tmp_path / "rm"
    assert trlx_reward_model.main(["--arch", "bloom", "--hostfile", str(hosts), "--output", str(out)]) == 2
    assert "localhost slots=4 but this machine has 1 visible GPU" in capsys.readouterr().err
    assert not out.exists()
