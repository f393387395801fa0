"""DeepSpeed-Chat on the embedded tiny LLaMA, for real, on CPU: `make ppo-llama2`'s default flow (tiny reward
model, then PPO with LoRA-only actor and critic under gradient checkpointing), trained once per module and
checked several ways; plus the overlays' own refusals and data errors.

Skipped, with the reason, when the upstream DeepSpeed-Chat work tree is not set up.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_overlay.dschat_jobs import ppo as dschat_ppo
from rlhf_overlay.runtime.runs import runtime_env
from helpers import tb_scalars

pytestmark = pytest.mark.upstream


@pytest.fixture(scope="module")
def ppo_run(dschat_dir, tiny_assets, tmp_path_factory) -> Path:
    """One `make ppo-llama2` with no ACTOR/CRITIC: trains the tiny RM into reward_model/, then PPO (~1 min)."""
    out = tmp_path_factory.mktemp("dschat") / "ppo"
    rc = dschat_ppo.main(["--output", str(out)])
    assert rc == 0, (out / "training.log").read_text()[-4000:] if (out / "training.log").exists() else "no log"
    return out


@pytest.mark.slow
def test_tiny_reward_model_learns_the_preference(ppo_run):
    results = json.loads((ppo_run / "reward_model" / "model" / "eval_results.json").read_text())
    assert results["eval/acc"] >= 0.75, results          # chance is 0.5
    assert results["eval/reward_score"] > results["eval/rejected_score"]
    assert results["end_of_conversation_token"] == "</s>" and results["num_padding_at_beginning"] == 0


@pytest.mark.slow
def test_reward_model_tensorboard_has_eval_acc_at_every_eval(ppo_run):
    tb = tb_scalars(ppo_run / "reward_model" / "tensorboard")
    for tag in ("train/loss", "eval/acc", "eval/reward_score", "rm/loss", "rm/acc"):
        assert tb.get(tag), f"{tag} missing; have {sorted(tb)}"
    assert len(tb["eval/acc"]) >= 3                          # before training, every eval_interval, epoch end
    assert tb["eval/acc"][-1][1] >= 0.75
    assert tb["train/loss"][-1][1] < tb["train/loss"][0][1]


@pytest.mark.slow
def test_ppo_ran_steps_with_lora_and_logged_common_scalars(ppo_run):
    results = json.loads((ppo_run / "ppo_results.json").read_text())
    assert results["ppo/steps"] >= 3
    tb = tb_scalars(ppo_run / "tensorboard")
    for tag in ("ppo/reward_mean", "ppo/kl", "ppo/policy_loss", "ppo/value_loss", "ppo/response_length",
                "reward", "actor_loss", "critic_loss"):
        assert len(tb.get(tag, [])) == results["ppo/steps"], f"{tag}: {tb.get(tag)}"
    assert all(length > 0 for _, length in tb["ppo/response_length"])
    # the first experience is generated before any update: the reference equals the actor (patch 0005; the tiny
    # LLaMA lacks [PAD], so actor and reference each get new vocabulary rows), and the actor moves afterwards.
    # ppo/kl is DeepSpeed-Chat's summed log-ratio log(pi/pi_ref) of the sampled answers: unbiased for the KL but
    # noisy per batch, and from the pre-trained base (whose answers the reference already finds likely) it can be
    # slightly negative, so the check is that it leaves 0, not its sign.
    kl = [value for _, value in tb["ppo/kl"]]
    assert kl[0] == pytest.approx(0.0, abs=1e-6), kl
    assert max(abs(v) for v in kl[1:]) > 1e-3, kl
    launch = " ".join(json.loads((ppo_run / "config.json").read_text())["launch_command"])
    # the combination upstream crashed on ("loss must be a scalar tensor"), fixed by patch 0002
    for flag in ("--critic_lora_dim", "--only_optimize_lora", "--critic_gradient_checkpointing"):
        assert flag in launch


@pytest.mark.slow
def test_saved_actor_loads_with_transformers_and_generates(ppo_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(ppo_run / "actor")
    tokenizer = AutoTokenizer.from_pretrained(ppo_run / "actor")
    inputs = tokenizer("Human: tell me something nice. Assistant:", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(out[0]), str)


@pytest.mark.slow
def test_critic_is_saved_and_was_trained(ppo_run):
    import torch
    rm = torch.load(ppo_run / "reward_model" / "model" / "pytorch_model.bin", map_location="cpu")
    critic = torch.load(ppo_run / "critic" / "pytorch_model.bin", map_location="cpu")
    assert set(critic) == set(rm) and "v_head.weight" in critic
    assert all(k.startswith(("rwtransformer.", "v_head.")) for k in critic)
    changed = [k for k in critic if not torch.equal(critic[k].float(), rm[k].float())]
    assert changed, "the critic's LoRA updates (merged on save) left every weight unchanged"
    assert (ppo_run / "critic" / "config.json").is_file()


@pytest.mark.slow
def test_run_folders_record_command_config_and_log(ppo_run):
    assert "-m rlhf_overlay.dschat_jobs.ppo --output" in (ppo_run / "command.txt").read_text()
    rm_command = (ppo_run / "reward_model" / "command.txt").read_text()
    assert "-m rlhf_overlay.dschat_jobs.reward_model" in rm_command and "--recipe tiny" in rm_command
    for folder in (ppo_run, ppo_run / "reward_model"):
        config = json.loads((folder / "config.json").read_text())
        assert config["recipe"] == "tiny" and config["dtype"] == "fp32" and config["zero_stage"] == 0
        log = (folder / "training.log").read_text()
        assert "deepspeed.launcher.runner" in log and "saving model" in log


@pytest.mark.slow
def test_bf16_ppo_with_an_existing_critic(ppo_run, tmp_path):
    """bf16 (the other CPU dtype) and CRITIC= an rm-llama2 run folder, for three steps."""
    out = tmp_path / "ppo-bf16"
    rc = dschat_ppo.main(["--critic", str(ppo_run / "reward_model"), "--dtype", "bf16", "--max-steps", "3",
                          "--output", str(out)])
    assert rc == 0, (out / "training.log").read_text()[-4000:]
    assert json.loads((out / "ppo_results.json").read_text())["ppo/steps"] == 3
    assert not (out / "reward_model").exists()              # the given critic was used, none trained


@pytest.mark.slow
def test_tiny_default_passes_its_verdict(ppo_run):
    """make ppo-llama2's tiny default is judged (rlhf_overlay.runtime.verdict) and passes: the fixture's exit code
    0 required it; here the recorded numbers against the bounds, recomputed from the tensorboard scalars."""
    from rlhf_overlay.runtime import verdict
    result = json.loads((ppo_run / "ppo_results.json").read_text())["verdict_of_run"]
    assert result["judged"] and result["passed"] and result["failed"] == [], result
    again = verdict.judge(verdict.dschat_steps(ppo_run / "tensorboard"), window=3, tiny=True)
    v, h = again["verdict"], again["health"]
    assert v["rise"] > 3 * v["standard_error"] and v["last"] > v["first"]
    assert h["fluency_base"] >= 0.95 and h["fluency_end"] >= 0.9 and h["kl_per_token_end"] <= 0.5
    assert v == pytest.approx(result["verdict"])


@pytest.mark.slow
def test_a_degenerate_setting_fails_the_verdict(ppo_run, tmp_path, capsys):
    """LoRA lr 5e-3 for 60 steps (DeepSpeed-Chat's KL coefficient is a fixed 0.1): the reward rises but the policy
    runs away from the reference and stops being fluent. With CRITIC given the run is measured, not judged (exit 0);
    judged as the tiny world it is (the fixture's tiny reward model), it fails and says why."""
    out = tmp_path / "ppo-degenerate"
    # --on_unhealthy warn: read to its end and judged (with stop, the KL guard ends it at step 32: test_health_dschat)
    rc = dschat_ppo.main(["--critic", str(ppo_run / "reward_model"), "--max-steps", "60", "--output", str(out), "--",
                          "--actor_lora_learning_rate", "5e-3", "--on_unhealthy", "warn"])
    assert rc == 0, (out / "training.log").read_text()[-4000:]
    assert "note: not judged: these bounds describe the embedded tiny world" in capsys.readouterr().out
    assert dschat_ppo.judge_run(out, tiny=True) == 1
    err = capsys.readouterr().err
    assert err.startswith("FAIL: ppo-llama2: ") and "the KL to the reference ran away" in err, err
    assert json.loads((out / "ppo_results.json").read_text())["verdict_of_run"]["passed"] is False


def _run_main(dschat_dir: Path, step: str, args: list[str]) -> subprocess.CompletedProcess:
    """main.py's own argument checks run before any distributed set-up, so plain python suffices."""
    env = runtime_env(cpu=True)
    env["PYTHONPATH"] = f"{dschat_dir}:{env['PYTHONPATH']}"
    return subprocess.run([sys.executable, "main.py", *args], cwd=dschat_dir / "training" / step, env=env,
                          capture_output=True, text=True, timeout=300)


def test_step_scripts_refuse_what_fails_on_cpu(dschat_dir, tiny_assets):
    model = str(tiny_assets / "models" / "tiny-llama")
    out = _run_main(dschat_dir, "step2_reward_model_finetuning", ["--model_name_or_path", "/no/such/model"])
    assert out.returncode != 0 and "--model_name_or_path /no/such/model: no such folder" in out.stderr
    critic = tiny_assets / "models" / "tiny-llama"          # a base model, not a step-2 output
    out = _run_main(dschat_dir, "step3_rlhf_finetuning", ["--actor_model_name_or_path", model,
                                                          "--critic_model_name_or_path", str(critic)])
    assert out.returncode != 0 and "must be a reward model saved by step 2" in out.stderr, out.stderr[-2000:]


def test_step3_refuses_hybrid_engine_on_cpu(dschat_dir, tiny_assets, tmp_path):
    model = str(tiny_assets / "models" / "tiny-llama")
    critic = tmp_path / "critic"
    critic.mkdir()
    (critic / "config.json").write_text("{}")
    (critic / "pytorch_model.bin").write_bytes(b"")
    out = _run_main(dschat_dir, "step3_rlhf_finetuning", ["--actor_model_name_or_path", model,
                                                          "--critic_model_name_or_path", str(critic),
                                                          "--enable_hybrid_engine"])
    assert out.returncode != 0 and "--enable_hybrid_engine: the DeepSpeed hybrid engine needs a GPU" in out.stderr


def test_dschat_data_layer_reports_bad_rows_by_file_and_line(dschat_dir, tmp_path, monkeypatch):
    """The validation inside DeepSpeed-Chat (patch 0004 + local_files.py), for users who run main.py directly."""
    monkeypatch.syspath_prepend(str(dschat_dir))
    from dschat.utils.data import data_utils, local_files
    folder = tmp_path / "prefs"
    folder.mkdir()
    good = {"prompt": "Human: hi Assistant:", "chosen": "hello", "rejected": "no"}
    (folder / "train.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
    with pytest.raises(Exception, match=rf"{folder / 'train.jsonl'}:2"):
        data_utils.get_raw_dataset(str(folder), str(tmp_path / "cache"), 1234, 0)
    with pytest.raises(local_files.LocalDataError, match="no such file or folder"):
        data_utils.get_raw_dataset(str(tmp_path / "missing.jsonl"), str(tmp_path / "cache"), 1234, 0)
    (folder / "train.jsonl").write_text(json.dumps(good) + "\n")
    # a folder without eval.jsonl holds out an evaluation share of train.jsonl: one row cannot be split
    with pytest.raises(Exception, match="too few to hold out an evaluation share"):
        data_utils.get_raw_dataset(str(folder), str(tmp_path / "cache"), 1234, 0)
    (folder / "train.jsonl").write_text((json.dumps(good) + "\n") * 20)
    ds = data_utils.get_raw_dataset(str(folder), str(tmp_path / "cache"), 1234, 0)
    assert len(ds.get_train_data()) + len(ds.get_eval_data()) == 20 and len(ds.get_eval_data()) >= 1
    # prompt + answer (one space added only when neither side has one), as eval-rm scores it
    assert ds.get_prompt_and_chosen(ds.get_train_data()[0]) == "Human: hi Assistant: hello"
    assert ds.get_prompt(ds.get_train_data()[0]) == "Human: hi Assistant:"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text((json.dumps({"prompt": "Human: hi Assistant:", "reference": "hello"}) + "\n") * 20)
    only_prompts = data_utils.get_raw_dataset(str(prompts), str(tmp_path / "cache"), 1234, 0)
    with pytest.raises(local_files.LocalDataError, match="phase 2 needs rows with prompt, chosen and rejected"):
        only_prompts.require_pairs(2)
    only_prompts.require_pairs(3)


def test_fp32_deepspeed_configs(dschat_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(dschat_dir))
    from dschat.utils.ds_utils import get_eval_ds_config, get_train_ds_config
    for config in (get_train_ds_config(offload=False, dtype="fp32", stage=0), get_eval_ds_config(False, "fp32")):
        assert config["fp16"] == {"enabled": False} and "bfloat16" not in config
    assert get_train_ds_config(offload=False, dtype="bf16")["bfloat16"] == {"enabled": True}
    with pytest.raises(ValueError, match="dtype='fp8' is not supported"):
        get_train_ds_config(offload=False, dtype="fp8")


@pytest.mark.slow
def test_bloom_reward_model_trains(tiny_assets, dschat_dir, tmp_path):
    """A `bigscience/bloom-*` path triggers step 2's ln_f reset, which upstream crashed on (`rwtranrsformer`)."""
    from rlhf_overlay.dschat_jobs import reward_model as dschat_reward_model
    bloom = tmp_path / "bigscience" / "bloom-tiny"
    bloom.parent.mkdir()
    bloom.symlink_to(tiny_assets / "models" / "tiny-bloom", target_is_directory=True)
    data = tmp_path / "prefs"
    data.mkdir()
    for split, n in (("train", 64), ("eval", 32)):
        lines = (tiny_assets / "data" / "preference" / f"{split}.jsonl").read_text().splitlines()[:n]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "rm-bloom"
    rc = dschat_reward_model.main(["--recipe", "tiny", "--model", str(bloom), "--data", str(data), "--max-steps", "6",
                                   "--allow-arch", "--output", str(out)])   # BLOOM in a LLaMA recipe, on purpose
    assert rc == 0, (out / "training.log").read_text()[-4000:]
    import torch
    state = torch.load(out / "model" / "pytorch_model.bin", map_location="cpu")
    assert "rwtransformer.ln_f.weight" in state and "v_head.weight" in state


def test_tokenizers_of_local_folders(dschat_dir, tiny_assets, tmp_path, monkeypatch):
    """Patch 0003: a local folder's own tokenizer first (LLaMA told by config.json, not by the folder name), then
    the model named in its config.json, else a message that says what to copy."""
    import shutil
    monkeypatch.syspath_prepend(str(dschat_dir))
    from dschat.utils.utils import load_hf_tokenizer
    llama = tiny_assets / "models" / "tiny-llama"
    sft = tmp_path / "my-sft"                                 # no "llama" in the name
    shutil.copytree(llama, sft)
    tok = load_hf_tokenizer(str(sft))
    assert type(tok).__name__ == "LlamaTokenizer" and tok.pad_token == "[PAD]"
    no_tokenizer = tmp_path / "checkpoint"
    no_tokenizer.mkdir()
    config = json.loads((llama / "config.json").read_text())
    config.pop("_name_or_path", None)
    (no_tokenizer / "config.json").write_text(json.dumps(dict(config, _name_or_path=str(sft))))
    assert load_hf_tokenizer(str(no_tokenizer)).get_vocab() == tok.get_vocab()
    (no_tokenizer / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="copy the tokenizer files of its base model"):
        load_hf_tokenizer(str(no_tokenizer))
