"""make ppo-bloom / ppo-gptj (rlhf_overlay.trlx_jobs.ppo).

Unit tests (no upstream): --help, validation naming the field, launch planning (plain python, accelerate,
ZeRO-2, hostfile), bad prompt rows with file:line. Integration (upstream + slow): tiny PPO on BLOOM (with a tiny
reward model) and GPT-J (no RM given: one is trained first) runs and exports a policy that plain
AutoModelForCausalLM loads; accelerate + DeepSpeed ZeRO-2 on 2 CPU processes works, checkpoints included.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_overlay import PROJECT_ROOT
from rlhf_overlay.trlx_jobs import ppo, ppo_reward
from helpers import dry_run_output, hub_cache_with, tb_scalars

HUB_ID = "bigscience/bloom-560m"
from rlhf_overlay.trlx_jobs.common import ConfigError


def test_help_is_instant():
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "rlhf_overlay.trlx_jobs.ppo", "--help"], capture_output=True, text=True,
                         cwd=PROJECT_ROOT, timeout=60)
    assert res.returncode == 0 and time.time() - t0 < 5
    for flag in ("--model", "--rm", "--rm-device", "--reward-baseline", "--zero-stage", "--hostfile", "--steps"):
        assert flag in res.stdout
    assert "make ppo-bloom" in res.stdout


@pytest.mark.parametrize("kwargs, field", [
    ({"reward": "bleu"}, "reward"),
    ({"rollouts": 30, "batch_size": 16}, "rollouts"),
    ({"seq_length": 10, "max_new_tokens": 12}, "seq_length"),
    ({"num_layers_unfrozen": 0}, "num_layers_unfrozen"),
    ({"rm_device": "tpu"}, "rm_device"),
    ({"zero_stage": 5}, "zero_stage"),
    ({"model": "/nonexistent/sft"}, "model"),
    ({"model": "org/model", "reward": "model"}, "rm"),
    ({"reward": "rule", "rm": "/somewhere"}, "rm"),
    ({"data": "/nonexistent/prompts.jsonl"}, "data"),
    ({"normalize_reward": "ref"}, "normalize_reward"),
])
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError) as e:
        ppo.PPORunConfig(**kwargs).resolve()
    assert str(e.value).startswith(field), str(e.value)


def test_seed_recipe_defaults_for_own_models():
    c = ppo.PPORunConfig(model="bigscience/bloom-7b1", rm_untrained=True).resolve()
    assert (c.seq_length, c.max_new_tokens, c.rollouts, c.chunk_size, c.batch_size) == (550, 50, 128, 16, 4)
    assert (c.lr, c.init_kl_coef, c.kl_target, c.num_layers_unfrozen, c.steps) == (1e-6, 0.1, 6.0, 8, 50)
    assert ppo.PPORunConfig(model="org/gptj", arch="gptj", rm_untrained=True).resolve().lr == 5e-6


def test_launch_plans(tmp_path):
    run = tmp_path / "run"
    cmd, l = ppo.plan_launch(ppo.PPORunConfig(reward="rule").resolve(), run, cuda=False, gpu_count=0)
    assert cmd[1:3] == ["-m", "rlhf_overlay.trlx_jobs.ppo"] and l["zero_stage"] == 0 and l["precision"] == "no"
    cmd, l = ppo.plan_launch(ppo.PPORunConfig(reward="rule", zero_stage=2, num_processes=2).resolve(), run,
                             cuda=False, gpu_count=0)
    assert "accelerate.commands.launch" in cmd and cmd[cmd.index("--config_file") + 1].endswith("zero2.yaml")
    assert cmd[cmd.index("--num_processes") + 1] == "2" and cmd[-3:] == ["rlhf_overlay.trlx_jobs.ppo", "--worker", str(run)]
    cmd, l = ppo.plan_launch(ppo.PPORunConfig(reward="rule", num_processes=2).resolve(), run, cuda=False, gpu_count=0)
    assert cmd[cmd.index("--config_file") + 1].endswith("cpu.yaml")
    cmd, l = ppo.plan_launch(ppo.PPORunConfig(reward="rule").resolve(), run, cuda=True, gpu_count=4)
    assert l == {**l, "zero_stage": 2, "num_processes": 4, "precision": "bf16"}
    # two machines (both names are this host here): one accelerate config per machine, machine 0 started here
    hf = tmp_path / "hostfile"
    hf.write_text("localhost slots=8\n127.0.0.1 slots=8\n")
    cmd, l = ppo.plan_launch(ppo.PPORunConfig(reward="rule", hostfile=str(hf)).resolve(), run, cuda=True,
                             gpu_count=8)
    assert cmd[cmd.index("--config_file") + 1] == str(run / "accelerate" / "machine-0.yaml")
    assert "--num_processes" not in cmd and l["num_processes"] == 16 and l["processes_per_machine"] == 8
    assert [m["machine_rank"] for m in l["machines"]] == [0, 1]
    c0, c1 = l["machine_configs"]
    assert (c0["machine_rank"], c1["machine_rank"]) == (0, 1)
    assert c0["num_machines"] == c1["num_machines"] == 2 and c0["num_processes"] == 16
    assert c0["main_process_ip"] == c1["main_process_ip"] == "localhost"
    assert c0["main_process_port"] == c1["main_process_port"]
    assert c0["distributed_type"] == "DEEPSPEED" and c0["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"
    # one host: a local run with its slots as processes; NUM_GPUS above the slots is refused
    one = tmp_path / "one"
    one.write_text("localhost slots=2\n")
    cmd, l = ppo.plan_launch(ppo.PPORunConfig(reward="rule", hostfile=str(one)).resolve(), run, cuda=False,
                             gpu_count=0)
    assert l["num_processes"] == 2 and cmd[cmd.index("--num_processes") + 1] == "2" and "machines" not in l
    with pytest.raises(ConfigError, match=r"NUM_GPUS\)=4: more than the slots"):
        ppo.plan_launch(ppo.PPORunConfig(reward="rule", hostfile=str(one), num_processes=4).resolve(), run,
                        cuda=False, gpu_count=0)
    remote = tmp_path / "remote"
    remote.write_text("node-a.invalid slots=8\nlocalhost slots=8\n")
    with pytest.raises(ConfigError, match="start the run on node-a.invalid, its first host"):
        ppo.plan_launch(ppo.PPORunConfig(reward="rule", hostfile=str(remote)).resolve(), run, cuda=True, gpu_count=8)
    with pytest.raises(ConfigError, match="fp16"):
        ppo.plan_launch(ppo.PPORunConfig(reward="rule", precision="fp16").resolve(), run, cuda=False, gpu_count=0)
    for p in ("cpu.yaml", "multi_gpu.yaml", "zero2.yaml"):
        assert (PROJECT_ROOT / "configs" / "accelerate" / p).is_file()


def test_bad_prompt_row_fails_with_file_and_line(tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "Human: hi. Assistant:", "reference": "hello"}) + "\n"
                    + json.dumps({"reference": "no prompt here"}) + "\n")
    rc = ppo.main(["--reward", "rule", "--data", str(data), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{data}:2" in err, err
    assert not (tmp_path / "out").exists()


def test_reference_baseline_needs_references(tmp_path, capsys, tiny_assets):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "Human: hi. Assistant:"}) + "\n")
    rc = ppo.main(["--data", str(data), "--reward-baseline", "reference", "--output", str(tmp_path / "o")])
    assert rc == 2 and "reference" in capsys.readouterr().err


def test_reward_fn_rule_and_eos_stripping(tiny_assets):
    from transformers import AutoTokenizer

    from rlhf_overlay.data.synthetic import rule_reward

    tok = AutoTokenizer.from_pretrained(tiny_assets / "models" / "tiny-bloom")
    outs = [" the garden is lovely and calm." + tok.eos_token, " the garden is awful.", " a calm and kind river."]
    raw = rule_reward([o.replace(tok.eos_token, "") for o in outs])
    cfg = ppo.PPORunConfig(reward="rule", normalize_reward="none").resolve()
    fn = ppo_reward.make_reward_fn(cfg, {"reward_baseline": "none"}, tok, None, "cpu")
    assert fn(samples=outs, prompts=["p"] * 3, outputs=outs) == raw
    # the tiny default normalises by running moments: zero mean, unit std on the first batch
    fn = ppo_reward.make_reward_fn(ppo.PPORunConfig(reward="rule").resolve(), {"reward_baseline": "none"}, tok, None, "cpu")
    norm = fn(samples=outs, prompts=["p"] * 3, outputs=outs)
    assert abs(sum(norm)) < 1e-9 and sorted(range(3), key=norm.__getitem__) == sorted(range(3), key=raw.__getitem__)


# ------------------------------------------------------------------------------------------ integration
@pytest.mark.upstream
def test_dry_run_checks_prints_and_creates_nothing(trlx_dir, tiny_assets, tmp_path, capsys, monkeypatch):
    """--dry-run: every check, then the resolved settings and the launch command (last line); nothing is created.
    Flags win over the --config file; MODEL takes a run folder as readily as the model in it (its policy/)."""
    import shutil

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "ppo-run"
    shutil.copytree(tiny_assets / "models" / "tiny-bloom", run / "policy")
    (run / "command.txt").write_text("python -m rlhf_overlay.trlx_jobs.ppo\n")
    (tmp_path / "settings.yaml").write_text("reward: rule\nsteps: 7\nlr: 0.001\n")
    out = tmp_path / "out"
    assert ppo.main(["--model", "ppo-run", "--config", "settings.yaml", "--steps", "9", "--output", str(out),
                     "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# ppo-bloom dry run: nothing was run or created")
    resolved, command = dry_run_output(printed)
    assert resolved["policy_path"] == str(run / "policy") and resolved["hf_hub_offline"] is True
    assert (resolved["ppo"]["steps"], resolved["ppo"]["reward"], resolved["ppo"]["lr"]) == (9, "rule", 0.001)
    assert command.endswith(f"-m rlhf_overlay.trlx_jobs.ppo --worker {out}")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ppo-run", "settings.yaml"]


def _run(target: str, env_extra: dict, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "training_scripts/run.sh", target], cwd=PROJECT_ROOT,
                          env=dict(os.environ, **env_extra), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ppo_runs(trlx_dir, tiny_assets, tmp_path_factory):
    """Three tiny trlx runs, once for the module (~2-3 min on 2 cores)."""
    runs = {}
    rm_dir = tmp_path_factory.mktemp("rm-bloom")
    res = subprocess.run([sys.executable, "-m", "rlhf_overlay.trlx_jobs.reward_model", "--arch", "bloom", "--max-steps",
                          "60", "--output", str(rm_dir), "--overwrite"], cwd=PROJECT_ROOT, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # BLOOM with a trained reward model, normalised by the reference answer (the seed's form), hydra heads.
    out = tmp_path_factory.mktemp("ppo-bloom")
    runs["bloom"] = (out, subprocess.run(
        [sys.executable, "-m", "rlhf_overlay.trlx_jobs.ppo", "--arch", "bloom", "--rm", str(rm_dir / "reward_model"),
         "--steps", "3", "--num-layers-unfrozen", "1", "--output", str(out), "--overwrite"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900))
    # MODEL a hub id (the tiny BLOOM in a private HF cache under that id, HF_HUB_OFFLINE=1), RM the rm run's folder.
    out = tmp_path_factory.mktemp("ppo-hub")
    hf_home = hub_cache_with(tmp_path_factory.mktemp("hf"), HUB_ID, tiny_assets / "models" / "tiny-bloom")
    runs["hub"] = (out, subprocess.run(
        [sys.executable, "-m", "rlhf_overlay.trlx_jobs.ppo", "--arch", "bloom", "--model", HUB_ID, "--rm", str(rm_dir),
         "--steps", "2", "--rollouts", "32", "--chunk-size", "32", "--batch-size", "16", "--max-new-tokens", "8",
         "--seq-length", "64", "--num-layers-unfrozen", "1", "--eval-prompts", "4", "--output", str(out),
         "--overwrite"], cwd=out, capture_output=True, text=True, timeout=900,
        env=dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")))
    # GPT-J through make's script with no RM: a tiny reward model is trained first (the embedded default).
    out = tmp_path_factory.mktemp("ppo-gptj")
    runs["gptj"] = (out, _run("ppo_gptj", {"OUTPUT": str(out), "OVERWRITE": "1"}))
    # accelerate + DeepSpeed ZeRO-2 on 2 CPU processes, with a save_state checkpoint (patches 0004/0005).
    out = tmp_path_factory.mktemp("ppo-zero2")
    runs["zero2"] = (out, subprocess.run(
        [sys.executable, "-m", "rlhf_overlay.trlx_jobs.ppo", "--arch", "bloom", "--reward", "rule", "--steps", "2",
         "--zero-stage", "2", "--num-processes", "2", "--checkpoint-every", "1", "--save-optimizer",
         "--output", str(out), "--overwrite"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900))
    return runs


@pytest.mark.upstream
@pytest.mark.slow
def test_hub_id_model_and_rm_run_folder(ppo_runs, tiny_assets):
    """MODEL=bigscience/bloom-560m is a hub id as in ppo-llama2 (here found in a private HF cache, offline), and RM
    takes the run folder of `make rm-bloom` as readily as its reward_model/ (as CRITIC does in ppo-llama2)."""
    out, res = ppo_runs["hub"]
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert f"no such local path, so it is the hub model {HUB_ID} (found in the local cache)" in res.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["policy_path"] == HUB_ID and Path(config["rm_path"]).name == "reward_model"
    assert len(json.loads((out / "metrics.json").read_text())["steps"]) == 2
    _loads_as_plain_causal_lm(out / "policy", tiny_assets / "models" / "tiny-bloom")


def _loads_as_plain_causal_lm(policy: Path, base: Path):
    """The export must be a complete plain HF model: every weight loaded (none newly initialised), trained."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(policy, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ref = AutoModelForCausalLM.from_pretrained(base)
    changed = any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    assert changed, "PPO must have changed the policy"
    tok = AutoTokenizer.from_pretrained(policy)
    ids = tok("Human: tell me about the garden. Assistant:", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    assert out.shape[1] == ids.shape[1] + 4 or out[0, -1].item() == tok.eos_token_id


@pytest.mark.upstream
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["bloom", "gptj", "zero2"])
def test_tiny_ppo_runs_and_exports_a_loadable_policy(ppo_runs, tiny_assets, arch):
    out, res = ppo_runs[arch]
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "mean reward:" in res.stdout and "step   1/" in (out / "training.log").read_text()
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["steps"]) == json.loads((out / "config.json").read_text())["ppo"]["steps"]
    for s in m["steps"]:
        assert s["samples"] >= 32 and s["optimizer_steps"] >= 1
    base = tiny_assets / "models" / ("tiny-gptj" if arch == "gptj" else "tiny-bloom")
    _loads_as_plain_causal_lm(out / "policy", base)


@pytest.mark.upstream
@pytest.mark.slow
def test_tiny_default_is_judged_and_passes_and_own_rm_is_not(ppo_runs):
    """make ppo-gptj's tiny default (no MODEL, RM or DATA) ends with the tiny-world verdict and passes it; a run with
    RM= given prints the numbers but is not judged (rlhf_overlay.runtime.verdict)."""
    out, res = ppo_runs["gptj"]
    result = json.loads((out / "metrics.json").read_text())["verdict_of_run"]
    assert result["judged"] and result["passed"], result
    v, h = result["verdict"], result["health"]
    assert v["rise"] > 3 * v["standard_error"] and h["fluency_end"] >= 0.9 and h["kl_per_token_end"] <= 0.5
    assert "PASS: ppo-gptj: the mean reward rose by" in res.stdout and "KL per answer token at the end:" in res.stdout
    out, res = ppo_runs["bloom"]    # RM given (3 steps)
    assert not json.loads((out / "metrics.json").read_text())["verdict_of_run"]["judged"]
    assert "note: not judged: these bounds describe the embedded tiny world" in res.stdout


@pytest.mark.upstream
@pytest.mark.slow
def test_reward_model_path_and_reference_baseline(ppo_runs):
    out, res = ppo_runs["bloom"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["reward_baseline"] == "reference" and cfg["rm_path"].endswith("reward_model")
    assert "minus the reference's score" in res.stdout
    gout, gres = ppo_runs["gptj"]
    assert "training a tiny reward model" in gres.stdout
    assert (gout / "rm" / "reward_model" / "reward_model.json").is_file()


@pytest.mark.upstream
@pytest.mark.slow
def test_zero2_cpu_run_saves_deepspeed_checkpoints(ppo_runs):
    out, res = ppo_runs["zero2"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["launch"]["zero_stage"] == 2 and cfg["launch"]["num_processes"] == 2
    shards = list((out / "checkpoints").rglob("zero_pp_rank_*_optim_states.pt"))
    assert len({p.name for p in shards}) == 2, "one ZeRO-2 optimizer shard per process"


@pytest.mark.upstream
@pytest.mark.slow
def test_common_tensorboard_names(ppo_runs):
    out, _ = ppo_runs["bloom"]
    tb = tb_scalars(out / "tensorboard")
    want = {"ppo/reward_mean", "ppo/kl", "ppo/policy_loss", "ppo/value_loss", "ppo/response_length"}
    assert want <= set(tb), sorted(tb)
    assert [step for step, _ in tb["ppo/reward_mean"]] == [1, 2, 3]
    assert any((out / "tensorboard" / "trlx").rglob("events.out.tfevents.*")), "trlx's own scalars"


@pytest.mark.upstream
@pytest.mark.slow
@pytest.mark.parametrize("module,args", [
    ("rlhf_overlay.trlx_jobs.smoke_test", []),   # the smoke test's defaults (num_layers_unfrozen -1: a full reference copy)
    ("rlhf_overlay.trlx_jobs.ppo", ["--arch", "bloom", "--reward", "rule", "--num-layers-unfrozen", "-1"]),
    ("rlhf_overlay.trlx_jobs.ppo", ["--arch", "bloom", "--reward", "rule", "--num-layers-unfrozen", "1"]),
    ("rlhf_overlay.trlx_jobs.ppo", ["--arch", "gptj", "--reward", "rule", "--num-layers-unfrozen", "-1"]),
], ids=["smoke-default", "bloom-all-layers", "bloom-hydra-1", "gptj-all-layers"])
def test_reference_is_the_policy_at_step_1(trlx_dir, tiny_assets, tmp_path, module, args):
    """Step 1's rollouts are scored before any update, so the KL reference must equal the policy there: KL 0.
    (trlx patch 0012: with num_layers_unfrozen -1 the reference used to be the policy minus its first block,
    ~4.9 nats per answer token at step 1 on the tiny BLOOM.)"""
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", module, *args, "--steps", "1", "--output", str(out)],
                         cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert (out / "metrics.json").is_file(), res.stdout[-3000:] + res.stderr[-3000:]
    step = json.loads((out / "metrics.json").read_text())["steps"][0]
    assert step["kl_per_token"] < 1e-6, step    # our per-answer-token KL(policy || reference)
    assert abs(step["kl"]) < 1e-6, step          # trlx's own mean_kl
