"""The seed's commands (Pai-Megatron-Patch rlhf/ README), typed as written, from the folders it names, with the
launchers it names (rlhf_overlay.tools.seed_launch, overlays/trlx/examples/summarize_rlhf, DeepSpeedExamples patch 0006).

One test per command, on CPU with the tiny defaults (MODEL/DATA unset, offline) for trlx and with MODEL/DATA pointing
at the tiny LLaMA and a slice of the tiny data for DeepSpeed-Chat's 7B scripts; step counts are cut with the scripts'
own flags (`--max-steps`, `--steps`) or by the size of DATA. Each exits 0 and leaves a run folder with its report and
sane metrics, and the upstream work trees stay exactly pin + overlays. A hub model that cannot be had (offline, empty
cache) stops before anything with one `error:` line and exit 2.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from rlhf_overlay import PROJECT_ROOT
pytestmark = [pytest.mark.upstream, pytest.mark.slow]

VENV_BIN = PROJECT_ROOT / ".venv" / "bin"
TRLX_EXAMPLE = PROJECT_ROOT / "upstream" / "trlx" / "examples" / "summarize_rlhf"
DSCHAT_TRAINING = PROJECT_ROOT / "upstream" / "DeepSpeedExamples" / "applications" / "DeepSpeed-Chat" / "training"
ACCELERATE = ["accelerate", "launch", "--config_file", "configs/default_accelerate_config.yaml"]
# what the launchers print themselves (DeepSpeed's logger, torch elastic), as opposed to the command's own lines
LAUNCHER_LINE = re.compile(r"^(\[\d{4}-\d\d-\d\d |[WEI]\d{4} |\s*warnings\.warn|\S+\.py:\d+: \w*Warning)")
MAKE_VARS = ("MODEL", "ACTOR", "CRITIC", "RM", "REWARD", "DATA", "OUTPUT", "OVERWRITE", "ZERO_STAGE", "LORA_DIM",
             "NUM_GPUS", "HOSTFILE", "RANK_REPORT", "LOCAL_RANK", "RANK", "WORLD_SIZE", "RLHF_OVERLAY_WORKER",
             "RLHF_OVERLAY_RUN_DIRS_FILE")


@pytest.fixture(scope="module", autouse=True)
def _set_up(trlx_dir, dschat_dir, tiny_assets):
    for tool in ("deepspeed", "accelerate"):
        if not (VENV_BIN / tool).is_file():
            pytest.skip(f"{VENV_BIN / tool} is missing: run `make setup`")


def seed_env(**values) -> dict:
    """The user's shell after `make setup` and activating the venv: the launchers on PATH, offline, no make
    variables except `values`."""
    env = {k: v for k, v in os.environ.items() if k not in MAKE_VARS and not k.startswith(("ACCELERATE_", "PYTEST"))}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OMP_NUM_THREADS="1")
    env.update({k: str(v) for k, v in values.items()})
    return env


def run(cmd: list[str], cwd: Path, env: dict, timeout: int = 600) -> tuple[int, str]:
    res = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=timeout)
    return res.returncode, res.stdout


def own_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.strip() and not LAUNCHER_LINE.match(line)]


def upstream_clean(name: str) -> None:
    """Nothing left behind in the upstream work tree: no untracked file, no change beyond pin + overlays."""
    status = subprocess.run(["git", "status", "--porcelain"], cwd=PROJECT_ROOT / "upstream" / name,
                            capture_output=True, text=True).stdout.splitlines()
    assert not [s for s in status if s.startswith("??") or s[1:2] != " "], status


def check_run_folder(run_dir: Path, out: str) -> dict:
    for name in ("report.png", "summary.md", "training.log", "command.txt", "config.json"):
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, (name, out[-3000:])
    assert next(run_dir.rglob("events.out.tfevents.*"), None) is not None
    return json.loads((run_dir / "config.json").read_text())


def check_rm_metrics(run_dir: Path, steps: int) -> dict:
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["steps"] == steps and math.isfinite(m["train_loss"]) and 0.0 <= m["eval_accuracy"] <= 1.0
    assert m["eval_pairs"] > 0 and (run_dir / "reward_model" / "reward_model.json").is_file()
    return m


def check_ppo_metrics(run_dir: Path, steps: int) -> dict:
    m = json.loads((run_dir / "metrics.json").read_text())
    assert len(m["steps"]) == steps, m["steps"]
    for s in m["steps"]:
        assert all(math.isfinite(s[k]) for k in ("reward_mean", "kl", "policy_loss", "value_loss")), s
        assert s["samples"] > 0 and s["response_length"] > 0
    assert (run_dir / "policy" / "config.json").is_file()
    return m


# ---------------------------------------------------------------------------------------------- trlx
@pytest.fixture(scope="module")
def bloom_rm(tmp_path_factory):
    """`cd examples/summarize_rlhf/reward_model/ && deepspeed train_reward_model_bloom.py` (the first seed RM command)."""
    out = tmp_path_factory.mktemp("seed") / "rm-bloom"
    rc, text = run(["deepspeed", "train_reward_model_bloom.py", "--max-steps", "20"], TRLX_EXAMPLE / "reward_model",
                   seed_env(OUTPUT=out))
    return rc, text, out


def test_deepspeed_train_reward_model_bloom(bloom_rm):
    rc, out, run_dir = bloom_rm
    assert rc == 0, out[-4000:]
    assert own_lines(out)[0].startswith("tiny recipe: the embedded tiny BLOOM"), own_lines(out)[:3]
    assert "note: ds_config_bloom.json: zero_optimization.offload_optimizer (device cpu) dropped" in out
    config = check_run_folder(run_dir, out)
    assert config["seed_launch"]["launcher"] == "deepspeed" and config["seed_launch"]["world_size"] == 1
    assert config["deepspeed_config"]["zero_optimization"]["stage"] == 2  # the seed's ZeRO-2, kept on CPU
    m = check_rm_metrics(run_dir, 20)
    assert m["eval_accuracy"] > 0.6, m  # the tiny data's signal is learnt within 20 steps (chance 0.5)
    assert "'train_loss'" in (run_dir / "training.log").read_text()  # the worker's output, teed into the log
    upstream_clean("trlx")


def test_deepspeed_train_reward_model_gptj(tmp_path):
    out_dir = tmp_path / "rm-gptj"
    rc, out = run(["deepspeed", "train_reward_model_gptj.py", "--max-steps", "20"], TRLX_EXAMPLE / "reward_model",
                  seed_env(OUTPUT=out_dir, HF_HOME=tmp_path / "hf"))
    assert rc == 0, out[-4000:]
    first = own_lines(out)[0]
    assert first.startswith("tiny recipe: the embedded tiny GPTJ") and "CarperAI/openai_summarize_tldr_sft" in first
    # upstream's ds_config_gpt_j.json: what DeepSpeed 0.19 on CPU cannot take is changed and said
    for note in ("fp16.opt_level='O2' removed", "fp16 off", "train_batch_size 32 -> auto"):
        assert note in out, note
    config = check_run_folder(out_dir, out)
    assert config["deepspeed_config"]["optimizer"]["type"] == "AdamW"
    assert config["reward_model"]["arch"] == "gptj"
    check_rm_metrics(out_dir, 20)
    upstream_clean("trlx")


def test_accelerate_trlx_bloom_rlhf(bloom_rm, tmp_path):
    rc0, _, rm_dir = bloom_rm
    assert rc0 == 0, "the reward-model command failed (see test_deepspeed_train_reward_model_bloom)"
    out_dir = tmp_path / "ppo-bloom"
    rc, out = run([*ACCELERATE, "trlx_bloom_rlhf.py", "--steps", "3"], TRLX_EXAMPLE,
                  seed_env(OUTPUT=out_dir, RM=rm_dir / "reward_model"))
    assert rc == 0, out[-4000:]
    assert own_lines(out)[0].startswith("tiny recipe: the embedded tiny BLOOM")
    # the seed's accelerate config names configs/ds_config_trlx_gptj_summarize.json: ZeRO-2, made to run on CPU
    assert "note: configs/ds_config_trlx_gptj_summarize.json: fp16 off" in out
    config = check_run_folder(out_dir, out)
    ds = json.loads((out_dir / "deepspeed_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["fp16"]["enabled"] is False
    assert config["seed_launch"]["launcher"] == "accelerate launch"
    assert config["rm_path"] == str((rm_dir / "reward_model").resolve())
    check_ppo_metrics(out_dir, 3)
    assert "step   3/3" in (out_dir / "training.log").read_text()
    upstream_clean("trlx")


def test_accelerate_two_ranks_share_one_run(bloom_rm, tmp_path):
    """The same seed command with two processes: each is a rank of one run (rank 0 made the folder and tells rank 1),
    both ranks' output lands in training.log, and the run is reported once."""
    rc0, _, rm_dir = bloom_rm
    assert rc0 == 0, "the reward-model command failed (see test_deepspeed_train_reward_model_bloom)"
    out_dir = tmp_path / "ppo-2"
    rc, out = run([*ACCELERATE, "--num_processes", "2", "trlx_bloom_rlhf.py", "--steps", "1"], TRLX_EXAMPLE,
                  seed_env(OUTPUT=out_dir, RM=rm_dir / "reward_model"))
    assert rc == 0, out[-4000:]
    config = check_run_folder(out_dir, out)
    assert config["seed_launch"]["world_size"] == 2 and config["launch"]["num_processes"] == 2
    log = (out_dir / "training.log").read_text()
    assert "# rank 0 of 2" in log and "# rank 1 of 2" in log
    assert "--num_processes 2" in (out_dir / "command.txt").read_text()
    check_ppo_metrics(out_dir, 1)
    assert out.count("report: wrote") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ppo-2"]  # one run folder for both ranks


def test_accelerate_trlx_gptj_text_summarization(tmp_path):
    """No RM: as `make ppo-gptj`, a tiny reward model is trained first (its own job, not a rank of this launch)."""
    out_dir = tmp_path / "ppo-gptj"
    rc, out = run([*ACCELERATE, "trlx_gptj_text_summarization.py", "--steps", "3"], TRLX_EXAMPLE,
                  seed_env(OUTPUT=out_dir, HF_HOME=tmp_path / "hf"))
    assert rc == 0, out[-4000:]
    assert own_lines(out)[0].startswith("tiny recipe: the embedded tiny GPTJ")
    config = check_run_folder(out_dir, out)
    assert config["ppo"]["arch"] == "gptj" and config["rm_path"] == str(out_dir / "rm" / "reward_model")
    check_rm_metrics(out_dir / "rm", json.loads((out_dir / "rm" / "metrics.json").read_text())["steps"])
    check_ppo_metrics(out_dir, 3)
    upstream_clean("trlx")


def test_accelerate_trlx_bloom_rlhf_test(tmp_path):
    """The seed's PPO smoke test: the reward must clearly rise (the verdict of `make ppo-smoke-test`)."""
    out_dir = tmp_path / "smoke"
    rc, out = run([*ACCELERATE, "trlx_bloom_rlhf_test.py"], TRLX_EXAMPLE, seed_env(OUTPUT=out_dir))
    assert rc == 0, out[-4000:]
    assert own_lines(out)[0].startswith("tiny recipe: the embedded tiny BLOOM")
    check_run_folder(out_dir, out)
    m = json.loads((out_dir / "metrics.json").read_text())
    assert m["rose"] and m["reward_last"] > m["reward_first"], m.get("verdict")
    assert "mean reward:" in out
    upstream_clean("trlx")


# ---------------------------------------------------------------------------------------------- DeepSpeed-Chat
@pytest.fixture(scope="module")
def tiny_slices(tiny_assets, tmp_path_factory):
    """Slices of the tiny data (folders with train.jsonl + eval.jsonl), so the 7B recipes (1 epoch, batch 8 /
    batch 1) take a few steps: 24 training pairs = 3 reward-model steps, 4 training prompts = 4 PPO steps."""
    d = tmp_path_factory.mktemp("seed-data")
    for kind, n_train, n_eval in (("preference", 24, 8), ("prompts", 4, 2)):
        rows = (tiny_assets / "data" / kind / "train.jsonl").read_text().splitlines()
        (d / kind).mkdir()
        (d / kind / "train.jsonl").write_text("\n".join(rows[:n_train]) + "\n")
        (d / kind / "eval.jsonl").write_text("\n".join(rows[n_train:n_train + n_eval]) + "\n")
    return {"model": tiny_assets / "models" / "tiny-llama", "pref": d / "preference", "prompts": d / "prompts"}


@pytest.fixture(scope="module")
def dschat_rm(tiny_slices, tmp_path_factory):
    """`cd training/step2_reward_model_finetuning/ && bash training_scripts/llama2/run_llama2_7b.sh`"""
    out = tmp_path_factory.mktemp("seed") / "rm-llama2"
    rc, text = run(["bash", "training_scripts/llama2/run_llama2_7b.sh"], DSCHAT_TRAINING / "step2_reward_model_finetuning",
                   seed_env(MODEL=tiny_slices["model"], DATA=tiny_slices["pref"], OUTPUT=out))
    return rc, text, out


def test_bash_run_llama2_7b_step2(dschat_rm):
    rc, out, run_dir = dschat_rm
    assert rc == 0, out[-4000:]
    config = check_run_folder(run_dir, out)
    # the 7B recipe with the given model; on CPU what cannot run is adjusted and said
    assert config["recipe"] == "llama2-7b" and config["batch_size"] == 8 and config["max_seq_len"] == 512
    assert config["zero_stage"] == 0 and config["offload"] is False and config["dtype"] == "fp32"
    assert "ZeRO-3 -> 0" in out and "offload" in out
    res = json.loads((run_dir / "model" / "eval_results.json").read_text())
    assert 0.0 <= res["eval/acc"] <= 1.0 and math.isfinite(res["eval/reward_score"]), res
    assert "Total Micro Batches 3" in out  # 24 pairs, batch 8
    assert (run_dir / "model" / "pytorch_model.bin").is_file()
    upstream_clean("DeepSpeedExamples")


def test_bash_run_llama2_7b_lora_step3(dschat_rm, tiny_slices, tmp_path):
    rc0, _, rm_dir = dschat_rm
    assert rc0 == 0, "the step-2 command failed (see test_bash_run_llama2_7b_step2)"
    out_dir = tmp_path / "ppo-llama2"
    rc, out = run(["bash", "training_scripts/llama2/run_llama2_7b_lora.sh"], DSCHAT_TRAINING / "step3_rlhf_finetuning",
                  seed_env(MODEL=tiny_slices["model"], CRITIC=rm_dir, DATA=tiny_slices["prompts"], OUTPUT=out_dir))
    assert rc == 0, out[-4000:]
    config = check_run_folder(out_dir, out)
    assert config["recipe"] == "llama2-7b" and config["lora_dim"] == 64 and config["hybrid_engine"] is False
    assert "hybrid engine" in out
    res = json.loads((out_dir / "ppo_results.json").read_text())
    assert res["ppo/steps"] == 4, res  # 4 prompts, batch 1
    assert (out_dir / "actor" / "config.json").is_file() and (out_dir / "critic" / "config.json").is_file()
    upstream_clean("DeepSpeedExamples")


# ---------------------------------------------------------------------------------------------- hub names
@pytest.mark.parametrize("cmd, folder, env, names", [
    (["deepspeed", "train_reward_model_gptj.py"], "trlx-rm", {"MODEL": "CarperAI/openai_summarize_tldr_sft"},
     "CarperAI/openai_summarize_tldr_sft"),
    (["bash", "training_scripts/llama2/run_llama2_7b.sh"], "step2", {}, "meta-llama/Llama-2-7b-hf"),
], ids=["trlx-gptj-model", "dschat-step2-default"])
def test_hub_model_that_cannot_be_had_stops_with_one_line(cmd, folder, env, names, tmp_path):
    cwd = {"trlx-rm": TRLX_EXAMPLE / "reward_model", "step2": DSCHAT_TRAINING / "step2_reward_model_finetuning"}[folder]
    out_dir = tmp_path / "out"
    rc, out = run(cmd, cwd, seed_env(OUTPUT=out_dir, HF_HOME=tmp_path / "empty-hf", **env), timeout=120)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1, out[-3000:]
    assert names in errors[0] and "HF_HUB_OFFLINE=1" in errors[0] and "MODEL=" in errors[0], errors[0]
    assert "Traceback" not in out
    assert not out_dir.exists()
    upstream_clean("trlx")
    upstream_clean("DeepSpeedExamples")
