"""Two ranks through the real launchers (issue 7): rm-llama2 (DeepSpeed's launcher driven by a `localhost slots=2`
hostfile, ZeRO-2), ppo-llama2 (NUM_GPUS=2, ZeRO-2), rm-bloom (torchrun + HF Trainer) and ppo-smoke-test (accelerate;
also with ZeRO-2, and as two "machines" joined through per-machine accelerate configs), each on 2 CPU processes
with RANK_REPORT=1.

For every run: both ranks took part (world size 2), they trained on different samples, exactly one copy of each
output exists (written by rank 0), progress lines are not doubled, the quality bar of the 1-rank tests holds,
and the saved model scores as the run reported. DeepSpeed ZeRO-2 must shard the optimizer state: each rank
holds about half of the Adam moments. The data files are deduplicated so that "two ranks saw the same sample"
cannot come from two identical rows.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from rlhf_overlay import PROJECT_ROOT

from rlhf_overlay.runtime import rank_report
from helpers import wait_for
pytestmark = [pytest.mark.upstream, pytest.mark.slow]
TARGET_VARS = ("MODEL", "ACTOR", "CRITIC", "RM", "REWARD", "DATA", "OUTPUT", "OVERWRITE", "ZERO_STAGE", "LORA_DIM",
               "NUM_GPUS", "HOSTFILE", "RANK_REPORT", "RLHF_OVERLAY_RANK_REPORT", "RLHF_OVERLAY_RUN_DIRS_FILE")


def make(target: str, **variables) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k not in TARGET_VARS}
    env.update(OMP_NUM_THREADS="1", RANK_REPORT="1", **{k: str(v) for k, v in variables.items()})
    t0 = time.time()
    res = subprocess.run(["make", "-s", target], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, f"make {target} failed:\n{res.stdout[-5000:]}\n{res.stderr[-5000:]}"
    return res, time.time() - t0


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def unique(rows: list[dict], key) -> list[dict]:
    seen, out = set(), []
    for r in rows:
        if key(r) not in seen:
            seen.add(key(r))
            out.append(r)
    return out


@pytest.fixture(scope="module")
def unique_data(tiny_assets, tmp_path_factory) -> dict[str, Path]:
    """Preference pairs with no repeated prompt+chosen or prompt+rejected text (train and eval disjoint; 192 eval
    pairs = 96 per rank = 6 full batches of 16, so DeepSpeed-Chat's mean of batch means is the plain mean), and
    640 distinct prompts for PPO."""
    from rlhf_overlay.data.synthetic import NEGATIVE, POSITIVE, TOPICS

    root = tmp_path_factory.mktemp("unique-data")
    pref = tiny_assets / "data" / "preference"
    rows = unique(jsonl(pref / "train.jsonl") + jsonl(pref / "eval.jsonl"), lambda r: (r["prompt"], r["chosen"]))
    rows = unique(rows, lambda r: (r["prompt"], r["rejected"]))
    assert len(rows) > 2000
    write_jsonl(root / "pref" / "eval.jsonl", rows[:192])
    write_jsonl(root / "pref" / "train.jsonl", rows[192:2192])
    prompts = [{"prompt": f"Human: is the {t} {w}? Assistant:"} for t in TOPICS for w in POSITIVE + NEGATIVE]
    write_jsonl(root / "prompts" / "train.jsonl", prompts)
    write_jsonl(root / "prompts" / "eval.jsonl", prompts[:16])
    return {"pref": root / "pref", "prompts": root / "prompts"}


def ranks(run: Path, tag: str, world: int = 2) -> list[dict]:
    reports = rank_report.load(run / "ranks", tag)
    assert [r["rank"] for r in reports] == list(range(world)), f"one report per rank in {run / 'ranks'}"
    assert all(r["world_size"] == world for r in reports)
    return reports


def assert_disjoint_samples(reports: list[dict], first: int | None = None) -> None:
    """No sample trained on by two ranks (within the first `first` draws of each rank: one epoch)."""
    a, b = (set(r["samples"][:first]) for r in reports)
    assert a and b, "both ranks recorded samples"
    assert not a & b, f"{len(a & b)} sample(s) were used by both ranks: the data are not split per rank"


def assert_zero2_sharded(facts: list[dict]) -> None:
    """ZeRO-2 on 2 ranks: each rank owns half the fp32 master weights and half the Adam moments."""
    for f in facts:
        assert f["zero_stage"] == 2 and "DeepSpeedZeroOptimizer" in f["optimizer_classes"], f
        assert f["zero_partition_count"] == 2, f
        full = f["trainable_numel"]
        assert abs(f["zero_partition_numel"] - full / 2) <= 64, f          # DeepSpeed pads partitions a little
        assert f["optimizer_state_numel"]["exp_avg"] == f["zero_partition_numel"] < full, f
    assert sum(f["zero_partition_numel"] for f in facts) >= facts[0]["trainable_numel"]


def event_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("events.out.tfevents.*"))


def event_writers(folder: Path) -> set[str]:
    """The processes that wrote tensorboard files under `folder` (events.out.tfevents.<time>.<host>.<pid>.<n>)."""
    return {p.name.split(".")[-2] for p in event_files(folder)}


# ------------------------------------------------------------------------------------------- rm-llama2
@pytest.fixture(scope="module")
def rm_llama2(dschat_dir, unique_data, tmp_path_factory):
    """Through a hostfile of this machine (`localhost slots=2`): DeepSpeed's launcher starts 2 ranks, no ssh."""
    root = tmp_path_factory.mktemp("rm-llama2-2ranks")
    hosts = root / "hostfile"
    hosts.write_text("localhost slots=2\n")
    out = root / "run"
    res, seconds = make("rm-llama2", HOSTFILE=hosts, ZERO_STAGE=2, DATA=unique_data["pref"], OUTPUT=out)
    return out, res, seconds


def test_rm_llama2_two_ranks_learn_with_zero2_sharded_optimizer(rm_llama2):
    out, res, _ = rm_llama2
    assert "dist_world_size=2" in res.stdout
    results = json.loads((out / "model" / "eval_results.json").read_text())
    assert results["eval/acc"] >= 0.75, results                       # the 1-rank bar; chance is 0.5
    reports = ranks(out, "rm")
    assert_disjoint_samples(reports)
    assert len(reports[0]["samples"]) == len(reports[1]["samples"]) == 60 * 8 * 2   # 60 steps x 8 pairs x 2 rows
    assert_zero2_sharded([r["optimizers"]["rm"] for r in reports])


def test_rm_llama2_two_ranks_write_one_copy_and_one_progress_stream(rm_llama2):
    out, res, _ = rm_llama2
    assert [p.name for p in (out / "model").glob("*.bin")] == ["pytorch_model.bin"]
    assert len(event_files(out / "tensorboard")) == 1
    assert (out / "report.png").is_file() and (out / "summary.md").is_file()
    assert len(re.findall(r"^Iter 20: c_scores", res.stdout, re.M)) == 1, "evaluation printed by rank 0 only"
    assert len(re.findall(r"saving model", res.stdout)) == 1


def test_rm_llama2_saved_model_scores_as_the_run_reported(rm_llama2, unique_data, tmp_path):
    """Reload the saved critic with transformers only (make eval-rm) on the same 192 eval pairs: the mean chosen
    and rejected scores equal what the 2-rank run all-reduced."""
    from rlhf_overlay.tools import eval_rm
    out, _, _ = rm_llama2
    results = json.loads((out / "model" / "eval_results.json").read_text())
    cfg = eval_rm.EvalConfig(rm=str(out / "model"), data=str(unique_data["pref"] / "eval.jsonl"),
                             output=str(tmp_path / "eval"))
    metrics, _ = eval_rm.evaluate(cfg)
    assert metrics["pairs"] == 192
    assert metrics["mean_chosen"] == pytest.approx(results["eval/reward_score"], abs=1e-3)
    assert metrics["mean_rejected"] == pytest.approx(results["eval/rejected_score"], abs=1e-3)
    assert metrics["accuracy"] == pytest.approx(results["eval/acc"], abs=1 / 192)


# ------------------------------------------------------------------------------------------ ppo-llama2
@pytest.fixture(scope="module")
def ppo_llama2(rm_llama2, unique_data, tmp_path_factory):
    rm_out, _, _ = rm_llama2
    out = tmp_path_factory.mktemp("ppo-llama2-2ranks") / "run"
    res, seconds = make("ppo-llama2", NUM_GPUS=2, ZERO_STAGE=2, CRITIC=rm_out / "model",
                        DATA=unique_data["prompts"], OUTPUT=out)
    return out, res, seconds


def test_ppo_llama2_two_ranks_shard_actor_and_critic_and_split_prompts(ppo_llama2):
    out, res, _ = ppo_llama2
    assert "dist_world_size=2" in res.stdout
    results = json.loads((out / "ppo_results.json").read_text())
    from rlhf_overlay.dschat_jobs.ppo import TINY
    steps = TINY["max_steps"]                                            # the tiny default's length (40)
    assert results["ppo/steps"] == steps, results
    reports = ranks(out, "ppo")
    assert_disjoint_samples(reports)
    assert len(reports[0]["samples"]) == steps * 4                      # steps x 4 prompts per rank
    for model in ("actor", "critic"):
        assert_zero2_sharded([r["optimizers"][model] for r in reports])


def test_ppo_llama2_two_ranks_save_one_loadable_actor(ppo_llama2, tiny_assets):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, res, _ = ppo_llama2
    for sub in ("actor", "critic"):
        assert [p.name for p in (out / sub).glob("*.bin")] == ["pytorch_model.bin"]
    assert len(event_files(out / "tensorboard")) == 1
    assert len(re.findall(r"saving model", res.stdout)) == 1
    model = AutoModelForCausalLM.from_pretrained(out / "actor")
    tok = AutoTokenizer.from_pretrained(out / "actor")
    ids = tok("Human: is the river calm? Assistant:", return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    assert gen.shape[1] > ids.shape[1]
    # LoRA was merged into the saved actor: it differs from the base model it started from
    base = AutoModelForCausalLM.from_pretrained(tiny_assets / "models" / "tiny-llama")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.state_dict()[name], base.state_dict()[name])


# -------------------------------------------------------------------------------------------- rm-bloom
@pytest.fixture(scope="module")
def rm_bloom(trlx_dir, unique_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm-bloom-2ranks") / "run"
    res, seconds = make("rm-bloom", NUM_GPUS=2, DATA=unique_data["pref"], OUTPUT=out)
    return out, res, seconds


def test_rm_bloom_two_ranks_split_the_pairs_and_learn(rm_bloom):
    out, res, _ = rm_bloom
    m = json.loads((out / "metrics.json").read_text())
    assert m["eval_accuracy"] >= 0.75 > 0.5 == m["chance_accuracy"], m
    assert m["pairs_per_step"] == 2 * json.loads((out / "config.json").read_text())["reward_model"]["batch_size"]
    reports = ranks(out, "rm")
    # accelerate evens out the last, partial batch by repeating early samples: compare before it
    assert_disjoint_samples(reports, first=2000 // 2 - 64)
    n = len(reports[0]["samples"])
    assert n == len(reports[1]["samples"]) and 2 * n >= 2000 - 64, "together the ranks cover the epoch once"
    assert len(re.findall(r"^eval accuracy before training", res.stdout, re.M)) == 1


def test_rm_bloom_two_ranks_write_one_copy_that_scores_as_reported(rm_bloom, unique_data, tmp_path):
    from rlhf_overlay.tools import eval_rm
    out, _, _ = rm_bloom
    assert sorted(p.name for p in (out / "reward_model").glob("*.safetensors")) == [
        "model.safetensors", "value_head.safetensors"]
    assert event_files(out / "tensorboard") and len(event_writers(out / "tensorboard")) == 1, "rank 0 writes all"
    m = json.loads((out / "metrics.json").read_text())
    metrics, _ = eval_rm.evaluate(eval_rm.EvalConfig(rm=str(out / "reward_model"),
                                                     data=str(unique_data["pref"] / "eval.jsonl"),
                                                     output=str(tmp_path / "eval")))
    assert metrics["pairs"] == m["eval_pairs"] == 192
    # at most one pair apart (a near-tie scored in another batch shape); compared as pair counts, since
    # 1.0 - 191/192 exceeds 1/192 by a rounding error
    assert abs(round(metrics["accuracy"] * 192) - round(m["eval_accuracy"] * 192)) <= 1, (metrics, m)


# -------------------------------------------------------------------------------------- ppo-smoke-test
@pytest.fixture(scope="module")
def smoke(trlx_dir, tiny_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke-2ranks") / "run"
    res, seconds = make("ppo-smoke-test", NUM_GPUS=2, OUTPUT=out)
    return out, res, seconds


def test_smoke_test_on_two_ranks_still_raises_the_reward(smoke):
    out, res, _ = smoke
    steps = [ln for ln in res.stdout.splitlines() if re.match(r"step +\d+/40 +mean reward", ln)]
    assert len(steps) == 40, "one progress line per PPO step, not one per rank"
    assert "PASS: the mean reward rose" in res.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["reward_last"] > m["reward_first"] + 0.1, m
    assert json.loads((out / "config.json").read_text())["launch"]["num_processes"] == 2


def test_smoke_test_ranks_draw_different_prompts_and_write_once(smoke, tiny_assets):
    out, _, _ = smoke
    reports = ranks(out, "ppo")
    rows = len(jsonl(tiny_assets / "data" / "prompts" / "train.jsonl"))
    # within the first epoch of the prompt loader, before accelerate evens out its last batch with repeats
    assert_disjoint_samples(reports, first=rows // 2 - 64)
    assert all(len(r["samples"]) == 40 * 32 for r in reports)   # each rank: 40 steps x 32 rollouts
    top = [p for p in event_files(out / "tensorboard") if p.parent == out / "tensorboard"]
    assert len(top) == 1, "the project's scalars are written once"
    assert len(event_writers(out / "tensorboard")) == 1, "by one process (rank 0), trlx's own logs included"
    assert sorted(p.name for p in (out / "policy").glob("*.safetensors")) == ["model.safetensors"]


def sampled_rule_reward(model_dir: Path, prompts: list[str], seed: int = 0) -> float:
    """Mean rule reward of 16-token samples (as trlx samples: top_k 0, top_p 1) from a saved policy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_overlay.data.synthetic import rule_reward

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    enc = tok(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=True, top_k=0, top_p=1.0,
                             pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    return sum(rule_reward(texts)) / len(texts)


def test_smoke_test_saved_policy_is_the_trained_one(smoke, tiny_assets):
    """Reload the policy rank 0 saved and sample from it: its reward matches what the 2-rank run reported at the
    end, well above the base model's."""
    out, _, _ = smoke
    prompts = [r["prompt"] for r in jsonl(tiny_assets / "data" / "prompts" / "eval.jsonl")][:32]
    m = json.loads((out / "metrics.json").read_text())
    trained = sampled_rule_reward(out / "policy", prompts)
    base = sampled_rule_reward(tiny_assets / "models" / "tiny-bloom", prompts)
    assert trained > base + 0.15, (base, trained)
    assert trained == pytest.approx(m["reward_last"], abs=0.1), (trained, m["reward_last"])


def test_smoke_test_with_accelerate_deepspeed_zero2_on_two_ranks_shards(trlx_dir, tmp_path):
    """The accelerate + DeepSpeed path of trlx (configs/accelerate/zero2.yaml) on 2 CPU ranks: the reward still
    rises and each rank owns half of the policy's optimizer state."""
    out = tmp_path / "run"
    res, _ = make("ppo-smoke-test", NUM_GPUS=2, ZERO_STAGE=2, OUTPUT=out)
    assert "PASS: the mean reward rose" in res.stdout
    assert_zero2_sharded([r["optimizers"]["policy"] for r in ranks(out, "ppo")])
    assert len(event_writers(out / "tensorboard")) == 1


def test_smoke_test_over_two_machines_joined_with_generated_accelerate_configs(trlx_dir, tmp_path):
    """The several-node flow on one box: a hostfile of two names of this machine, `make ppo-smoke-test HOSTFILE=`
    on the first (it writes one accelerate config per machine and waits), `make ppo-join` for the second."""
    hosts = tmp_path / "hostfile"
    hosts.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in TARGET_VARS}
    env.update(OMP_NUM_THREADS="1", RANK_REPORT="1")
    first = subprocess.Popen(["make", "-s", "ppo-smoke-test", f"HOSTFILE={hosts}", f"OUTPUT={out}"], cwd=PROJECT_ROOT,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        config = out / "accelerate" / "machine-1.yaml"
        wait_for(first, config.is_file, timeout=150)   # the first machine writes the per-machine configs
        joined = subprocess.run(["make", "-s", "ppo-join", f"RUN={out}", "MACHINE_RANK=1"], cwd=PROJECT_ROOT,
                                env=env, capture_output=True, text=True, timeout=600)
        stdout, _ = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert joined.returncode == 0, joined.stdout[-3000:] + joined.stderr[-3000:]
    assert first.returncode == 0, stdout[-5000:]
    assert f"make ppo-join RUN={out} MACHINE_RANK=1" in stdout, "the first machine prints how to join"
    assert "PASS: the mean reward rose" in stdout
    reports = ranks(out, "ppo")                                   # one rank on each machine, one world of 2
    assert_disjoint_samples(reports, first=2000 // 2 - 64)
    assert len(event_writers(out / "tensorboard")) == 1
    import yaml
    machines = [yaml.safe_load((out / "accelerate" / f"machine-{i}.yaml").read_text()) for i in (0, 1)]
    assert [m["machine_rank"] for m in machines] == [0, 1]
    assert all(m["num_machines"] == 2 and m["num_processes"] == 2 and m["main_process_ip"] == "localhost"
               for m in machines)


def test_rm_bloom_through_a_localhost_hostfile_uses_deepspeeds_launcher(trlx_dir, unique_data, tmp_path):
    """HOSTFILE on the HF-Trainer reward models: DeepSpeed's launcher (no ssh for this machine alone, no
    --local_rank for our worker) starts the hostfile's 2 slots; no ZeRO needed."""
    hosts = tmp_path / "hostfile"
    hosts.write_text("localhost slots=2\n")
    out = tmp_path / "run"
    res, _ = make("rm-bloom", HOSTFILE=hosts, DATA=unique_data["pref"], OUTPUT=out)
    assert "deepspeed.launcher.launch" in res.stdout + (out / "training.log").read_text()
    reports = ranks(out, "rm")
    assert_disjoint_samples(reports, first=2000 // 2 - 64)
    assert json.loads((out / "metrics.json").read_text())["eval_accuracy"] >= 0.75
