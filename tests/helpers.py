"""Helpers several test files share (plain functions; the fixtures are in conftest.py):

    write_jsonl, GOOD, fake_model   input files and folders for the entry modules' unit tests
    hub_cache_with                  a private Hugging Face cache holding a local model under a hub id
    dry_run_output                  the resolved settings and launch command a --dry-run printed
    module_help, heavy_imports      an entry module's --help, and what importing it loads
    tb_scalars                      every scalar point a run logged to tensorboard
    job_env, start_job, wait_for    a training job as a subprocess that a test kills or signals at a chosen point
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rlhf_overlay import PROJECT_ROOT

# one preference row that every data reader accepts
GOOD = {"prompt": "Human: hi Assistant:", "chosen": "hello, how can I help?", "rejected": "go away"}

# the make variables a job reads from its environment: a test's own job must not inherit them from the caller
JOB_VARIABLES = ("MODEL", "ACTOR", "CRITIC", "REWARD", "RM", "DATA", "OUTPUT", "OVERWRITE", "RESUME", "NUM_GPUS",
                 "ZERO_STAGE", "HOSTFILE", "CHECKPOINT_EVERY", "CHECKPOINT_MINUTES", "KEEP_CHECKPOINTS")


def write_jsonl(path: Path, rows: list) -> Path:
    """One JSON object per line (a row given as a string is written as it is: broken rows for the error tests)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def fake_model(folder: Path, reward_model: bool = False) -> Path:
    """A folder that passes the entry modules' model checks (a LLaMA config.json) without weights to load; with
    reward_model, the pytorch_model.bin a DeepSpeed-Chat critic has."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    if reward_model:
        (folder / "pytorch_model.bin").write_bytes(b"not read by these tests")
    return folder


# settings every DeepSpeed-Chat job refuses alike (dschat_jobs.launch.DSChatConfig): (kwargs, the message's regex)
DSCHAT_BAD_SETTINGS = [
    (dict(recipe="huge"), r"recipe='huge': choose one of tiny, llama2-7b"),
    (dict(dtype="fp8"), r"dtype='fp8': choose one of"),
    (dict(zero_stage=4), r"zero_stage=4: ZeRO stages are 0, 1, 2 or 3"),
    (dict(lora_dim=-1), r"lora_dim=-1: must be >= 0"),
    (dict(batch_size=0), r"batch_size=0: must be >= 1"),
]


def assert_dschat_keeps_a_non_empty_output(main, tmp_path: Path, capsys) -> None:
    """A DeepSpeed-Chat entry's main() refuses a non-empty OUTPUT without OVERWRITE=1 (one error: line, exit 2)
    and leaves what is there untouched. Skips when upstream DeepSpeed-Chat is not set up (that check comes first)."""
    import pytest

    data = write_jsonl(tmp_path / "prefs.jsonl", [GOOD] * 4)
    model = fake_model(tmp_path / "model")
    out = tmp_path / "out"
    out.mkdir()
    (out / "pytorch_model.bin").write_text("an earlier model")
    rc = main(["--model", str(model), "--data", str(data), "--output", str(out)])
    err = capsys.readouterr().err
    if rc == 2 and "not set up" in err:
        pytest.skip("upstream DeepSpeed-Chat not set up: the output check comes after the upstream check")
    assert rc == 2 and "is not empty" in err and "OVERWRITE=1" in err, err
    assert (out / "pytorch_model.bin").read_text() == "an earlier model"


def hub_cache_with(hf_home: Path, hub_id: str, folder: Path) -> Path:
    """Lay a local model folder out as the download of `hub_id` in a private HF cache (hub/models--org--name/
    {refs/main, snapshots/<rev>/}, as rlhf_overlay/engine/hub_standins.py does): with HF_HOME=hf_home and
    HF_HUB_OFFLINE=1, `from_pretrained(hub_id)` loads it. Returns hf_home."""
    import shutil

    repo = Path(hf_home) / "hub" / f"models--{hub_id.replace('/', '--')}"
    revision = "0" * 40
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return Path(hf_home)


def dry_run_output(out: str) -> tuple[dict, str]:
    """(resolved settings, launch command) of a --dry-run's output (rlhf_overlay.settings.print_dry_run)."""
    import yaml

    lines = out.rstrip().splitlines()
    start, end = lines.index("# resolved settings"), max(i for i, ln in enumerate(lines) if ln.startswith("# launch"))
    return yaml.safe_load("\n".join(lines[start + 1: end])), lines[-1]


def module_help(module: str) -> str:
    """The output of `python -m module --help` (which must succeed)."""
    res = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60,
                         cwd=PROJECT_ROOT)
    assert res.returncode == 0, res.stderr
    return res.stdout


def heavy_imports(module: str, heavy=("torch", "deepspeed", "transformers")) -> list[str]:
    """Which of `heavy` importing module loads, in a fresh interpreter (entry modules import them inside main(), so
    --help and argument errors come at once)."""
    res = subprocess.run([sys.executable, "-c", f"import json, sys, {module}; "
                          f"print(json.dumps(sorted(m for m in {tuple(heavy)!r} if m in sys.modules)))"],
                         capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.splitlines()[-1])


def tb_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value), ...] of the tensorboard event files in folder (not its subfolders), every point (no
    sampling), read as tensorboard reads a run folder (a restart's purge_step drops the points logged after it)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def job_env(**extra: str) -> dict[str, str]:
    """This process's environment without the make variables, one thread per process (tiny models)."""
    env = {k: v for k, v in os.environ.items() if k not in JOB_VARIABLES}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def start_job(cmd: list[str], log: Path) -> subprocess.Popen:
    """cmd from the project folder in its own process group (os.killpg reaches the launcher and its workers), its
    output into log."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=job_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def run_printed_resume(log_text: str, expected: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    """The last `resume with: <command>` line of an interrupted run's output is `expected`; it runs as printed (a
    shell, from the project folder) and succeeds. Returns its result."""
    import re
    printed = re.findall(r"^resume with: (.+)$", log_text, re.M)
    assert printed and printed[-1] == expected, printed
    res = subprocess.run(printed[-1], shell=True, cwd=PROJECT_ROOT, env=job_env(), capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def wait_for(proc: subprocess.Popen, what, timeout: float = 600) -> None:
    """Poll until what() is true; fails if the job ends first or after timeout seconds."""
    t0 = time.time()
    while not what():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the awaited point"
        assert time.time() - t0 < timeout, f"not reached within {timeout} s"
        time.sleep(0.05)
