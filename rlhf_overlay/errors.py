"""The errors that are the user's to fix. Every CLI of the project prints a UserError as `error: <message>` and
exits with code 2, without a traceback; the message says what was wrong, where (file:line, field, folder) and what
to do. Each module keeps its own subclass (LockError, RunDirError, PreferenceDataError, HostfileError, ...) so
callers can tell them apart; ConfigError is the one for settings, shared by all entry modules."""
from __future__ import annotations


class UserError(Exception):
    """A problem the user fixes: a setting, a data row, a folder, a hostfile, a missing setup step."""


class ConfigError(UserError, ValueError):
    """A setting that cannot work; the message names the setting (field / make variable), its value and what to do."""


INTERRUPTED_EXIT = 130  # 128 + SIGINT, what shells report for Ctrl-C


def interrupted(where: str = "") -> int:
    """What every CLI does on Ctrl-C: one line instead of a KeyboardInterrupt traceback, exit code 130."""
    import sys
    print(f"\nerror: interrupted (Ctrl-C){f'; {where}' if where else ''}", file=sys.stderr, flush=True)
    return INTERRUPTED_EXIT
