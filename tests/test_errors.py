"""The error contract (rlhf_overlay.errors): every error meant for the user derives from UserError, and every entry
module prints it as ONE line `error: ...` on stderr with exit code 2 and no traceback — a bad flag, a bad settings
file, bad input; Ctrl-C is one line and exit 130."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_overlay import PROJECT_ROOT, errors
from rlhf_overlay.data import preference_data, tiny_assets
from rlhf_overlay.dschat_jobs import launch as dschat_launch
from rlhf_overlay.engine import lock, setup_engine
from rlhf_overlay.runtime import hostfile, runs
from rlhf_overlay.tools import chat, eval_rm, report
from rlhf_overlay.trlx_jobs import common as trlx_common


def test_user_errors_share_one_base():
    for cls in (lock.LockError, tiny_assets.AssetsError, eval_rm.EvalError, report.ReportError, chat.ChatError,
                preference_data.PreferenceDataError, setup_engine.SetupError, runs.RunDirError,
                hostfile.HostfileError, trlx_common.TrlxSetupError, errors.ConfigError, errors.UsageError):
        assert issubclass(cls, errors.UserError), cls
    assert dschat_launch.ConfigError is trlx_common.ConfigError is errors.ConfigError
    assert issubclass(errors.ConfigError, ValueError)          # callers that caught ValueError still do


# ---------------------------------------------------------------------------------------------- main_guard
def test_main_guard_turns_user_errors_and_ctrl_c_into_the_contract(capsys):
    @errors.main_guard
    def main(what):
        if what == "config":
            raise errors.ConfigError("batch_size=0: must be >= 1")
        if what == "usage":
            errors.ArgumentParser(prog="tool").parse_args(["--nope"])
        if what == "ctrl-c":
            raise KeyboardInterrupt
        if what == "bug":
            raise ZeroDivisionError("a bug keeps its traceback")
        return 0

    assert main("fine") == 0
    assert main("config") == 2
    assert capsys.readouterr().err == "error: batch_size=0: must be >= 1\n"
    assert main("usage") == 2
    assert capsys.readouterr().err == "error: unrecognized arguments: --nope (see `tool --help`)\n"
    assert main("ctrl-c") == 130
    assert capsys.readouterr().err.strip() == "error: interrupted (Ctrl-C)"
    with pytest.raises(ZeroDivisionError):
        main("bug")
    assert main.__name__ == "main"


def test_help_still_exits_zero(capsys):
    with pytest.raises(SystemExit) as e:
        errors.ArgumentParser(prog="tool").parse_args(["--help"])
    assert e.value.code == 0 and "usage: tool" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- every entry module
# module, the arguments it cannot go without (a bad flag comes after them), bad input, a word its message holds
ENTRY_MODULES = [
    ("rlhf_overlay.dschat_jobs.reward_model", [], ["--model", "/nonexistent/sft"], "no such model folder"),
    ("rlhf_overlay.dschat_jobs.ppo", [], ["--critic", "/nonexistent/rm"], "no such folder"),
    ("rlhf_overlay.dschat_jobs.dpo", [], ["--model", "/nonexistent/sft"], "no such model folder"),
    ("rlhf_overlay.trlx_jobs.reward_model", [], ["--model", "/nonexistent/sft"], "MODEL)='/nonexistent/sft': no such"),
    ("rlhf_overlay.trlx_jobs.ppo", [], ["--model", "/nonexistent/sft"], "MODEL)='/nonexistent/sft': no such"),
    ("rlhf_overlay.trlx_jobs.smoke_test", [], ["--model", "/nonexistent/sft"], "MODEL)='/nonexistent/sft': no such"),
    ("rlhf_overlay.tools.chat", ["--model", "m"], ["--model", "/nonexistent/actor", "--prompt", "hi"],
     "/nonexistent/actor"),
    ("rlhf_overlay.tools.eval_rm", [], ["--rm", "/nonexistent/rm"], "does not exist"),
    ("rlhf_overlay.tools.report", [], ["/nonexistent/run"], "does not exist"),
    ("rlhf_overlay.tools.pipeline", ["run", "--family", "bloom"],
     ["run", "--family", "llama2", "--megatron-sft", "/nonexistent/ckpt"], "MEGATRON_SFT="),
    ("rlhf_overlay.runtime.cluster", ["status"], ["run", "node-b"], "needs a command"),
    ("rlhf_overlay.runtime.waits", ["extensions"], ["extensions", ".", "ENV:RLHF_LOCK_TIMEOUT=abc"],
     "RLHF_LOCK_TIMEOUT='abc'"),
    ("rlhf_overlay.engine.hub_standins", [], ["--texts-from", "/nonexistent/test_x.py"], "no such file"),
    ("rlhf_overlay.data.preference_data", ["prefs.jsonl"], ["/nonexistent/prefs"], "no such file or folder"),
    ("rlhf_overlay.data.tiny_assets", [], ["--out", "/proc/no-such/assets"], "cannot create the assets folder"),
    ("rlhf_overlay.runtime.hostfile", ["accelerate-config", "--hostfile", "h", "--out", "o"],
     ["accelerate-config", "--hostfile", "/nonexistent/hosts", "--out", "o"], "HOSTFILE=/nonexistent/hosts"),
    ("rlhf_overlay.engine.upstream_tests", [], ["--suite", "nope", "--out", "out"], "--suite nope: unknown suite"),
    ("rlhf_overlay.engine.setup_engine", ["verify"], ["verify", "--lock", "/nonexistent/upstream.lock"],
     "/nonexistent/upstream.lock"),
    ("rlhf_overlay.tools.seed_launch", ["hub-default", "MODEL", "m", "--by", "x.sh"],
     ["hub-default", "MODEL", "/nonexistent/model", "--by", "x.sh"], "no such file or folder"),
]


def _assert_contract(rc: int, err: str, *words: str) -> None:
    assert rc == 2, (rc, err[-2000:])
    assert err.startswith("error: "), err[-2000:]
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-2000:]
    for w in words:
        assert w in err, err


def _main(module: str, args: list[str], tmp_path, monkeypatch, capsys) -> tuple[int, str]:
    """The module's main() in-process, in an empty folder; `ENV:NAME=value` arguments are environment variables."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path.parent / "hf"))
    for a in args:
        if a.startswith("ENV:"):
            monkeypatch.setenv(*a[4:].split("=", 1))
    capsys.readouterr()
    rc = importlib.import_module(module).main([a for a in args if not a.startswith("ENV:")])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("module", [m for m, _, _, _ in ENTRY_MODULES])
def test_every_entry_module_main_is_guarded(module):
    mod = importlib.import_module(module)
    assert getattr(mod.main, "__wrapped__", None) is not None, f"{module}.main is not decorated with main_guard"
    tail = Path(mod.__file__).read_text().rstrip().splitlines()[-2:]
    assert tail == ['if __name__ == "__main__":', "    sys.exit(main())"], tail


@pytest.mark.parametrize("module, needed", [(m, n) for m, n, _, _ in ENTRY_MODULES])
def test_a_bad_flag_is_one_error_line_exit_2(module, needed, tmp_path, monkeypatch, capsys):
    _assert_contract(*_main(module, needed + ["--no-such-flag"], tmp_path, monkeypatch, capsys), "--no-such-flag",
                     "--help")
    assert not any(tmp_path.iterdir())
    if needed:   # and leaving out what it needs is the same kind of error
        _assert_contract(*_main(module, [], tmp_path, monkeypatch, capsys), "required")


@pytest.mark.parametrize("module, args, word", [(m, a, w) for m, _, a, w in ENTRY_MODULES])
def test_bad_input_is_one_error_line_exit_2(module, args, word, tmp_path, monkeypatch, capsys):
    _assert_contract(*_main(module, args, tmp_path, monkeypatch, capsys), word)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("module, needed, key", [("rlhf_overlay.dschat_jobs.reward_model", [], "seed"),
                                                 ("rlhf_overlay.trlx_jobs.ppo", [], "steps"),
                                                 ("rlhf_overlay.tools.eval_rm", [], "batch_size"),
                                                 ("rlhf_overlay.tools.chat", ["--model", "m"], "seed")])
def test_a_bad_settings_file_is_one_error_line_exit_2(module, needed, key, tmp_path, monkeypatch, capsys):
    (tmp_path / "settings.yaml").write_text("no_such_key: 0.1\n")
    _assert_contract(*_main(module, needed + ["--config", "settings.yaml"], tmp_path, monkeypatch, capsys),
                     "settings.yaml: unknown key 'no_such_key'", "known keys:")
    (tmp_path / "settings.yaml").write_text(f"{key}: eight\n")
    _assert_contract(*_main(module, needed + ["--config", "settings.yaml"], tmp_path, monkeypatch, capsys),
                     f"settings.yaml: key '{key}': must be an integer, got 'eight'")
    _assert_contract(*_main(module, needed + ["--config", "missing.json"], tmp_path, monkeypatch, capsys),
                     "missing.json: no such file")


@pytest.mark.parametrize("module, args", [("rlhf_overlay.dschat_jobs.ppo", ["--batch-size", "many"]),
                                          ("rlhf_overlay.tools.report", ["/nonexistent/run"]),
                                          ("rlhf_overlay.data.tiny_assets", ["--out", "/proc/no-such/assets"]),
                                          ("toolkits.megatron_hf.convert", ["hf2mg", "--model", "bloom", "--source",
                                                                            "s", "--target", "t", "--tp", "x"])])
def test_as_a_process_too(module, args, tmp_path):
    """`python -m ...` itself: exit code 2 from the process, one line on stderr, nothing on stdout."""
    res = subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"})
    _assert_contract(res.returncode, res.stderr)
    assert res.stdout == "" and not any(tmp_path.iterdir())
