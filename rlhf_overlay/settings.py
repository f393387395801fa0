"""One dataclass -> command line for every entry module: a settings file, then flags (nanoGPT's configurator, strict).

A job's settings are one dataclass; each field is one flag, its help in the field's metadata:

    @dataclass
    class Config:
        model: str = field(default="", metadata={"help": "model folder or hub id (MODEL)"})
        steps: int | None = field(default=None, metadata={"help": "PPO steps (empty = the recipe's)"})
        precision: str = field(default="auto", metadata={"help": "mixed precision", "choices": ("auto", "no", "bf16")})
        overwrite: bool = field(default=False, metadata={"help": "write into a non-empty OUTPUT"})
        extra: list[str] = field(default_factory=list, metadata={"help": "after --: main.py's", "rest": True})

    parser = settings.build_parser(Config, prog="python -m rlhf_overlay.x", description="...")
    cfg = settings.config_from_args(Config, parser.parse_args(argv))

Flags are `--field-name`; types come from the annotations (int, float, str, Path, `X | None`; bool gets a flag pair
--x / --no-x; list[str] takes several values; `"rest": True` = the positional arguments after `--`); the default is
shown in the help. `--config FILE.yaml|.json` (keys = field names, `_` or `-`) sets values under the flags: lowest
first, the field defaults, the file, the flags. A key that is no field, or a value of the wrong type, is refused
with the key and the file (errors.UsageError -> `error: ...`, exit 2). parse_args() returns every field filled in,
plus `settings_given` (the fields set by a flag or the file) and `settings_file`.

`--dry-run` (a `dry_run: bool` field) is each job's: it prints the resolved settings and the exact launch command
with print_dry_run(), runs nothing and creates nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import shlex
import types
import typing
from pathlib import Path

from rlhf_overlay.errors import ArgumentParser, UsageError

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


# ---------------------------------------------------------------------------------------------- field types
@dataclasses.dataclass(frozen=True)
class Kind:
    """What a field's annotation means on the command line: base type, may be None, list of base type."""
    base: type
    optional: bool = False
    is_list: bool = False


def field_kind(tp) -> Kind:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1 or len(rest) == len(args):
            raise TypeError(f"settings: unsupported union {tp} (only `X | None`)")
        return dataclasses.replace(field_kind(rest[0]), optional=True)
    if origin is list:
        (item,) = args or (str,)
        return Kind(field_kind(item).base, is_list=True)
    if tp in (bool, int, float, str, Path):
        return Kind(tp)
    raise TypeError(f"settings: unsupported field type {tp}")


def setting_fields(cls) -> list[tuple[dataclasses.Field, Kind]]:
    """The fields with their kinds; a subclass's own fields first, then those it inherits (shared settings of
    several jobs can live in one base dataclass and still come after each job's own in --help)."""
    hints = typing.get_type_hints(cls)
    own = cls.__dict__.get("__annotations__", {})
    fields = sorted(dataclasses.fields(cls), key=lambda f: f.name not in own)   # stable: declaration order kept
    return [(f, field_kind(hints[f.name])) for f in fields]


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return " ".join(map(str, value))
    return repr(value) if isinstance(value, str) else str(value)


# ---------------------------------------------------------------------------------------------- the parser
class SettingsParser(ArgumentParser):
    """An ArgumentParser with the flags of one settings dataclass (add_settings); more arguments may be added as
    usual. Subparsers (add_subparsers().add_parser) are SettingsParsers too: each may add_settings its own class."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings_cls, self.settings_defaults, self.settings = None, {}, []

    def add_settings(self, cls, defaults=None, config_flag: bool = True) -> None:
        """One flag per field of dataclass `cls` (help from metadata["help"], choices from metadata["choices"]),
        and --config FILE. `defaults` (an instance of `cls` or a dict of some fields) replaces field defaults, e.g.
        a per-arch default of a shared config; dataclasses.MISSING there makes a flag required."""
        base = {f.name: field_default(f) for f in dataclasses.fields(cls)}
        if dataclasses.is_dataclass(defaults):
            defaults = dataclasses.asdict(defaults)
        base.update(defaults or {})
        self.settings_cls, self.settings_defaults, self.settings = cls, base, setting_fields(cls)
        for f, kind in self.settings:
            self._add_setting(cls, f, kind, base[f.name])
        if config_flag:
            self.add_argument("--config", metavar="FILE", default="",
                              help="settings file (.yaml or .json, keys = the settings above); flags given too win")

    def _add_setting(self, cls, f: dataclasses.Field, kind: Kind, default) -> None:
        if f.name == "config":
            raise TypeError(f"{cls.__name__}: a setting may not be called 'config' (that is --config FILE)")
        help_text = f.metadata.get("help")
        if help_text is None:
            raise TypeError(f"{cls.__name__}.{f.name}: no help; declare it with field(metadata={{'help': ...}})")
        if f.metadata.get("rest"):
            self.add_argument(f.name, nargs="*", default=argparse.SUPPRESS, help=help_text.replace("%", "%%"))
            return
        if "default" not in help_text and default not in (dataclasses.MISSING, None, "", []):
            help_text += f" (default: {_shown(default)})"   # an empty default: the help says what empty means
        kw: dict = {"default": argparse.SUPPRESS, "help": help_text.replace("%", "%%")}   # argparse %-formats help
        if kind.base is bool and not kind.is_list:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = kind.base
            if kind.is_list:
                kw["nargs"] = "*"
            if f.metadata.get("choices"):
                kw["choices"] = tuple(f.metadata["choices"])
            if f.metadata.get("metavar"):
                kw["metavar"] = f.metadata["metavar"]
        self.add_argument(flag_of(f.name), **kw)

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        if self.settings_cls is None:
            return ns, rest
        given = {f.name for f, _ in self.settings if hasattr(ns, f.name)}
        file = getattr(ns, "config", None)
        from_file = load_settings_file(file, self.settings_cls) if file else {}
        for f, _ in self.settings:
            if f.name not in given:
                value = from_file[f.name] if f.name in from_file else self.settings_defaults[f.name]
                if value is dataclasses.MISSING:   # a field without a default: its flag (or key) is required
                    self.error(f"the following arguments are required: {flag_of(f.name)}")
                setattr(ns, f.name, value)
        ns.settings_given = sorted(given | set(from_file))
        ns.settings_file = file or ""
        return ns, rest


def build_parser(cls, prog: str, description: str | None = None, epilog: str | None = None,
                 defaults=None, config_flag: bool = True, raw: bool = True) -> SettingsParser:
    """A parser with the flags of dataclass `cls` and --config FILE (see SettingsParser.add_settings)."""
    p = SettingsParser(prog=prog, description=description, epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter if raw else argparse.HelpFormatter)
    p.add_settings(cls, defaults, config_flag)
    return p


def config_from_args(cls, ns: argparse.Namespace):
    """The dataclass from a namespace of SettingsParser.parse_args()."""
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


def parse(cls, argv=None, **build_kwargs):
    """build_parser(cls, ...) + parse_args(argv) + config_from_args: the config (for entry modules without
    further arguments)."""
    return config_from_args(cls, build_parser(cls, **build_kwargs).parse_args(argv))


# ---------------------------------------------------------------------------------------------- settings files
def load_settings_file(path: str | Path, cls) -> dict:
    """The values of a .yaml/.json settings file for dataclass `cls`, checked: every key a field (`-` or `_`),
    every value of the field's type and among its choices. Raises UsageError naming the file and the key."""
    p = Path(path).expanduser()
    name = str(path)
    if p.suffix.lower() not in CONFIG_SUFFIXES:
        raise UsageError(f"--config {name}: a settings file is .yaml, .yml or .json")
    if not p.is_file():
        raise UsageError(f"--config {name}: no such file")
    import yaml

    text = p.read_text(encoding="utf-8")
    try:
        data = (json.loads(text) if text.strip() else {}) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except ValueError as e:   # json.JSONDecodeError
        raise UsageError(f"{name}: not valid JSON ({e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"{name}: not valid YAML{where} ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{name}: a settings file holds `key: value` lines (a mapping), not a "
                         f"{type(data).__name__}")
    known = dict(setting_fields(cls))
    by_name = {f.name: (f, kind) for f, kind in known.items()}
    out = {}
    for key, value in data.items():
        field_name = str(key).replace("-", "_")
        if field_name not in by_name:
            close = difflib.get_close_matches(field_name, list(by_name), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UsageError(f"{name}: unknown key '{key}'{hint} — known keys: {', '.join(by_name)}")
        f, kind = by_name[field_name]
        out[field_name] = check_value(value, kind, f, f"{name}: key '{key}'")
    return out


def check_value(value, kind: Kind, f: dataclasses.Field, where: str):
    """`value` (from a settings file) as the field's type; UsageError saying what was expected."""
    if value is None:
        if kind.optional:
            return None
        raise UsageError(f"{where}: empty value; give a {_type_name(kind)} or leave the key out")
    if kind.is_list:
        if not isinstance(value, list):
            raise UsageError(f"{where}: must be a list of {_type_name(Kind(kind.base))}, got {value!r}")
        return [check_value(v, Kind(kind.base), f, where) for v in value]
    base = kind.base
    ok = (isinstance(value, bool) if base is bool else
          isinstance(value, int) and not isinstance(value, bool) if base is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if base is float else
          isinstance(value, str))
    if not ok:
        hint = " (quote it to make it text)" if base in (str, Path) else ""
        raise UsageError(f"{where}: must be {_type_name(kind)}, got {value!r}{hint}")
    value = float(value) if base is float else Path(value) if base is Path else value
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise UsageError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
    return value


def _type_name(kind: Kind) -> str:
    name = {bool: "true or false", int: "an integer", float: "a number", str: "text", Path: "a path"}[kind.base]
    return name + (" or empty" if kind.optional else "")


# ---------------------------------------------------------------------------------------------- the way back
def to_argv(cfg) -> list[str]:
    """Flags that reproduce dataclass `cfg` (every field that differs from its default); the `rest` field goes
    after `--`. parse_args(to_argv(cfg)) gives cfg back."""
    argv: list[str] = []
    rest: list[str] = []
    for f, kind in setting_fields(type(cfg)):
        value = getattr(cfg, f.name)
        if f.metadata.get("rest"):
            rest = list(value or [])
            continue
        if value == field_default(f) or value is None:
            continue
        flag = flag_of(f.name)
        if kind.base is bool and not kind.is_list:
            argv.append(flag if value else "--no-" + flag[2:])
        elif kind.is_list:
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv + (["--", *rest] if rest else [])


def print_dry_run(kind: str, resolved: dict, command: list[str] | dict[str, list[str]],
                  cwd: str | Path | None = None) -> None:
    """What --dry-run prints: the resolved settings (YAML) and the launch command (last line, copy-paste ready);
    several commands as {label: command}, each under a `# label` line."""
    import yaml

    shown = {k: v for k, v in resolved.items() if k not in ("launch_command", "launch_cwd")}
    print(f"# {kind} dry run: nothing was run or created\n# resolved settings")
    print(yaml.safe_dump(json.loads(json.dumps(shown, default=str)), sort_keys=False, width=1000).rstrip())
    where = f" (in {cwd})" if cwd else ""
    for label, cmd in (command.items() if isinstance(command, dict) else [("launch command", command)]):
        print(f"# {label}{where}")
        print(shlex.join([str(c) for c in cmd]), flush=True)
