"""Run a program with make variables that hold lists (RUN="runs/a runs/b", CONVERT_FLAGS="--dtype bf16",
PYTEST_ARGS="-k chat -x") appended as separate arguments, split here rather than by the shell.

The Makefile exports every variable the user sets and its recipes refer to them as shell variables ("$$SOURCE"),
so a value reaches the program as one argument and the shell never parses it. A list variable is split by this
module with POSIX shell-word rules but without any expansion (shlex): `RUN='"runs/my run" runs/b'` is two
folders, and `;`, backticks or `$(...)` are plain characters. A value that names an existing path as a whole
(`RUN="runs/my run"`) is kept as one item.

    python -m rlhf_overlay.runtime.make_args --append RUN -- python -m rlhf_overlay.tools.report
    python -m rlhf_overlay.runtime.make_args --append CONVERT_FLAGS -- python -m toolkits.megatron_hf.convert mg2hf ...
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Mapping, Sequence


def split_list(name: str, value: str) -> list[str]:
    """The items of list variable `name`; an unbalanced quote is an error that names the variable."""
    if not value.strip():
        return []
    if Path(value).expanduser().exists():
        return [value]
    try:
        return shlex.split(value, comments=False, posix=True)
    except ValueError as e:
        raise SystemExit(f"error: {name}={value!r}: {e} — close the quote, or quote each item that holds spaces "
                         f"('\"a b\" c')") from None


def command(argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    names: list[str] = []
    args = list(argv)
    while args and args[0] == "--append":
        if len(args) < 2:
            raise SystemExit("usage: python -m rlhf_overlay.runtime.make_args [--append VAR ...] -- PROGRAM [ARG ...]")
        names.append(args[1])
        args = args[2:]
    if not args or args[0] != "--" or len(args) < 2:
        raise SystemExit("usage: python -m rlhf_overlay.runtime.make_args [--append VAR ...] -- PROGRAM [ARG ...]")
    cmd = args[1:]
    for name in names:
        cmd += split_list(name, env.get(name, ""))
    return cmd


def main(argv: Sequence[str] | None = None) -> int:
    cmd = command(sys.argv[1:] if argv is None else argv, os.environ)
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        print(f"error: cannot run {cmd[0]!r}: {e.strerror} — check PYTHON= (or the program's path)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
