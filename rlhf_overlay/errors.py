"""The errors that are the user's to fix, and the one way every CLI reports them.

Contract: a bad setting, flag, file or folder prints ONE line `error: <what>, <where>, <what to do>` on stderr and
exits with code 2, without a traceback and without creating anything; Ctrl-C prints one `error: interrupted` line
and exits 130. Entry modules get this by decorating their `main` with `main_guard` and building their parsers
with `ArgumentParser` (argparse errors then become UsageError instead of argparse's own usage + exit):

    @main_guard
    def main(argv=None) -> int:
        ns = ArgumentParser(prog="python -m rlhf_overlay.x").parse_args(argv)
        ...                       # raise ConfigError("batch_size=0: must be >= 1") etc.

    if __name__ == "__main__":
        sys.exit(main())

Each module keeps its own UserError subclass (LockError, RunDirError, PreferenceDataError, HostfileError, ...) so
callers can tell them apart; ConfigError is the one for settings, shared by all entry modules."""
from __future__ import annotations

import argparse
import functools
import sys


class UserError(Exception):
    """A problem the user fixes: a setting, a data row, a folder, a hostfile, a missing setup step."""


class ConfigError(UserError, ValueError):
    """A setting that cannot work; the message names the setting (field / make variable), its value and what to do."""


class UsageError(UserError):
    """A command line argparse refuses (unknown flag, missing argument, a value of the wrong type)."""


USER_ERROR_EXIT = 2     # what argparse uses for a bad command line, and every CLI here for a UserError
INTERRUPTED_EXIT = 130  # 128 + SIGINT, what shells report for Ctrl-C


def interrupted(where: str = "") -> int:
    """What every CLI does on Ctrl-C: one line instead of a KeyboardInterrupt traceback, exit code 130."""
    print(f"\nerror: interrupted (Ctrl-C){f'; {where}' if where else ''}", file=sys.stderr, flush=True)
    return INTERRUPTED_EXIT


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UsageError (printed by main_guard as one `error:` line, exit 2) instead of a usage
    block and `prog: error:`. Subparsers made with add_subparsers() are of this class too."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def main_guard(main):
    """Decorate a CLI's main(): UserError (any subclass, argparse errors from ArgumentParser included) -> `error: ...`
    on stderr and return 2; KeyboardInterrupt -> one line and return 130. Anything else is a bug and keeps its
    traceback."""
    @functools.wraps(main)
    def guarded(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return USER_ERROR_EXIT
        except KeyboardInterrupt:
            return interrupted()
    return guarded
