"""Step times of DeepSpeed-Chat step 2 (reward model) and step 3 (PPO) on the tiny LLaMA: our overlays vs the
unmodified upstream scripts at the pin, same arguments, same launcher, CPU.

    python benchmarks/bench_dschat.py                       # 3 repetitions each, ~6 min on 2 cores
    python benchmarks/bench_dschat.py --reps 3 --json runs/bench-dschat.json

How it measures: both sides run `deepspeed --num_gpus 1 main.py ...` from their own tree (ours: upstream/ =
pin + overlays; upstream: a fresh sparse checkout of the pin, nothing applied). A sitecustomize.py put on
PYTHONPATH for both wraps DeepSpeedEngine.step and records when each engine steps; the step time is the median
interval between consecutive steps of the first engine that steps (RM: the reward model; PPO: the actor, so one
interval = generation + experience + actor and critic updates). Start-up, data loading and evaluation before the
first step are excluded; no evaluation runs between steps (eval_interval 0 on both sides). Wall time is shown
for the best and the median run; on a machine shared with other jobs the CPU time of the rank process per step
(time.process_time) is the steadier comparison.

Settings both sides share, chosen to run on the pinned upstream unchanged: bf16 (upstream's default fp16 does
not run on CPU), ZeRO 0, no gradient checkpointing (upstream's critic LoRA + checkpointing crashes), upstream's
local/jsonfile data for upstream (the same rows as ours, copied to its data/{train,eval}.json).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

PIN = "83757d9c937daabd1089a08051061706cb73900d"

SITECUSTOMIZE = r'''
# bench_dschat: record when each DeepSpeedEngine steps (patched right after deepspeed.runtime.engine loads).
import atexit, importlib.abc, importlib.machinery, json, os, sys, time
_out = os.environ.get("BENCH_STEP_LOG")
_times = {}


def _patch(module):
    original = module.DeepSpeedEngine.step

    def step(self, *a, **k):
        result = original(self, *a, **k)
        _times.setdefault(id(self), []).append((time.perf_counter(), time.process_time()))
        return result
    module.DeepSpeedEngine.step = step


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "deepspeed.runtime.engine":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)
        spec.loader.exec_module = exec_and_patch
        return spec


def _dump():
    if _times:
        first = min(_times.values(), key=lambda ts: ts[0])
        with open(_out, "w") as f:
            json.dump({"step_times": first}, f)


if _out:
    sys.meta_path.insert(0, _Finder())
    atexit.register(_dump)
'''


def pristine_checkout(dest: Path) -> Path:
    """The pinned DeepSpeedExamples, sparse (DeepSpeed-Chat without assets/), nothing applied."""
    from rlhf_overlay.paths import upstream_dir
    source = upstream_dir("DeepSpeedExamples")
    run = lambda *a, **k: subprocess.run(a, check=True, capture_output=True, text=True, **k)  # noqa: E731
    run("git", "clone", "-q", "--no-checkout", "--shared", str(source), str(dest))
    run("git", "sparse-checkout", "set", "--no-cone", "/applications/DeepSpeed-Chat/",
        "!/applications/DeepSpeed-Chat/assets/", cwd=dest)
    run("git", "checkout", "-q", "--detach", PIN, cwd=dest)
    return dest / "applications" / "DeepSpeed-Chat"


def subset(source_folder: Path, dest: Path, sizes: dict[str, int]) -> Path:
    """The first rows of the tiny data's train/eval files, as JSONL (ours) — a fixed, small number of steps."""
    dest.mkdir(parents=True)
    for split, n in sizes.items():
        lines = [line for line in (source_folder / f"{split}.jsonl").read_text().splitlines() if line.strip()]
        (dest / f"{split}.jsonl").write_text("\n".join(lines[:n]) + "\n")
    return dest


def write_jsonfile_data(dschat: Path, source_folder: Path) -> None:
    """Upstream's local/jsonfile reads <DeepSpeed-Chat>/data/{train,eval}.json (JSON lists): the same rows."""
    data = dschat / "data"
    data.mkdir(exist_ok=True)
    for split in ("train", "eval"):
        rows = [json.loads(line) for line in (source_folder / f"{split}.jsonl").read_text().splitlines()
                if line.strip()]
        (data / f"{split}.json").write_text(json.dumps(rows))


def timed_run(dschat: Path, step_folder: str, args: list[str], work: Path, label: str) -> dict:
    from rlhf_overlay.runtime.runs import free_port, runtime_env
    env = runtime_env(cpu=True)
    stub = work / "stub"
    stub.mkdir(exist_ok=True)
    (stub / "sitecustomize.py").write_text(SITECUSTOMIZE)
    step_log = work / f"{label}.steps.json"
    step_log.unlink(missing_ok=True)
    env["PYTHONPATH"] = os.pathsep.join([str(stub), str(dschat), env["PYTHONPATH"]])
    env["BENCH_STEP_LOG"] = str(step_log)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
           "main.py", *args]
    log = work / f"{label}.log"
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=dschat / step_folder, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    if rc != 0 or not step_log.is_file():
        raise RuntimeError(f"{label}: exit code {rc}; see {log}")
    stamps = json.loads(step_log.read_text())["step_times"]
    intervals = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]
    return {"label": label, "steps": len(stamps), "median_step_s": statistics.median(intervals),
            "mean_step_s": statistics.fmean(intervals), "median_cpu_step_s": statistics.median(cpu), "wall_s": wall}


def ours_and_upstream(kind: str, step_folder: str, data: Path, common: list[str], reps: int, ours: Path,
                      upstream: Path, work: Path) -> dict[str, list[dict]]:
    """`reps` timed runs of each side, alternating (upstream first): the same arguments, each side's data format
    (ours reads the JSONL folder, upstream local/jsonfile). {"<kind>_ours": [...], "<kind>_upstream": [...]}."""
    results: dict[str, list[dict]] = {f"{kind}_ours": [], f"{kind}_upstream": []}
    for rep in range(reps):
        write_jsonfile_data(upstream, data)
        for side, short, tree, data_path in (("upstream", "up", upstream, "local/jsonfile"),
                                             ("ours", "ours", ours, str(data))):
            results[f"{kind}_{side}"].append(timed_run(
                tree, step_folder, ["--data_path", data_path, *common, "--data_output_path",
                                    str(work / f"data-{short}-{kind}-{rep}"), "--output_dir",
                                    str(work / f"{kind}-{short}-{rep}")], work, f"{kind}-{side}-{rep}"))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="repetitions of each run (alternating ours/upstream)")
    p.add_argument("--ppo-steps", type=int, default=15, help="PPO steps per run (the tiny prompts give 16)")
    p.add_argument("--json", default="", help="also write the results here")
    a = p.parse_args(argv)

    from rlhf_overlay.paths import dschat_dir
    from rlhf_overlay.data.tiny_assets import ensure_tiny_assets
    assets = Path(ensure_tiny_assets())
    model = assets / "models" / "tiny-llama"
    ours = dschat_dir()
    if not (ours / "dschat" / "utils" / "run_checks.py").is_file():
        print(f"error: {ours} is not set up with our overlays; run `make upstream`", file=sys.stderr)
        return 2
    # a `lock` left in the extension folder by a killed run would make every timed run below hang silently
    from rlhf_overlay.errors import UserError
    from rlhf_overlay.runtime.runs import runtime_env
    from rlhf_overlay.runtime.waits import check_torch_extensions
    try:
        check_torch_extensions(runtime_env(cpu=True)["TORCH_EXTENSIONS_DIR"])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-dschat-"))
    try:
        upstream = pristine_checkout(work / "pristine")
        preference = subset(assets / "data" / "preference", work / "preference", {"train": 256, "eval": 64})
        prompts = subset(assets / "data" / "prompts", work / "prompts", {"train": 64, "eval": 16})
        rm_common = ["--data_split", "0,1,0", "--model_name_or_path", str(model), "--per_device_train_batch_size", "8",
                     "--per_device_eval_batch_size", "8", "--max_seq_len", "48", "--learning_rate", "5e-4",
                     "--num_padding_at_beginning", "0", "--dtype", "bf16", "--zero_stage", "0", "--eval_iters", "2",
                     "--deepspeed", "--seed", "1234"]
        results = ours_and_upstream("rm", "training/step2_reward_model_finetuning", preference, rm_common, a.reps,
                                    ours, upstream, work)
        rm_dir = work / "rm-ours-0"
        ppo_common = ["--data_split", "0,0,1", "--actor_model_name_or_path", str(model),
                      "--critic_model_name_or_path", str(rm_dir), "--num_padding_at_beginning", "0",
                      "--per_device_generation_batch_size", "4", "--per_device_training_batch_size", "4",
                      "--max_answer_seq_len", "16", "--max_prompt_seq_len", "16", "--dtype", "bf16",
                      "--actor_zero_stage", "0", "--critic_zero_stage", "0", "--actor_lora_dim", "8",
                      "--critic_lora_dim", "8", "--actor_lora_module_name", "layers.",
                      "--critic_lora_module_name", "layers.", "--only_optimize_lora", "--num_warmup_steps", "0",
                      "--enable_test_mode", "--test_stop_step", str(a.ppo_steps), "--deepspeed", "--seed", "1234"]
        results.update(ours_and_upstream("ppo", "training/step3_rlhf_finetuning", prompts, ppo_common, a.reps,
                                         ours, upstream, work))
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    # Per run: the median step interval. Across runs: the best (least disturbed by other load on a shared
    # machine) and the median.
    summary = {k: {"best_step_s": min(r["median_step_s"] for r in v),
                   "median_step_s": statistics.median(r["median_step_s"] for r in v),
                   "cpu_step_s": statistics.median(r["median_cpu_step_s"] for r in v),
                   "steps_per_run": v[0]["steps"], "wall_s": statistics.median(r["wall_s"] for r in v),
                   "runs": v} for k, v in results.items()}
    print(f"{'':14} {'wall best':>10} {'wall median':>12} {'CPU median':>11} {'steps/run':>10} {'wall/run':>9}")
    for k, s in summary.items():
        print(f"{k:14} {s['best_step_s']*1000:7.1f} ms {s['median_step_s']*1000:9.1f} ms "
              f"{s['cpu_step_s']*1000:8.1f} ms {s['steps_per_run']:10d} {s['wall_s']:8.1f}s")
    for kind in ("rm", "ppo"):
        ours, up = summary[f"{kind}_ours"], summary[f"{kind}_upstream"]
        ratios = {"best": ours["best_step_s"] / up["best_step_s"], "median": ours["median_step_s"] / up["median_step_s"],
                  "cpu": ours["cpu_step_s"] / up["cpu_step_s"]}
        print(f"{kind}: ours / upstream step time = {ratios['best']:.3f} (wall, best runs), {ratios['median']:.3f} "
              f"(wall, median runs), {ratios['cpu']:.3f} (CPU time of the rank process)")
        summary[f"{kind}_ratios"] = ratios
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
