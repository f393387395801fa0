"""The Makefile passes user values to programs as single arguments, never through the shell's parser, and refuses
values make itself would expand. Every variable of every target gets a hostile value (`;`, backticks, quotes,
spaces, a newline, `$(...)`): nothing may run (a canary file never appears) and the value either reaches the program
intact or is refused with a message.

Programs are replaced by a stub interpreter (PYTHON=<stub>) that records its argv, so this runs in seconds.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_overlay import PROJECT_ROOT
MAKEFILE = (PROJECT_ROOT / "Makefile").read_text()
TARGETS = re.findall(r"^([a-zA-Z0-9_-]+):.*?## ", MAKEFILE, flags=re.M)
SETTABLE = sorted(set(re.findall(r"^([A-Z][A-Z0-9_]*)\s*\?=", MAKEFILE, flags=re.M)) | {"RM"})
USER_VARS = re.search(r"^USER_VARS := (.*?)\n(?!\s)", MAKEFILE, flags=re.M | re.S).group(1).replace("\\\n", " ").split()

STUB = """#!{python}
import json, os, sys
sys.path.insert(0, {root!r})
if sys.argv[1:3] == ["-m", "rlhf_overlay.runtime.make_args"]:      # the list-splitting helper: run it for real
    from rlhf_overlay.runtime import make_args
    sys.exit(make_args.main(sys.argv[3:]))
with open(os.environ["ARGV_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
"""


def hostile(name: str, canary: Path) -> str:
    """A value with everything a shell would act on, except `$` (make refuses that one; tested separately)."""
    return (f"{name.lower()};touch {canary} `touch {canary}` \"dq {name}\" 'sq' two  words\n"
            f"line2 && touch {canary} | cat > {canary}")


@pytest.fixture()
def stub(tmp_path):
    folder = tmp_path / "py dir;`x`"          # the interpreter's own path has a space, a ; and backticks
    folder.mkdir()
    py = folder / "python"
    py.write_text(STUB.format(python=sys.executable, root=str(PROJECT_ROOT)))
    py.chmod(0o755)
    return py


def run_make(args, env, timeout=120):
    return subprocess.run(["make", "-s", *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in SETTABLE and k != "MAKEFLAGS"}
    env.update(extra)
    return env


def test_every_settable_variable_is_guarded_and_exported():
    assert set(SETTABLE) <= set(USER_VARS), set(SETTABLE) - set(USER_VARS)
    for target in TARGETS:   # no recipe pastes a user value into the command text (`"$$VAR"`, not `$(VAR)`)
        recipe = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)*)", MAKEFILE, flags=re.M).group(1)
        pasted = [v for v in USER_VARS if re.search(rf"\$[({{]{v}[)}}]", recipe)
                  and not re.search(rf"\$\(if \$\({v}\),", recipe) and not re.search(rf"\$\(filter 1,\$\({v}\)", recipe)]
        assert not pasted, f"{target} pastes {pasted} into its recipe"


@pytest.mark.parametrize("how", ["command line", "environment"])
def test_a_value_make_would_expand_is_refused_before_anything_runs(tmp_path, how):
    canary = tmp_path / "canary"
    for var in USER_VARS:
        value = f"$(shell touch {canary})`touch {canary}`$(touch {canary})"
        args, env = ["help"], clean_env()
        if how == "command line":
            args.append(f"{var}={value}")
        else:
            env[var] = value
        res = run_make(args, env)
        assert res.returncode == 2, (var, res.stdout, res.stderr)
        assert f"{var}=$(shell touch {canary})" in res.stderr and "contains '$'" in res.stderr, res.stderr
        assert "give the value without '$'" in res.stderr and res.stdout == ""
        assert not canary.exists(), var


def test_every_target_refuses_a_dollar_before_its_recipe(tmp_path, stub):
    canary = tmp_path / "canary"
    log = tmp_path / "argv.log"
    env = clean_env(PYTHON=str(stub), ARGV_LOG=str(log))
    for target in TARGETS:
        for var in ("DATA", "OUTPUT", "RUN", "SOURCE"):
            res = run_make([target, f"{var}=$(shell touch {canary}) $$(touch {canary})"], env)
            assert res.returncode == 2 and "contains '$'" in res.stderr, (target, var, res.stderr)
    assert not canary.exists() and not log.exists()


def test_the_issue_cases(tmp_path, stub):
    """`make rm-bloom DATA='$(x)'` trained on the embedded data with exit 0; `RUN='runs/a; touch pwned'` ran the
    touch; SOURCE='`touch pwned`' ran it and converted the current folder."""
    log = tmp_path / "argv.log"
    env = clean_env(PYTHON=str(stub), ARGV_LOG=str(log))
    res = run_make(["rm-bloom", "DATA=$(x)"], env)
    assert res.returncode == 2 and "DATA=$(x) contains '$'" in res.stderr and not log.exists()
    res = run_make(["report", f"RUN=runs/a; touch {tmp_path / 'pwned'}"], env)
    assert res.returncode == 0, res.stderr
    assert json.loads(log.read_text()) == ["-m", "rlhf_overlay.tools.report", "runs/a;", "touch", str(tmp_path / "pwned")]
    log.unlink()
    res = run_make(["convert-llama2-mg2hf", f"SOURCE=`touch {tmp_path / 'pwned'}`", "TARGET=out"], env)
    assert res.returncode == 0, res.stderr
    argv = json.loads(log.read_text())
    assert argv[argv.index("--source") + 1] == f"`touch {tmp_path / 'pwned'}`"
    assert not (tmp_path / "pwned").exists()


def test_make_n_never_shows_a_user_value_in_a_command(tmp_path):
    """For every target, with every variable hostile, the commands make would run hold no user value: values
    reach programs only through the environment."""
    canary = tmp_path / "canary"
    values = {v: hostile(v, canary) for v in USER_VARS if v not in ("PYTHON", "VENV")}
    args = [f"{k}={v}" for k, v in values.items()]
    for target in TARGETS:
        res = run_make(["-n", target, *args], clean_env())
        assert res.returncode == 0, (target, res.stderr)
        for v in values.values():
            assert v.splitlines()[0] not in res.stdout, target
    assert not canary.exists()


# what each target passes: (make variable, flag before it); None = the value is split into several arguments
COMMON = [("DATA", "--data"), ("OUTPUT", "--output"), ("ZERO_STAGE", "--zero-stage"), ("HOSTFILE", "--hostfile")]
PASSES = {
    "rm-llama2": [("MODEL", "--model"), *COMMON, ("NUM_GPUS", "--num-gpus"), ("LORA_DIM", "--lora-dim")],
    "dpo-llama2": [("MODEL", "--model"), *COMMON, ("NUM_GPUS", "--num-gpus"), ("LORA_DIM", "--lora-dim")],
    "ppo-llama2": [("ACTOR", "--actor"), ("CRITIC", "--critic"), *COMMON, ("NUM_GPUS", "--num-gpus"),
                   ("LORA_DIM", "--lora-dim")],
    "rm-bloom": [("MODEL", "--model"), *COMMON, ("NUM_GPUS", "--num-processes")],
    "rm-gptj": [("MODEL", "--model"), *COMMON, ("NUM_GPUS", "--num-processes")],
    "ppo-bloom": [("MODEL", "--model"), ("RM", "--rm"), *COMMON, ("NUM_GPUS", "--num-processes")],
    "ppo-gptj": [("MODEL", "--model"), ("RM", "--rm"), *COMMON, ("NUM_GPUS", "--num-processes")],
    "ppo-smoke-test": [("MODEL", "--model"), ("RM", "--rm"), ("REWARD", "--reward"), *COMMON,
                       ("NUM_GPUS", "--num-processes")],
    "eval-rm": [("RM", "--rm"), ("DATA", "--data"), ("OUTPUT", "--output")],
    "chat": [("MODEL", "--model"), ("PROMPT", "--prompt")],
    "ppo-join": [("RUN", "--join"), ("MACHINE_RANK", "--machine-rank")],
    "accelerate-config": [("HOSTFILE", "--hostfile"), ("BASE", "--base"), ("OUT", "--out")],
    "report": [("RUN", None)],
    "convert-llama2-mg2hf": [("SOURCE", "--source"), ("TARGET", "--target"), ("MODEL_NAME", "--model-name"),
                             ("EXTRA_VOCAB_SIZE", "--extra-vocab-size"), ("CONVERT_FLAGS", None)],
    "convert-llama2-hf2mg": [("SOURCE", "--source"), ("TARGET", "--target"), ("TP", "--tp"), ("PP", "--pp"),
                             ("MODEL_NAME", "--model-name"), ("EXTRA_VOCAB_SIZE", "--extra-vocab-size"),
                             ("CONVERT_FLAGS", None)],
    "convert-bloom-mg2hf": [("SOURCE", "--source"), ("TARGET", "--target"), ("EXTRA_VOCAB_SIZE", "--extra-vocab-size"),
                            ("CONVERT_FLAGS", None)],
    "convert-bloom-hf2mg": [("SOURCE", "--source"), ("TARGET", "--target"), ("TP", "--tp"), ("PP", "--pp"),
                            ("EXTRA_VOCAB_SIZE", "--extra-vocab-size"), ("CONVERT_FLAGS", None)],
    "verify": [], "lock": [], "assets": [],
}


@pytest.mark.parametrize("target", sorted(PASSES))
def test_every_variable_hostile_at_once_runs_nothing(tmp_path, stub, target):
    """All variables at once: the target runs its program once, or refuses a variable it does not take with a
    message (ppo-llama2 refuses MODEL, ...) and runs nothing; the canary never appears."""
    canary = tmp_path / "canary"
    log = tmp_path / "argv.log"
    values = {v: hostile(v, canary) for v in USER_VARS if v not in ("PYTHON", "VENV")}
    res = run_make([target, *(f"{k}={v}" for k, v in values.items())], clean_env(PYTHON=str(stub), ARGV_LOG=str(log)))
    assert not canary.exists()
    if res.returncode == 0:
        assert len(log.read_text().splitlines()) == 1
    else:
        assert res.returncode == 2 and res.stderr.startswith("error: ") and not log.exists(), res.stderr


@pytest.mark.parametrize("target", sorted(PASSES))
def test_hostile_values_reach_the_program_intact(tmp_path, stub, target):
    """Every variable the target takes, hostile: each arrives as one argument, exactly as given."""
    canary = tmp_path / "canary"
    log = tmp_path / "argv.log"
    values = {v: hostile(v, canary) for v, _ in PASSES[target]}
    env = clean_env(PYTHON=str(stub), ARGV_LOG=str(log))
    res = run_make([target, *(f"{k}={v}" for k, v in values.items())], env)
    assert res.returncode == 0, res.stderr
    assert not canary.exists()
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 1, calls
    argv = calls[0]
    for var, flag in PASSES[target]:
        if flag is None:
            assert argv[-len(shlex.split(values[var])):] == shlex.split(values[var]), (var, argv)
        else:
            assert flag in argv and argv[argv.index(flag) + 1] == values[var], (var, argv)


def test_ppo_llama2_refuses_model_with_a_message(tmp_path, stub):
    log = tmp_path / "argv.log"
    res = run_make(["ppo-llama2", "MODEL=a;b `c`"], clean_env(PYTHON=str(stub), ARGV_LOG=str(log)))
    assert res.returncode == 2 and "not MODEL=a;b `c`" in res.stderr and not log.exists()


def test_list_variables_split_like_shell_words_without_expansion(tmp_path, stub):
    from rlhf_overlay.runtime.make_args import split_list

    assert split_list("RUN", '"runs/my run" runs/b') == ["runs/my run", "runs/b"]
    assert split_list("RUN", "runs/a;rm -rf x `y` $(z)") == ["runs/a;rm", "-rf", "x", "`y`", "$(z)"]
    (tmp_path / "my run").mkdir()
    assert split_list("RUN", str(tmp_path / "my run")) == [str(tmp_path / "my run")]   # an existing path stays one
    assert split_list("RUN", "  ") == []
    log = tmp_path / "argv.log"
    res = run_make(["report", "RUN=runs/a 'unclosed"], clean_env(PYTHON=str(stub), ARGV_LOG=str(log)))
    assert res.returncode != 0 and "error: RUN=\"runs/a 'unclosed\": No closing quotation — close the quote" in res.stderr
    assert not log.exists()


# `make help` prints each target's `## vars:` line; here every one is checked against what reaches the program.
DECLARED = {t: v.split() for v, t in re.findall(r"^## vars:(.*)\n([a-zA-Z0-9_-]+):", MAKEFILE, flags=re.M)}
SWITCHES = {"OVERWRITE": "--overwrite", "ALLOW_ARCH": "--allow-arch",
            "RECIPE_AT_TINY_SCALE": "--recipe-at-tiny-scale"}   # VAR=1 -> the flag
# a target refuses these when set (ppo-llama2 takes ACTOR, not MODEL)
REFUSALS = {"not MODEL=": {"MODEL"}}
# read from the environment by the program, not passed as an argument
FROM_ENV = {"RANK_REPORT": "rlhf_overlay/runtime/runs.py prepare_run_dir", "OUTPUT": "upstream_tests --out default"}
# these run setup.sh for real: their variables are setup.sh's (bash setup.sh --help), checked there by name only
RUNS_SETUP = {"help", "setup", "upstream", "test"}


def test_every_declared_variable_is_a_make_variable():
    assert set(DECLARED) <= set(TARGETS)
    for target, names in DECLARED.items():
        assert names and set(names) <= set(USER_VARS) - {"PYTHON", "VENV"}, (target, names)
    help_text = run_make(["help"], clean_env()).stdout
    assert "PYTHON" in help_text.splitlines()[0]
    for target, names in DECLARED.items():
        assert re.search(rf"{re.escape(target)}\W.*\n +\S*vars: {' '.join(names)}\b", help_text), target


@pytest.mark.parametrize("target", sorted(set(TARGETS) - RUNS_SETUP))
def test_make_help_names_exactly_the_variables_a_target_passes(tmp_path, stub, target):
    """Every variable set at once (but those the target refuses): the ones whose value reaches the program are the
    target's `## vars:` line, and nothing that line names is lost on the way."""
    log = tmp_path / "argv.log"
    values = {v: "1" if v in SWITCHES or v == "RANK_REPORT" else f"<{v}>" for v in USER_VARS
              if v not in ("PYTHON", "VENV")}
    for _ in range(len(REFUSALS) + 1):
        res = run_make([target, *(f"{k}={v}" for k, v in values.items())], clean_env(PYTHON=str(stub), ARGV_LOG=str(log)))
        refused = [names for text, names in REFUSALS.items() if res.returncode == 2 and text in res.stderr]
        if not refused:
            break
        values = {k: v for k, v in values.items() if k not in refused[0]}
    assert res.returncode == 0, res.stderr
    argv = [a for line in log.read_text().splitlines() for a in json.loads(line)]
    passed = {v for v, value in values.items() if value != "1" and any(value in a for a in argv)}
    passed |= {v for v, flag in SWITCHES.items() if flag in argv}
    declared = set(DECLARED.get(target, []))
    assert passed <= declared, f"{target} passes {sorted(passed - declared)}: add them to its `## vars:` line"
    lost = declared - passed - set(FROM_ENV)
    assert not lost, f"{target}: its `## vars:` line names {sorted(lost)}, which never reach the program"


def test_setup_sh_help_prints_only_its_help():
    res = subprocess.run(["bash", "setup.sh", "--help"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert res.stdout.startswith("usage: bash setup.sh") and "#" not in res.stdout and "set -e" not in res.stdout
    assert "BASE_PYTHON" in res.stdout and "PYTHON " in res.stdout


def test_setup_sh_reads_a_given_python_as_base_python_with_a_note(tmp_path):
    """PYTHON names the interpreter that runs the modules; setup makes the venv with BASE_PYTHON. A PYTHON that is not
    the venv's (the old `make setup PYTHON=/path/python3.11`) still chooses the venv's interpreter, and says so."""
    (tmp_path / "setup.sh").write_text((PROJECT_ROOT / "setup.sh").read_text())   # a copy: nothing here is set up
    missing = tmp_path / "no" / "python3.11"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "BASE_PYTHON", "VENV")}
    res = subprocess.run(["bash", "setup.sh"], cwd=tmp_path, env=dict(env, PYTHON=str(missing)), capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 2, res.stderr
    note, error = res.stderr.splitlines()
    assert note.startswith(f"note: PYTHON={missing} is taken as BASE_PYTHON") and "pass BASE_PYTHON=" in note
    assert error.startswith(f"error: setup.sh: BASE_PYTHON={missing} is missing or older than 3.10")
    res = subprocess.run(["bash", "setup.sh"], cwd=tmp_path, env=dict(env, BASE_PYTHON=str(missing)), capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 2 and res.stderr.startswith(f"error: setup.sh: BASE_PYTHON={missing}"), res.stderr
    assert not (tmp_path / ".venv").exists()
