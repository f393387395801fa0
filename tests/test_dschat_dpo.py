"""`make dpo-llama2`: DeepSpeed-Chat DPO through rlhf_overlay.dschat_jobs.dpo and our step2_dpo_finetuning overlay.

Unit tests (no upstream, nothing trained): arguments, validation, CPU refusals, recipes and the launch command.
Integration tests (`upstream`; the training ones also `slow`): the tiny LLaMA trained for real on CPU once per
module and checked several ways (preference accuracy before/after on held-out pairs, re-measured independently
with plain transformers on the saved model), a LoRA run on a user data folder, and main.py's own refusals.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_overlay import PROJECT_ROOT

from rlhf_overlay.dschat_jobs import dpo as dschat_dpo

from rlhf_overlay.dschat_jobs import launch as dschat_launch
from rlhf_overlay.dschat_jobs.launch import ConfigError
from helpers import (DSCHAT_BAD_SETTINGS, GOOD, assert_dschat_keeps_a_non_empty_output, fake_model, heavy_imports,
                     module_help, tb_scalars, write_jsonl)


def flat(args: list[str]) -> str:
    return " ".join(args)


# ================================================================================================ unit tests
def test_help_is_instant_and_shows_paste_able_commands():
    out = module_help("rlhf_overlay.dschat_jobs.dpo")
    for text in ("make dpo-llama2", "LORA_DIM=", "HOSTFILE=", "MODEL=meta-llama/Llama-2-7b-hf", "--zero-stage",
                 "--beta", "--only-optimize-lora"):
        assert text in out, text
    assert heavy_imports("rlhf_overlay.dschat_jobs.dpo") == []


@pytest.mark.parametrize("kwargs, match", [
    *DSCHAT_BAD_SETTINGS,
    (dict(max_steps=-2), r"max_steps=-2: must be >= 0"),
    (dict(learning_rate=0.0), r"learning_rate=0.0: must be > 0"),
    (dict(lora_learning_rate=-1e-3), r"lora_learning_rate=-0.001: must be > 0"),
    (dict(beta=0.0), r"beta=0.0: must be > 0"),
    (dict(data_split="6,2"), r"data_split='6,2': give three non-negative shares"),
    (dict(hostfile="/nonexistent/hostfile"), r"hostfile='/nonexistent/hostfile': no such file"),
    (dict(master_port=70000), r"master_port=70000: must be a TCP port"),
    (dict(model="/nonexistent/llama-sft"), r"model='/nonexistent/llama-sft': no such model folder"),
    (dict(data="/nonexistent/prefs.jsonl"), r"data='/nonexistent/prefs.jsonl': no such file or folder"),
])
def test_config_errors_name_field_and_value(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        dschat_dpo.DPOConfig(**kwargs).validate()


def test_hub_ids_are_not_checked_locally():
    dschat_dpo.DPOConfig(model="meta-llama/Llama-2-7b-hf", data="Dahoas/rm-static").validate()


def test_cpu_refuses_fp16_and_keeps_zero3():
    with pytest.raises(ConfigError, match="fp16 training is not supported on CPU"):
        dschat_dpo.resolve(dschat_dpo.DPOConfig(dtype="fp16"), cuda=False)
    assert dschat_dpo.resolve(dschat_dpo.DPOConfig(zero_stage=3), cuda=False)["zero_stage"] == 3   # runs on CPU


def test_tiny_recipe_command(tmp_path):
    r = dschat_dpo.resolve(dschat_dpo.DPOConfig(), cuda=False)
    args = dschat_dpo.main_py_args(r, "m", "d", tmp_path / "model", "/tmp/c", tmp_path / "tb")
    s = flat(args)
    for part in ("--model_name_or_path m", "--data_path d", "--data_split 0,1,0", "--dtype fp32", "--zero_stage 0",
                 "--max_steps 60", "--beta 0.1", "--max_seq_len 48", "--eval_interval 20", "--eval_iters 0",
                 f"--output_dir {tmp_path / 'model'}", f"--tensorboard_path {tmp_path / 'tb'}"):
        assert part in s, part
    assert "--lora_dim" not in args and "--offload" not in args and "--deepspeed" in args
    assert r["num_gpus"] == 1

    lora = dschat_dpo.main_py_args(dschat_dpo.resolve(dschat_dpo.DPOConfig(lora_dim=8), cuda=False), "m", "d",
                                   tmp_path, "/tmp/c", tmp_path)
    assert "--lora_dim 8 --lora_module_name layers. --lora_learning_rate 0.01 --only_optimize_lora" in flat(lora)
    both = dschat_dpo.main_py_args(dschat_dpo.resolve(dschat_dpo.DPOConfig(lora_dim=8, only_optimize_lora=False),
                                                      cuda=False), "m", "d", tmp_path, "/tmp/c", tmp_path)
    assert "--lora_dim 8" in flat(both) and "--only_optimize_lora" not in both


def test_gpu_recipe_is_upstreams_run_llama2_7b():
    """The values of step2_dpo_finetuning/training_scripts/llama2/run_llama2_7b.sh (and _lora.sh) at the pin."""
    r = dschat_dpo.resolve(dschat_dpo.DPOConfig(model="meta-llama/Llama-2-7b-hf"), cuda=True)
    args = dschat_dpo.main_py_args(r, "meta-llama/Llama-2-7b-hf", r["data"], Path("/o/model"), "/tmp/d",
                                   Path("/o/tb"))
    s = flat(args)
    for part in ("--data_path Dahoas/rm-static", "--data_split 2,4,4", "--per_device_train_batch_size 8",
                 "--per_device_eval_batch_size 8", "--max_seq_len 512", "--learning_rate 9.65e-06",
                 "--weight_decay 0.1", "--num_train_epochs 1", "--gradient_accumulation_steps 1",
                 "--lr_scheduler_type cosine", "--num_warmup_steps 0", "--seed 1234", "--zero_stage 3",
                 "--dtype fp16", "--beta 0.1"):
        assert part in s, part
    assert "--gradient_checkpointing" in args and "--offload" in args and "--deepspeed" in args
    assert "--lora_dim" not in args and "--max_steps" not in args
    r = dschat_dpo.resolve(dschat_dpo.DPOConfig(model="meta-llama/Llama-2-7b-hf", lora_dim=128), cuda=True)
    lora = dschat_dpo.main_py_args(r, "m", "d", Path("/o"), "/tmp/d", Path("/o/tb"))
    assert "--lora_dim 128 --lora_module_name layers." in flat(lora) and "--only_optimize_lora" not in lora


def test_gpu_recipe_on_cpu_drops_what_cpu_cannot_run():
    r = dschat_dpo.resolve(dschat_dpo.DPOConfig(model="meta-llama/Llama-2-7b-hf"), cuda=False)
    assert (r["zero_stage"], r["offload"], r["dtype"], r["num_gpus"]) == (0, False, "fp32", 1)
    r = dschat_dpo.resolve(dschat_dpo.DPOConfig(model="meta-llama/Llama-2-7b-hf", zero_stage=2, dtype="bf16"),
                           cuda=False)
    assert (r["zero_stage"], r["offload"], r["dtype"]) == (2, False, "bf16")


def test_local_data_gets_the_whole_file_for_this_phase(tmp_path):
    data = write_jsonl(tmp_path / "prefs" / "train.jsonl", [GOOD])
    assert dschat_dpo.resolve(dschat_dpo.DPOConfig(data=str(data.parent)), cuda=False)["data_split"] == "0,1,0"
    assert dschat_dpo.resolve(dschat_dpo.DPOConfig(data=str(data), data_split="6,2,2"),
                              cuda=False)["data_split"] == "6,2,2"


@pytest.mark.parametrize("bad_row", [
    {"prompt": "Human: x Assistant:", "chosen": "ok"},                          # no rejected
    {"prompt": "Human: x Assistant:", "response": "ok", "rejected": "no"},      # wrong field name
    "{not json",
])
def test_bad_row_fails_before_launch_with_file_and_line(tmp_path, capsys, bad_row):
    bad = write_jsonl(tmp_path / "prefs.jsonl", [GOOD, GOOD, bad_row])
    model = fake_model(tmp_path / "model")
    rc = dschat_dpo.main(["--model", str(model), "--data", str(bad), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{bad}:3" in err and err.startswith("error: "), err
    assert not (tmp_path / "out").exists()     # nothing was created for a run that could not start


def test_missing_model_folder_is_named(tmp_path, capsys):
    rc = dschat_dpo.main(["--model", str(tmp_path / "no-such-sft"), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and f"model='{tmp_path / 'no-such-sft'}': no such model folder" in err, err
    (tmp_path / "weights-only").mkdir()
    rc = dschat_dpo.main(["--model", str(tmp_path / "weights-only")])
    assert rc == 2 and "has no config.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_non_empty_output_is_kept_without_overwrite(tmp_path, capsys):
    assert_dschat_keeps_a_non_empty_output(dschat_dpo.main, tmp_path, capsys)


def test_training_script_passes_make_variables(tmp_path):
    path = PROJECT_ROOT / "training_scripts" / "dpo_llama2.sh"
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    base = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": sys.executable, "OUTPUT": str(tmp_path / "out")}

    def run(**env):
        return subprocess.run(["bash", str(path)], capture_output=True, text=True, env=dict(base, **env), timeout=120)

    out = run(MODEL=str(tmp_path / "no-such-sft"))
    assert out.returncode == 2 and f"model='{tmp_path / 'no-such-sft'}'" in out.stderr, out.stderr
    out = run(LORA_DIM="-1")
    assert out.returncode == 2 and "lora_dim=-1" in out.stderr, out.stderr
    out = run(HOSTFILE=str(tmp_path / "hosts"))
    assert out.returncode == 2 and "hostfile=" in out.stderr, out.stderr
    assert not (tmp_path / "out").exists()


def test_config_round_trips_through_its_command_line():
    cfg = dschat_dpo.DPOConfig(model="meta-llama/Llama-2-7b-hf", lora_dim=128, only_optimize_lora=False, beta=0.2,
                               overwrite=True, learning_rate=1e-5, extra=["--label_smoothing", "0.1"])
    assert dschat_dpo.config_from_args(dschat_dpo.build_parser().parse_args(cfg.to_argv())) == cfg
    assert "--no-only-optimize-lora" in cfg.to_argv()


# the launcher command and environment for several nodes (dschat_jobs.launch, shared by the three DeepSpeed-Chat
# jobs): tests/test_dschat_entry.py::test_launcher_command_for_several_nodes


# ================================================================================================ integration
def answer_logps(model, tokenizer, rows: list[dict], batch_size: int = 64):
    """Summed log-probs of each pair's chosen and rejected answer from the first token where they differ, the
    text as DeepSpeed-Chat builds it (prompt + answer + EOS, our data format, since patch 0004); computed with
    plain transformers."""
    import torch
    seqs, starts = [], []
    for row in rows:
        c, r = (tokenizer(row["prompt"] + row[k])["input_ids"] + [tokenizer.eos_token_id]
                for k in ("chosen", "rejected"))
        start = next((i for i, (a, b) in enumerate(zip(c, r)) if a != b), min(len(c), len(r)))
        seqs += [c, r]
        starts += [start, start]
    sums = []
    for i in range(0, len(seqs), batch_size):
        batch, first = seqs[i:i + batch_size], starts[i:i + batch_size]
        width = max(map(len, batch))
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for j, seq in enumerate(batch):
            ids[j, :len(seq)] = torch.tensor(seq)
            mask[j, :len(seq)] = 1
        with torch.no_grad():
            logp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
        token_logps = logp.gather(2, ids[:, 1:].unsqueeze(2)).squeeze(2)
        counted = mask[:, 1:].clone()
        for j, f in enumerate(first):
            counted[j, :max(f - 1, 0)] = 0          # label position f-1 predicts token f, the first differing one
        sums += (token_logps * counted).sum(1).tolist()
    sums = torch.tensor(sums)
    return sums[0::2], sums[1::2]


def failure_log(out: Path) -> str:
    log = out / "training.log"
    return log.read_text()[-4000:] if log.exists() else "no training.log"


@pytest.fixture(scope="module")
def dpo_run(dschat_dir, tiny_assets, tmp_path_factory) -> Path:
    """One `make dpo-llama2` with the defaults: tiny LLaMA, tiny preference data, 60 steps on CPU (~40 s)."""
    out = tmp_path_factory.mktemp("dpo") / "run"
    rc = dschat_dpo.main(["--output", str(out)])
    assert rc == 0, failure_log(out)
    return out


@pytest.mark.upstream
@pytest.mark.slow
def test_dpo_raises_preference_accuracy_on_held_out_pairs(dpo_run, tiny_assets):
    res = json.loads((dpo_run / "model" / "eval_results.json").read_text())
    before, after = res["before"], res["after"]
    eval_rows = (tiny_assets / "data" / "preference" / "eval.jsonl").read_text().splitlines()
    train_rows = set((tiny_assets / "data" / "preference" / "train.jsonl").read_text().splitlines())
    assert before["pairs"] == after["pairs"] == len(eval_rows) == 400
    assert not train_rows & set(eval_rows)                   # held out: no eval pair is a training pair
    # policy = reference before training: every implicit reward is exactly 0, so no pair is "won"
    assert before["acc"] == 0.0 and before["reward_margin"] == 0.0 and abs(before["loss"] - 0.6931) < 1e-3
    assert after["acc"] >= 0.9, res
    # From the pre-trained base (which already gives the chosen answers a high likelihood) DPO pushes the rejected
    # answers down much further than the chosen ones; the chosen implicit reward may dip below 0 too (measured
    # -0.49 vs -2.21): the margin, not the sign of the chosen reward, is what DPO optimises.
    assert after["reward_margin"] > 0.2 and after["chosen_reward"] > after["rejected_reward"] + 0.2, res
    assert after["rejected_reward"] < 0, res
    assert after["loss"] < before["loss"] - 0.2, res
    # the model's own preference (no reference): near chance for the neutral pre-trained tiny LLaMA, then learnt
    assert 0.35 <= before["policy_acc"] <= 0.75 and after["policy_acc"] >= 0.9, res
    assert res["train/steps"] == 60 and res["end_of_conversation_token"] == "</s>"


@pytest.mark.upstream
@pytest.mark.slow
def test_saved_model_loads_and_an_independent_measurement_agrees(dpo_run, tiny_assets):
    """model/ is a plain HF folder; accuracy recomputed outside DeepSpeed with transformers agrees."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    policy = AutoModelForCausalLM.from_pretrained(dpo_run / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(dpo_run / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_assets / "models" / "tiny-llama").eval()
    rows = [json.loads(line) for line in
            (tiny_assets / "data" / "preference" / "eval.jsonl").read_text().splitlines()]
    c_after, r_after = answer_logps(policy, tokenizer, rows)
    c_before, r_before = answer_logps(base, tokenizer, rows)
    res = json.loads((dpo_run / "model" / "eval_results.json").read_text())
    policy_before = (c_before > r_before).float().mean().item()
    policy_after = (c_after > r_after).float().mean().item()
    implicit_acc = ((c_after - c_before) > (r_after - r_before)).float().mean().item()
    assert policy_after >= 0.9 and implicit_acc >= 0.9, (policy_before, policy_after, implicit_acc)
    assert abs(policy_before - res["before"]["policy_acc"]) <= 0.05, (policy_before, res["before"])
    assert abs(implicit_acc - res["after"]["acc"]) <= 0.05, (implicit_acc, res["after"])
    margin = (res["beta"] * ((c_after - c_before) - (r_after - r_before))).mean().item()
    assert abs(margin - res["after"]["reward_margin"]) <= 0.05 * abs(res["after"]["reward_margin"]), margin
    inputs = tokenizer("Human: tell me about the garden. Assistant:", return_tensors="pt")
    with torch.no_grad():
        out = policy.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.upstream
@pytest.mark.slow
def test_tensorboard_has_loss_margins_and_accuracy(dpo_run):
    tb = tb_scalars(dpo_run / "tensorboard")
    for split in ("train", "eval"):
        for key in ("loss", "acc", "reward_margin", "chosen_reward", "rejected_reward"):
            assert tb.get(f"{split}/{key}"), f"{split}/{key} missing; have {sorted(tb)}"
    for tag in ("dpo/loss", "dpo/acc", "dpo/reward_margin", "eval/policy_acc", "train/step_time_s"):
        assert tb.get(tag), f"{tag} missing"
    assert len(tb["train/loss"]) == 60
    assert [step for step, _ in tb["eval/acc"]] == [0, 20, 40, 60]   # before training, then every 20 steps
    assert tb["eval/acc"][0][1] == 0.0 and tb["eval/acc"][-1][1] >= 0.9
    margins = [v for _, v in tb["eval/reward_margin"]]
    assert margins[-1] > margins[1] > margins[0] == 0.0


@pytest.mark.upstream
@pytest.mark.slow
def test_run_folder_records_command_config_and_log(dpo_run):
    assert "-m rlhf_overlay.dschat_jobs.dpo --output" in (dpo_run / "command.txt").read_text()
    config = json.loads((dpo_run / "config.json").read_text())
    assert (config["recipe"], config["dtype"], config["zero_stage"], config["lora_dim"]) == ("tiny", "fp32", 0, 0)
    assert config["launch_cwd"].endswith("training/step2_dpo_finetuning")
    log = (dpo_run / "training.log").read_text()
    assert "deepspeed.launcher.runner" in log and "saving the final model" in log
    assert "end_of_conversation_token='</s>'" in log and "s/step over 59 steps" in log


@pytest.mark.upstream
@pytest.mark.slow
def test_lora_dpo_on_a_user_data_folder(dpo_run, tiny_assets, tmp_path):
    """LORA_DIM=8 (adapters only, with gradient checkpointing) on the user's own train/eval files: the adapters
    are merged into model/ on save, so it loads as a plain model and the merged layers changed."""
    import torch
    data = tmp_path / "prefs"
    for split, n in (("train", 320), ("eval", 100)):
        lines = (tiny_assets / "data" / "preference" / f"{split}.jsonl").read_text().splitlines()[:n]
        write_jsonl(data / f"{split}.jsonl", lines)
    out = tmp_path / "dpo-lora"
    rc = dschat_dpo.main(["--recipe", "tiny", "--model", str(tiny_assets / "models" / "tiny-llama"), "--data",
                          str(data), "--lora-dim", "8", "--max-steps", "30", "--output", str(out), "--",
                          "--gradient_checkpointing"])
    assert rc == 0, failure_log(out)
    res = json.loads((out / "model" / "eval_results.json").read_text())
    assert res["after"]["pairs"] == 100 and res["train/steps"] == 30
    assert res["after"]["acc"] >= 0.8 and res["after"]["policy_acc"] > res["before"]["policy_acc"] + 0.1, res
    state = torch.load(out / "model" / "pytorch_model.bin", map_location="cpu")
    assert not [k for k in state if "lora" in k]
    from safetensors.torch import load_file
    base = load_file(tiny_assets / "models" / "tiny-llama" / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(state[q], base[q])                       # the merged adapter changed the layer
    assert torch.equal(state["model.norm.weight"], base["model.norm.weight"])   # only adapters trained
    launch = " ".join(json.loads((out / "config.json").read_text())["launch_command"])
    assert "--lora_dim 8" in launch and "--only_optimize_lora" in launch and "--gradient_checkpointing" in launch


def _run_main(dschat_dir: Path, args: list[str], launcher: bool = False) -> subprocess.CompletedProcess:
    """The overlay main.py as a user would run it (its own argument checks come before distributed set-up, so
    plain python suffices for them; data errors need the launcher)."""
    from rlhf_overlay.runtime.runs import runtime_env
    env = runtime_env(cpu=True)
    env["PYTHONPATH"] = f"{dschat_dir}:{env['PYTHONPATH']}"
    prefix = ([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port",
               str(dschat_launch.free_port())] if launcher else [sys.executable])
    return subprocess.run([*prefix, "main.py", *args], cwd=dschat_dir / "training" / "step2_dpo_finetuning", env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.upstream
def test_main_py_refuses_what_cannot_work(dschat_dir, tiny_assets):
    model = str(tiny_assets / "models" / "tiny-llama")
    out = _run_main(dschat_dir, ["--model_name_or_path", "/no/such/sft-model"])
    assert out.returncode != 0 and "--model_name_or_path /no/such/sft-model: no such folder" in out.stderr
    out = _run_main(dschat_dir, ["--model_name_or_path", model, "--dtype", "fp16"])
    assert out.returncode != 0 and "--dtype fp16: fp16 training is not supported on CPU" in out.stderr
    out = _run_main(dschat_dir, ["--model_name_or_path", model, "--beta", "0"])
    assert out.returncode != 0 and "--beta 0.0: must be > 0" in out.stderr


@pytest.mark.upstream
@pytest.mark.slow
def test_main_py_reports_a_bad_row_by_file_and_line(dschat_dir, tiny_assets, tmp_path):
    """For users who run the overlay main.py directly (no entry-module check before it): the data layer
    (patch 0004) names file:line."""
    bad = write_jsonl(tmp_path / "prefs" / "train.jsonl", [GOOD, {"prompt": "Human: x Assistant:", "chosen": "ok",
                                                                   "answer": "no"}])
    out = _run_main(dschat_dir, ["--model_name_or_path", str(tiny_assets / "models" / "tiny-llama"), "--data_path",
                                 str(bad.parent), "--data_split", "0,1,0", "--data_output_path",
                                 str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"), "--deepspeed"],
                   launcher=True)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and f"{bad}:2" in text and "rejected" in text, text[-3000:]
    assert not (dschat_dir / "training" / "step2_dpo_finetuning" / "step2_tensorboard").exists()  # tree kept clean
