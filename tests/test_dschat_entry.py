"""Entry modules of `make rm-llama2` / `make ppo-llama2`: arguments, validation, CPU refusals, recipes and the
launch command. None of these needs the upstream work tree or trains anything."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_overlay import PROJECT_ROOT

from rlhf_overlay.dschat_jobs import ppo as dschat_ppo

from rlhf_overlay.dschat_jobs import reward_model as rm
from rlhf_overlay.dschat_jobs.reward_model import ConfigError
from helpers import (DSCHAT_BAD_SETTINGS, GOOD, assert_dschat_keeps_a_non_empty_output, fake_model, heavy_imports,
                     module_help, write_jsonl)


@pytest.mark.parametrize("module", ["rlhf_overlay.dschat_jobs.reward_model", "rlhf_overlay.dschat_jobs.ppo"])
def test_help_is_instant_and_shows_paste_able_commands(module):
    out = module_help(module)
    assert "make " in out and "HOSTFILE=" in out and "--zero-stage" in out
    assert heavy_imports(module) == []   # heavy imports stay inside main()


@pytest.mark.parametrize("kwargs, match", [
    *DSCHAT_BAD_SETTINGS,
    (dict(data_split="6,2"), r"data_split='6,2': give three non-negative shares"),
    (dict(hostfile="/nonexistent/hostfile"), r"hostfile='/nonexistent/hostfile': no such file"),
    (dict(model="/nonexistent/llama"), r"model='/nonexistent/llama': no such model folder"),
    (dict(data="/nonexistent/prefs.jsonl"), r"data='/nonexistent/prefs.jsonl': no such file or folder"),
])
def test_reward_model_config_errors_name_field_and_value(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        rm.RewardModelConfig(**kwargs).validate()


def test_model_folder_without_config_is_refused(tmp_path):
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        rm.RewardModelConfig(model=str(tmp_path / "empty-model")).validate()


def test_hub_ids_are_not_checked_locally():
    rm.RewardModelConfig(model="meta-llama/Llama-2-7b-hf", data="Dahoas/rm-static").validate()


def test_ppo_needs_a_critic_for_a_user_actor(tmp_path):
    actor = fake_model(tmp_path / "sft")
    with pytest.raises(ConfigError, match=r"critic is empty but actor=.*make rm-llama2 MODEL="):
        dschat_ppo.PPOConfig(actor=str(actor)).validate()


def test_critic_must_be_a_step2_output(tmp_path):
    base = fake_model(tmp_path / "base")          # config.json but no pytorch_model.bin
    with pytest.raises(ConfigError, match="must be a reward model saved by `make rm-llama2`"):
        dschat_ppo.PPOConfig(critic=str(base)).validate()
    run = tmp_path / "rm-run"
    fake_model(run / "model", reward_model=True)   # an rm-llama2 run folder: the model is in model/
    assert dschat_ppo.resolve_critic(str(run)) == (run / "model").resolve()
    assert dschat_ppo.resolve_critic(str(run / "model")) == (run / "model").resolve()


def test_cpu_refuses_fp16_and_hybrid_engine_and_keeps_zero3():
    match = "fp16 training is not supported on CPU"
    with pytest.raises(ConfigError, match=match):
        rm.resolve(rm.RewardModelConfig(dtype="fp16"), cuda=False)
    with pytest.raises(ConfigError, match=match):
        dschat_ppo.resolve(dschat_ppo.PPOConfig(dtype="fp16"), cuda=False)
    with pytest.raises(ConfigError, match="hybrid engine needs a GPU"):
        dschat_ppo.resolve(dschat_ppo.PPOConfig(hybrid_engine=True), cuda=False)
    # ZeRO-3 runs on CPU ranks (tests/test_dschat_zero3.py)
    assert rm.resolve(rm.RewardModelConfig(zero_stage=3), cuda=False)["zero_stage"] == 3
    assert dschat_ppo.resolve(dschat_ppo.PPOConfig(zero_stage=3), cuda=False)["zero_stage"] == 3


def test_cpu_refuses_hybrid_engine():
    with pytest.raises(ConfigError, match="hybrid engine needs a GPU"):
        dschat_ppo.resolve(dschat_ppo.PPOConfig(hybrid_engine=True), cuda=False)


def test_gpu_recipe_is_upstreams_llama2_7b_with_padding_fixed():
    r = dschat_ppo.resolve(dschat_ppo.PPOConfig(actor="meta-llama/Llama-2-7b-hf", critic="org/rm"), cuda=True)
    assert (r["recipe"], r["zero_stage"], r["hybrid_engine"], r["lora_dim"], r["dtype"]) == ("llama2-7b", 3, True, 64,
                                                                                             "fp16")
    args = dschat_ppo.main_py_args(r, "meta-llama/Llama-2-7b-hf", "org/rm", r["data"], Path("/out"), "/tmp/d",
                                   Path("/out/tb"))
    flat = " ".join(args)
    assert "--num_padding_at_beginning 0" in flat      # upstream's llama2 script passed OPT's 1
    assert "--enable_hybrid_engine" in args and "--offload_reference_model" in args
    assert "--actor_zero_stage 3 --critic_zero_stage 3" in flat
    assert "--actor_lora_dim 64 --critic_lora_dim 64" in flat and "--data_path Dahoas/rm-static" in flat
    assert "--data_split 2,4,4" in flat and "--max_answer_seq_len 256 --max_prompt_seq_len 256" in flat

    r = rm.resolve(rm.RewardModelConfig(model="meta-llama/Llama-2-7b-hf"), cuda=True)
    flat = " ".join(rm.main_py_args(r, "m", r["data"], Path("/o"), "/tmp/d", Path("/o/tb")))
    assert "--zero_stage 3" in flat and "--offload" in flat and "--gradient_checkpointing" in flat
    assert "--learning_rate 9.65e-06" in flat and "--weight_decay 0.1" in flat and "--lora_dim" not in flat
    r = rm.resolve(rm.RewardModelConfig(model="meta-llama/Llama-2-7b-hf", lora_dim=128), cuda=True)
    assert "--lora_dim 128 --lora_module_name layers." in " ".join(
        rm.main_py_args(r, "m", "d", Path("/o"), "/tmp/d", Path("/o/tb")))


def test_gpu_recipe_on_cpu_drops_what_cpu_cannot_run():
    r = dschat_ppo.resolve(dschat_ppo.PPOConfig(actor="meta-llama/Llama-2-7b-hf", critic="org/rm"), cuda=False)
    assert (r["zero_stage"], r["hybrid_engine"], r["offload_reference_model"], r["dtype"]) == (0, False, False, "fp32")
    r = rm.resolve(rm.RewardModelConfig(model="meta-llama/Llama-2-7b-hf", zero_stage=2), cuda=False)
    assert (r["zero_stage"], r["offload"], r["num_gpus"]) == (2, False, 1)


def test_tiny_recipe_trains_lora_only_with_checkpointing(tmp_path):
    r = dschat_ppo.resolve(dschat_ppo.PPOConfig(), cuda=False)
    args = dschat_ppo.main_py_args(r, "a", "c", "d", tmp_path, "/tmp/d", tmp_path / "tb")
    for flag in ("--only_optimize_lora", "--critic_gradient_checkpointing", "--actor_gradient_checkpointing"):
        assert flag in args
    assert r["zero_stage"] == 0 and r["dtype"] == "fp32" and r["max_steps"] > 0


def test_local_data_gets_the_whole_file_for_its_phase(tmp_path):
    data = write_jsonl(tmp_path / "prefs" / "train.jsonl", [GOOD])
    assert rm.resolve(rm.RewardModelConfig(data=str(data.parent)), cuda=False)["data_split"] == "0,1,0"
    assert rm.resolve(rm.RewardModelConfig(data=str(data.parent), data_split="6,2,2"),
                      cuda=False)["data_split"] == "6,2,2"
    assert dschat_ppo.resolve(dschat_ppo.PPOConfig(data=str(data)), cuda=False)["data_split"] == "0,0,1"
    assert rm.local_data_files(str(data.parent)) == {"train": data.resolve(), "eval": data.resolve()}


def test_launcher_command_for_several_nodes(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=8\nnode2 slots=8\n")
    cmd = rm.launcher_prefix(8, str(hostfile), 29500)
    assert cmd[1:] == ["-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--num_gpus", "8",
                       "--master_port", "29500"]
    env = rm.launch_env(cpu=False, offline=False, run_dir=tmp_path, hostfile=str(hostfile))
    # the launcher forwards only PYTHON*/NCCL* variables to other nodes by itself: the rest goes in DS_ENV_FILE
    env_file = Path(env["DS_ENV_FILE"])
    assert env_file.parent == tmp_path and "TORCH_EXTENSIONS_DIR=" in env_file.read_text()
    assert "DeepSpeed-Chat" in env["PYTHONPATH"]


def test_bad_row_fails_before_launch_with_file_and_line(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "prefs.jsonl", [GOOD, GOOD, {"prompt": "Human: x Assistant:", "chosen": "ok"}])
    model = fake_model(tmp_path / "model")
    rc = rm.main(["--model", str(model), "--data", str(bad), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{bad}:3" in err, err
    assert not (tmp_path / "out").exists()     # nothing was created for a run that could not start


def test_non_empty_output_is_kept_without_overwrite(tmp_path, capsys):
    assert_dschat_keeps_a_non_empty_output(rm.main, tmp_path, capsys)


@pytest.mark.parametrize("script", ["rm_llama2.sh", "ppo_llama2.sh"])
def test_training_scripts_parse_and_pass_make_variables(script, tmp_path):
    path = PROJECT_ROOT / "training_scripts" / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    env = {"PATH": "/usr/bin:/bin", "LORA_DIM": "-1", "OUTPUT": str(tmp_path / "out"), "HOME": str(tmp_path),
           "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(path)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "lora_dim=-1" in out.stderr, out.stderr
    assert not (tmp_path / "out").exists()


def test_configs_round_trip_through_their_command_line(tmp_path):
    """command.txt of a run started from Python (e.g. the tiny RM inside ppo-llama2) must reproduce it."""
    cfg = rm.RewardModelConfig(model="meta-llama/Llama-2-7b-hf", lora_dim=128, overwrite=True, learning_rate=1e-5,
                               extra=["--eval_interval", "50"])
    parsed = rm.config_from_args(rm.build_parser().parse_args(cfg.to_argv()))
    assert parsed == cfg
    ppo = dschat_ppo.PPOConfig(critic="runs/rm", hybrid_engine=False, max_steps=0, dtype="bf16")
    argv = rm.config_to_argv(ppo)
    assert "--no-hybrid-engine" in argv and dschat_ppo.config_from_args(dschat_ppo.build_parser().parse_args(argv)) == ppo
