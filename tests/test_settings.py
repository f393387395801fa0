"""rlhf_overlay.settings: dataclass -> flags, --config files under the flags, strict keys and types, to_argv,
print_dry_run."""
from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from rlhf_overlay import settings
from rlhf_overlay.errors import UsageError


@dataclass
class Demo:
    model: str = field(default="", metadata={"help": "model folder or hub id"})
    steps: int = field(default=40, metadata={"help": "PPO steps"})
    lr: float = field(default=3e-4, metadata={"help": "learning rate (a 10% change matters)"})
    zero_stage: int | None = field(default=None, metadata={"help": "ZeRO stage (default: the recipe's)"})
    precision: str = field(default="auto", metadata={"help": "mixed precision", "choices": ("auto", "no", "bf16")})
    overwrite: bool = field(default=False, metadata={"help": "write into a non-empty folder"})
    hybrid: bool | None = field(default=None, metadata={"help": "hybrid engine"})
    out: Path = field(default=Path("runs"), metadata={"help": "where"})
    tags: list[str] = field(default_factory=list, metadata={"help": "labels"})
    extra: list[str] = field(default_factory=list, metadata={"help": "after --: passed on", "rest": True})


def parse(argv):
    return settings.config_from_args(Demo, settings.build_parser(Demo, prog="demo").parse_args(argv))


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_types_and_flag_pairs():
    assert parse([]) == Demo()
    cfg = parse(["--model", "m", "--steps", "7", "--lr", "1", "--zero-stage", "2", "--precision", "bf16",
                 "--overwrite", "--no-hybrid", "--out", "/x", "--tags", "a", "b", "--", "--flag", "v"])
    assert cfg == Demo(model="m", steps=7, lr=1.0, zero_stage=2, precision="bf16", overwrite=True, hybrid=False,
                       out=Path("/x"), tags=["a", "b"], extra=["--flag", "v"])
    assert isinstance(cfg.lr, float) and isinstance(cfg.out, Path)


def test_help_from_metadata_with_defaults_and_choices(capsys):
    with pytest.raises(SystemExit) as e:
        settings.build_parser(Demo, prog="demo").parse_args(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "PPO steps (default: 40)" in out
    assert "learning rate (a 10% change matters) (default: 0.0003)" in out
    assert "ZeRO stage (default: the recipe's)" in out           # a help that names its default keeps it
    assert "--overwrite, --no-overwrite" in out and "(default: off)" in out
    assert "{auto,no,bf16}" in out and "mixed precision (default: 'auto')" in out
    assert "model folder or hub id --steps" in out                 # an empty default adds nothing
    assert "--config FILE" in out


@pytest.mark.parametrize("argv, words", [
    (["--steps", "many"], ["--steps", "invalid int value: 'many'"]),
    (["--precision", "fp8"], ["--precision", "invalid choice: 'fp8'"]),
    (["--stepz", "3"], ["unrecognized arguments: --stepz"]),
])
def test_bad_flags_are_usage_errors(argv, words):
    with pytest.raises(UsageError) as e:
        parse(argv)
    for w in words:
        assert w in str(e.value)
    assert "see `demo --help`" in str(e.value)


@pytest.mark.parametrize("name, text", [
    ("s.yaml", "steps: 5\nlr: 0.1\nzero-stage: 3\noverwrite: true\nprecision: bf16\nmodel: from-file\n"
               "tags: [x, y]\nout: /data\n"),
    ("s.json", json.dumps({"steps": 5, "lr": 0.1, "zero_stage": 3, "overwrite": True, "precision": "bf16",
                           "model": "from-file", "tags": ["x", "y"], "out": "/data"})),
])
def test_settings_file_merges_under_the_flags(tmp_path, name, text):
    path = write(tmp_path, name, text)
    p = settings.build_parser(Demo, prog="demo")
    ns = p.parse_args(["--config", path, "--model", "from-flag", "--no-overwrite"])
    cfg = settings.config_from_args(Demo, ns)
    assert cfg == Demo(model="from-flag", steps=5, lr=0.1, zero_stage=3, precision="bf16", overwrite=False,
                       tags=["x", "y"], out=Path("/data"))
    assert ns.settings_file == path
    assert set(ns.settings_given) == {"model", "steps", "lr", "zero_stage", "overwrite", "precision", "tags", "out"}
    assert p.parse_args(["--steps", "2"]).settings_given == ["steps"]


def test_unknown_key_is_refused_with_its_name_and_the_file(tmp_path):
    path = write(tmp_path, "settings.yaml", "steps: 5\nstep: 6\n")
    with pytest.raises(UsageError) as e:
        parse(["--config", path])
    msg = str(e.value)
    assert msg.startswith(f"{path}: unknown key 'step'")
    assert "did you mean 'steps'?" in msg
    assert "known keys: model, steps, lr, zero_stage" in msg


@pytest.mark.parametrize("text, words", [
    ("steps: eight\n", ["key 'steps'", "must be an integer", "'eight'"]),
    ("steps: 2.5\n", ["key 'steps'", "must be an integer"]),
    ("steps: true\n", ["key 'steps'", "must be an integer"]),
    ("overwrite: 1\n", ["key 'overwrite'", "must be true or false"]),
    ("lr: fast\n", ["key 'lr'", "must be a number"]),
    ("model: 7\n", ["key 'model'", "must be text", "quote it"]),
    ("model:\n", ["key 'model'", "empty value"]),
    ("precision: fp8\n", ["key 'precision'", "'fp8' is not one of auto, no, bf16"]),
    ("tags: x\n", ["key 'tags'", "must be a list"]),
    ("- steps\n", ["a mapping", "not a list"]),
    ("steps: [1\n", ["not valid YAML at line"]),
])
def test_wrong_values_are_refused_with_the_key(tmp_path, text, words):
    path = write(tmp_path, "s.yaml", text)
    with pytest.raises(UsageError) as e:
        parse(["--config", path])
    assert str(e.value).startswith(path + ":")
    for w in words:
        assert w in str(e.value)


def test_optional_int_and_float_from_int_in_a_file(tmp_path):
    path = write(tmp_path, "s.yaml", "zero_stage:\nlr: 1\nhybrid: false\n")
    cfg = parse(["--config", path])
    assert cfg.zero_stage is None and cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.hybrid is False


@pytest.mark.parametrize("name, text, words", [
    ("missing.yaml", None, ["missing.yaml: no such file"]),
    ("s.toml", "steps = 1", ["a settings file is .yaml, .yml or .json"]),
    ("s.json", "{steps: 1}", ["not valid JSON"]),
])
def test_bad_settings_files(tmp_path, name, text, words):
    path = str(tmp_path / name) if text is None else write(tmp_path, name, text)
    with pytest.raises(UsageError) as e:
        parse(["--config", path])
    for w in words:
        assert w in str(e.value)


def test_empty_settings_file_changes_nothing(tmp_path):
    assert parse(["--config", write(tmp_path, "s.yaml", "# nothing yet\n")]) == Demo()


def test_defaults_argument_replaces_field_defaults(capsys):
    p = settings.build_parser(Demo, prog="demo", defaults={"steps": 3, "model": "tiny"})
    assert settings.config_from_args(Demo, p.parse_args([])) == Demo(steps=3, model="tiny")
    p2 = settings.build_parser(Demo, prog="demo", defaults=Demo(precision="no"))
    assert settings.config_from_args(Demo, p2.parse_args([])).precision == "no"
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    assert "PPO steps (default: 3)" in " ".join(capsys.readouterr().out.split())


def test_more_arguments_can_be_added():
    p = settings.build_parser(Demo, prog="demo")
    p.add_argument("--worker", default=None)
    ns = p.parse_args(["--worker", "/run", "--steps", "2"])
    assert ns.worker == "/run" and settings.config_from_args(Demo, ns).steps == 2


def test_to_argv_round_trip():
    cfg = Demo(model="m", steps=7, zero_stage=0, overwrite=True, hybrid=False, tags=["a"], extra=["--x", "1"])
    argv = settings.to_argv(cfg)
    assert argv[-3:] == ["--", "--x", "1"] and "--no-hybrid" in argv and "--overwrite" in argv
    assert "--lr" not in argv                   # defaults are left out
    assert parse(argv) == cfg
    assert settings.to_argv(Demo()) == []


def test_builder_refuses_fields_without_help_or_unsupported_types():
    @dataclass
    class NoHelp:
        x: int = 1

    @dataclass
    class Odd:
        x: dict = field(default_factory=dict, metadata={"help": "?"})

    with pytest.raises(TypeError, match="no help"):
        settings.build_parser(NoHelp, prog="x")
    with pytest.raises(TypeError, match="unsupported field type"):
        settings.build_parser(Odd, prog="x")


def test_print_dry_run(capsys):
    cmd = ["/venv/bin/python", "-m", "deepspeed.launcher.runner", "main.py", "--data_path", "a b"]
    settings.print_dry_run("rm-llama2", {"recipe": "tiny", "batch_size": 8, "run_dir": Path("/r"),
                                         "launch_command": cmd, "cpu_notes": []}, cmd, cwd="/step2")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# rm-llama2 dry run")
    assert shlex.split(lines[-1]) == cmd
    assert lines[-2] == "# launch command (in /step2)"
    shown = yaml.safe_load("\n".join(lines[:-2]))
    assert shown == {"recipe": "tiny", "batch_size": 8, "run_dir": "/r", "cpu_notes": []}


@dataclass
class Needs:
    model: str = field(metadata={"help": "required: no default"})
    steps: int = field(default=1, metadata={"help": "steps"})


def test_a_field_without_default_is_a_required_flag_or_key(tmp_path):
    p = settings.build_parser(Needs, prog="needs")
    with pytest.raises(UsageError, match="the following arguments are required: --model"):
        p.parse_args([])
    assert settings.config_from_args(Needs, p.parse_args(["--model", "m"])) == Needs(model="m")
    assert settings.config_from_args(Needs, p.parse_args(["--config", write(tmp_path, "n.yaml", "model: f\n")])
                                     ).model == "f"
    required_steps = settings.build_parser(Needs, prog="needs", defaults={"steps": settings.dataclasses.MISSING})
    with pytest.raises(UsageError, match="required: --steps"):
        required_steps.parse_args(["--model", "m"])


def test_subcommands_each_with_their_settings(tmp_path):
    p = settings.SettingsParser(prog="tool")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run").add_settings(Demo)
    other = sub.add_parser("other")
    other.add_argument("path")
    ns = p.parse_args(["run", "--steps", "3", "--config", write(tmp_path, "s.yaml", "model: x\n")])
    assert ns.command == "run" and settings.config_from_args(Demo, ns) == Demo(steps=3, model="x")
    assert ns.settings_given == ["model", "steps"]
    assert p.parse_args(["other", "a"]).path == "a"
    with pytest.raises(UsageError, match="invalid choice: 'walk'"):
        p.parse_args(["walk"])
    with pytest.raises(UsageError, match="unknown key 'nope'"):
        p.parse_args(["run", "--config", write(tmp_path, "bad.yaml", "nope: 1\n")])


@dataclass
class Shared:
    seed: int = field(default=1, metadata={"help": "seed"})
    dry_run: bool = field(default=False, metadata={"help": "print, run nothing"})


@dataclass
class Job(Shared):
    model: str = field(default="", metadata={"help": "model"})
    steps: int = field(default=2, metadata={"help": "steps"})


def test_shared_settings_in_a_base_class_come_after_the_jobs_own(tmp_path, capsys):
    p = settings.build_parser(Job, prog="job")
    assert [f.name for f, _ in p.settings] == ["model", "steps", "seed", "dry_run"]
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    out = capsys.readouterr().out
    assert out.index("--model") < out.index("--steps") < out.index("--seed") < out.index("--dry-run")
    cfg = settings.config_from_args(Job, p.parse_args(["--seed", "5", "--config", write(tmp_path, "j.yaml",
                                                                                          "model: m\n")]))
    assert cfg == Job(model="m", seed=5) and settings.to_argv(cfg) == ["--model", "m", "--seed", "5"]


# ---------------------------------------------------------------------------------------------- --dry-run of the jobs
def _dry_run(module: str, argv: list[str], capsys) -> tuple[dict, list[str], list[str]]:
    import importlib

    capsys.readouterr()
    assert importlib.import_module(module).main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    blocks = [i for i, line in enumerate(lines) if line.endswith("dry run: nothing was run or created")]
    last = lines[blocks[-1]:]
    cmd_at = max(i for i, line in enumerate(last) if line.startswith("# launch command"))
    return yaml.safe_load("\n".join(last[:cmd_at])), shlex.split(last[-1]), lines


@pytest.mark.parametrize("module, flags", [
    ("rlhf_overlay.dschat_jobs.reward_model", ["--max-steps", "7", "--zero-stage", "2"]),
    ("rlhf_overlay.dschat_jobs.dpo", ["--max-steps", "7", "--zero-stage", "2"]),
    ("rlhf_overlay.dschat_jobs.ppo", ["--max-steps", "7", "--zero-stage", "2"]),
])
def test_dschat_dry_run_prints_settings_and_launch_command_and_creates_nothing(module, flags, dschat_dir, tiny_assets,
                                                                               tmp_path, capsys):
    out = tmp_path / "run"
    (tmp_path / "s.yaml").write_text("seed: 77\nmax_steps: 3\n")    # flags win over the file
    shown, cmd, lines = _dry_run(module, ["--output", str(out), "--dry-run", "--config", str(tmp_path / "s.yaml"),
                                          *flags], capsys)
    assert shown["seed"] == 77 and shown["max_steps"] == 7 and shown["zero_stage"] == 2
    assert shown["run_dir"] == str(out)
    assert cmd[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"] and "main.py" in cmd
    assert cmd[cmd.index("--seed") + 1] == "77" and cmd[cmd.index("--max_steps") + 1] == "7"
    if module.endswith("ppo"):   # no critic given: the tiny reward model's dry run comes first
        assert lines[0].startswith("# first: the tiny reward model") and "--actor_model_name_or_path" in cmd
    assert not out.exists()


def test_pipeline_dry_run_prints_every_stage_and_creates_nothing(tiny_assets, tmp_path, capsys):
    import importlib

    out = tmp_path / "pipe"
    capsys.readouterr()
    assert importlib.import_module("rlhf_overlay.tools.pipeline").main(
        ["run", "--family", "llama2", "--output", str(out), "--dry-run", "--num-gpus", "1"]) == 0
    text = capsys.readouterr().out
    shown = yaml.safe_load(text.split("# 0-megatron-sft")[0])
    assert shown["family"] == "llama2" and shown["run_dir"] == str(out) and shown["tiny"] is True
    commands = {line: nxt for line, nxt in zip(text.splitlines(), text.splitlines()[1:]) if line.startswith("# ")}
    stages = [label[2:].split(" (in ")[0] for label in commands if label[2].isdigit()]
    assert [s[:1] for s in stages] == list("0123455")
    rm = shlex.split(next(v for k, v in commands.items() if k.startswith("# 2-reward-model")))
    assert rm[2:4] == ["rlhf_overlay.dschat_jobs.reward_model", "--model"]
    assert rm[4] == str(out / "1-sft-hf" / "model") and rm[rm.index("--num-gpus") + 1] == "1"
    assert not out.exists()
