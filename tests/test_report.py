"""Reports from tensorboard event files: a PNG with a panel per metric and a summary with the right numbers."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from rlhf_overlay.tools import report
def _fake_run(folder, reward_slope=1.0, subdir="tb"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "command.txt").write_text("cd /w && make ppo-smoke-test\n")
    (folder / "config.json").write_text(json.dumps({"model": "tiny-bloom", "steps": 5}))
    w = SummaryWriter(str(folder / subdir))
    for step in range(5):
        w.add_scalar("ppo/reward_mean", 0.1 + reward_slope * 0.1 * step, step)
        w.add_scalar("ppo/kl", 0.01 * step, step)
        w.add_scalar("rm/loss", 1.0 - 0.1 * step, step)
        w.add_scalar("trlx/own_metric", 3.0, step)
    w.close()
    return folder


def test_report_png_and_summary(tmp_path):
    run = _fake_run(tmp_path / "run-a")
    png, md = report.write_report([run])
    assert png == run / "report.png" and md == run / "summary.md"
    img = np.asarray(Image.open(png).convert("L"), dtype=float)
    # 4 metrics -> 2 rows x 3 columns at 5x3.2 inches, 80 dpi.
    assert img.shape == (512, 1200)
    assert img.std() > 10, "the image must not be blank"
    text = md.read_text()
    assert "| ppo/reward_mean | 5 | 0.1 | 0.5 | 0.5 | 4 |" in text
    assert "| rm/loss | 5 | 1 | 0.6 | 0.6 | 4 |" in text       # lower is better for a loss
    assert "| ppo/kl | 5 | 0 | 0.04 | 0 | 0 |" in text
    assert "make ppo-smoke-test" in text and "| model | `tiny-bloom` |" in text
    # common metrics come first, the framework's own after
    tags, left = report.choose_panels([report.read_scalars(run)])
    assert tags == ["rm/loss", "ppo/reward_mean", "ppo/kl", "trlx/own_metric"] and left == []


def test_two_runs_overlay_and_panel_cap(tmp_path):
    a, b = _fake_run(tmp_path / "a"), _fake_run(tmp_path / "b", reward_slope=2.0)
    png, md = report.write_report([a, b], out_dir=tmp_path / "cmp", max_panels=2)
    assert png.exists()
    text = md.read_text()
    assert "## a" in text and "## b" in text and "| ppo/reward_mean | 5 | 0.1 | 0.9 |" in text
    assert "Not drawn (over the panel cap; pass --max-panels): ppo/kl, trlx/own_metric" in text


def test_same_tag_in_two_folders_keeps_both(tmp_path):
    run = tmp_path / "run"
    for sub in ("actor", "critic"):
        w = SummaryWriter(str(run / sub))
        w.add_scalar("loss", 1.0 if sub == "actor" else 2.0, 0)
        w.close()
    scalars = report.read_scalars(run)
    assert set(scalars.series) == {"actor:loss", "critic:loss"}


def test_clear_errors(tmp_path, capsys):
    with pytest.raises(report.ReportError, match="does not exist"):
        report.write_report([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(report.ReportError, match="no tensorboard event files"):
        report.write_report([tmp_path / "empty"])
    w = SummaryWriter(str(tmp_path / "started"))
    w.flush()
    w.close()
    with pytest.raises(report.ReportError, match="no scalars yet"):
        report.write_report([tmp_path / "started"])
    assert report.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no tensorboard event files" in err and err.count("\n") == 1
    assert report.main([]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert report.main(["--max-panels", "many", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: argument --max-panels: invalid int value: 'many'")


def test_run_in_progress_can_be_reported(tmp_path):
    w = SummaryWriter(str(tmp_path / "live"))
    w.add_scalar("ppo/reward_mean", 0.2, 0)
    w.flush()  # writer still open, as during training
    png, md = report.write_report([tmp_path / "live"])
    assert "| ppo/reward_mean | 1 | 0.2 | 0.2 |" in md.read_text()
    w.close()


def test_help_is_instant():
    out = subprocess.run([sys.executable, "-m", "rlhf_overlay.tools.report", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--max-panels" in out


@pytest.mark.upstream
@pytest.mark.slow
def test_smoke_test_ends_with_a_report_showing_reward_rising(trlx_dir, tiny_assets, tmp_path):
    """`make ppo-smoke-test` writes report.png + summary.md into its run folder, and the summary's
    ppo/reward_mean row rises from start to end."""
    import os
    import re

    from rlhf_overlay import PROJECT_ROOT
    out = tmp_path / "smoke"
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL", "REWARD", "RM", "OVERWRITE")}
    res = subprocess.run(["make", "-s", "ppo-smoke-test"], cwd=PROJECT_ROOT, env=dict(env, OUTPUT=str(out)),
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"report: wrote {out}/report.png" in res.stdout
    img = np.asarray(Image.open(out / "report.png").convert("L"), dtype=float)
    assert img.std() > 10
    row = re.search(r"^\| ppo/reward_mean \| (\d+) \| ([-\d.e]+) \| ([-\d.e]+) \|", (out / "summary.md").read_text(),
                    re.M)
    assert row, (out / "summary.md").read_text()[:2000]
    points, start, end = int(row.group(1)), float(row.group(2)), float(row.group(3))
    assert points >= 20 and end > start + 0.1, (points, start, end)


def test_run_sh_reports_a_completed_run_also_when_the_job_fails_after_it(tmp_path):
    """training_scripts/run.sh writes report.png + summary.md into every run folder whose training completed, also
    when the job then exits non-zero (a PPO run that failed its tiny-world verdict exits 1 after a finished run),
    and keeps the job's exit code; a run that did not complete (crashed, status failed) gets no report."""
    import os
    import shutil

    from rlhf_overlay import PROJECT_ROOT
    scripts = tmp_path / "project" / "training_scripts"   # run.sh + lib.sh beside a stand-in job script
    scripts.mkdir(parents=True)
    for name in ("run.sh", "lib.sh"):
        shutil.copy(PROJECT_ROOT / "training_scripts" / name, scripts / name)
    done, crashed = _fake_run(tmp_path / "done"), _fake_run(tmp_path / "crashed")
    (done / "status.json").write_text(json.dumps({"state": "completed", "exit_code": 0}))
    (crashed / "status.json").write_text(json.dumps({"state": "failed", "exit_code": 1}))
    (scripts / "verdict_fails.sh").write_text(
        f'printf "%s\\n" "{done}" "{crashed}" >> "$RLHF_OVERLAY_RUN_DIRS_FILE"\n'
        'echo "FAIL: no clear rise" >&2\nexit 1\n')
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(PROJECT_ROOT))
    res = subprocess.run(["bash", str(scripts / "run.sh"), "verdict_fails"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"report: wrote {done}/report.png" in res.stdout, res.stdout + res.stderr
    assert (done / "report.png").is_file() and "| ppo/reward_mean | 5 |" in (done / "summary.md").read_text()
    assert not (crashed / "report.png").exists() and not (crashed / "summary.md").exists()
