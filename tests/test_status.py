"""status.json, final model folders, checkpoint folders and OVERWRITE=1 of a run folder (unit, no training).

A run folder says what state it is in (running / completed / failed / interrupted) and how to resume it; the failure
line (exit code, signal) reaches training.log; model folders and checkpoints are whole or absent; a new run into an
incomplete run's folder is refused with the resume command, and OVERWRITE=1 moves the old run aside, by name.
"""
from __future__ import annotations

import json
import signal

import pytest

from rlhf_overlay.runtime import checkpoints as ck
from rlhf_overlay.runtime import runs
from rlhf_overlay.runtime import status
from rlhf_overlay.errors import ConfigError


def test_status_is_merged_and_written_atomically(tmp_path):
    status.start(tmp_path, "ppo-bloom", "rlhf_overlay.trlx_jobs.ppo", total_steps=40)
    st = status.write_status(tmp_path, last_step=10, checkpoint=str(tmp_path / "checkpoints" / "step-10"))
    assert st["state"] == "running" and st["target"] == "ppo-bloom" and st["last_step"] == 10
    assert st["resume_command"] == f"make ppo-bloom RESUME={tmp_path}"
    assert json.loads((tmp_path / "status.json").read_text()) == st
    assert not list(tmp_path.glob(".status.json.tmp-*"))
    with pytest.raises(ValueError, match="not one of"):
        status.write_status(tmp_path, state="done")
    assert status.resume_command("ppo-llama", tmp_path / "a b", "rlhf_overlay.trlx_jobs.ppo") == \
        f"python -m rlhf_overlay.trlx_jobs.ppo --resume '{tmp_path / 'a b'}'"


def test_failure_line_goes_to_the_log_and_status(tmp_path):
    status.start(tmp_path, "ppo-bloom", "rlhf_overlay.trlx_jobs.ppo", total_steps=4)
    status.write_status(tmp_path, last_step=2, checkpoint=str(tmp_path / "checkpoints" / "step-2"))
    (tmp_path / "training.log").write_text("step 2/4 ...\n")
    st = status.finish(tmp_path, -signal.SIGKILL)
    assert st["state"] == "failed" and st["signal"] == "SIGKILL" and st["exit_code"] == -9
    log = (tmp_path / "training.log").read_text()
    assert "run failed: killed by signal SIGKILL" in log and f"make ppo-bloom RESUME={tmp_path}" in log
    assert status.describe_exit(137) == ("exit code 137 (SIGKILL)", "SIGKILL")
    assert status.describe_exit(1) == ("exit code 1", None)
    # the workers marked the run interrupted (SIGTERM at a step boundary): it stays interrupted
    status.write_status(tmp_path, state="interrupted", reason="stopped by SIGTERM after step 2")
    assert status.finish(tmp_path, 143)["state"] == "interrupted"
    assert status.finish(tmp_path, 0)["state"] == "completed"
    assert status.incomplete_reason(tmp_path) is None


def test_final_folder_is_whole_or_absent(tmp_path):
    target = tmp_path / "policy"
    with pytest.raises(RuntimeError):
        with status.final_folder(target) as partial:
            (partial).mkdir()
            (partial / "config.json").write_text("{}")
            raise RuntimeError("killed while writing the weights")
    assert not target.exists()
    with status.final_folder(target) as partial:
        partial.mkdir()
        (partial / "model.safetensors").write_text("w")
    assert (target / "model.safetensors").read_text() == "w" and not partial.exists()


def test_checkpoints_commit_keep_and_ignore_half_written(tmp_path):
    for step in (1, 2, 3):
        tmp = ck.tmp_dir(tmp_path, step)
        tmp.mkdir(parents=True)
        (tmp / "weights").write_text(str(step))
        with pytest.raises(RuntimeError, match="not complete"):   # no trainer_state.json yet: never committed
            ck.commit(tmp_path, step, keep=2)
        ck.write_state(tmp, {"step": step})
        ck.commit(tmp_path, step, keep=2)
    assert [s for s, _ in ck.complete_checkpoints(tmp_path)] == [2, 3]          # KEEP_CHECKPOINTS=2
    half = ck.tmp_dir(tmp_path, 4)
    half.mkdir()
    (half / "weights").write_text("half")                                      # killed before trainer_state.json
    assert ck.newest_checkpoint(tmp_path)[0] == 3
    assert ck.remove_partial(tmp_path) == [".tmp-step-4"] and not half.exists()
    with pytest.raises(ConfigError, match="KEEP_CHECKPOINTS"):
        ck.validate_schedule(1, 0, 0)
    sched = ck.Schedule(every=2, minutes=0, keep=2)
    assert [sched.due(s) for s in (1, 2, 3, 4)] == [False, True, False, True]
    timed = ck.Schedule(every=0, minutes=1e-9)
    assert timed.due(1) and not ck.Schedule(every=0, minutes=60).due(1)


def test_incomplete_run_is_refused_with_its_resume_command_and_overwrite_moves_it_aside(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    status.start(out, "ppo-bloom", "rlhf_overlay.trlx_jobs.ppo", total_steps=40)
    status.write_status(out, state="interrupted", last_step=20, checkpoint=str(out / "checkpoints" / "step-20"))
    (out / "metrics.json").write_text('{"eval_acc": 1.0}')
    with pytest.raises(runs.RunDirError, match=rf"incomplete run \(interrupted at step 20\); resume it with: "
                                               rf"make ppo-bloom RESUME={out}"):
        runs.prepare_run_dir("ppo-bloom", output=out)
    from rlhf_overlay.runtime import preflight
    with pytest.raises(preflight.PreflightError, match="incomplete run .* OVERWRITE=1"):
        preflight.check_output(str(out), False)
    assert runs.prepare_run_dir("ppo-bloom", output=out, overwrite=True) == out.resolve()
    backups = list(tmp_path.glob("run.replaced-*"))
    assert len(backups) == 1 and (backups[0] / "metrics.json").is_file()       # nothing of the old run is lost ...
    assert not (out / "metrics.json").exists() and not (out / "status.json").exists()  # ... or mixed into the new
    assert f"moved to {backups[0]}" in capsys.readouterr().err


def test_report_shows_the_status(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    from rlhf_overlay.tools import report
    w = SummaryWriter(str(tmp_path / "tensorboard"))
    for step in (1, 2, 3):
        w.add_scalar("ppo/reward_mean", 0.1 * step, step)
    w.close()
    status.start(tmp_path, "ppo-bloom", "rlhf_overlay.trlx_jobs.ppo", total_steps=40)
    status.write_status(tmp_path, state="interrupted", last_step=20, checkpoint=str(tmp_path / "checkpoints" / "step-20"),
                        reason="stopped by SIGTERM after step 20")
    assert report.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert ("Status: interrupted; newest checkpoint at step 20/40; stopped by SIGTERM after step 20; resume: make "
            f"ppo-bloom RESUME={tmp_path}") in out
    assert "Status: **interrupted**" in (tmp_path / "summary.md").read_text()
    status.finish(tmp_path, 0)
    assert report.status_line(tmp_path) == "Status: **completed**; 40 steps"


def test_targets_without_checkpoints_have_a_status_without_resume_command(tmp_path):
    status.start(tmp_path, "rm-llama2", "rlhf_overlay.dschat_jobs.reward_model", resumable=False)
    (tmp_path / "training.log").write_text("")
    st = status.finish(tmp_path, 1)
    assert st["state"] == "failed" and st["resume_command"] is None and st["exit_code"] == 1
    assert status.incomplete_reason(tmp_path) == "it holds an incomplete run (failed); it has no complete checkpoint " \
                                                 "to resume from"
    assert (tmp_path / "training.log").read_text().strip() == "[rlhf-overlay] run failed: exit code 1"


def test_ctrl_c_while_the_job_runs_ends_the_status_and_the_log(tmp_path, capsys):
    status.start(tmp_path, "ppo-bloom", "rlhf_overlay.trlx_jobs.ppo", total_steps=40)
    status.write_status(tmp_path, last_step=10, checkpoint=str(tmp_path / "checkpoints" / "step-10"))
    (tmp_path / "training.log").write_text("")
    with pytest.raises(KeyboardInterrupt):
        with status.interrupt_finishes(tmp_path):   # the job died before its step boundary: no worker said so
            raise KeyboardInterrupt
    st = status.read_status(tmp_path)
    assert st["state"] == "interrupted" and st["signal"] == "SIGINT" and st["exit_code"] == 130
    assert capsys.readouterr().out == f"resume with: make ppo-bloom RESUME={tmp_path}\n"
    assert "run interrupted: exit code 130 (SIGINT)" in (tmp_path / "training.log").read_text()
