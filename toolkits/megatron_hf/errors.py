"""The one exception type the converters raise for bad input.

Every message names what was wrong (file, tensor, expected vs actual) and what to do about it; the CLI prints
it without a traceback and exits with status 2.
"""


import argparse


class ConversionError(Exception):
    """Input that cannot be converted as asked (missing ranks, shapes that do not fit, unsafe pickles, ...)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose command-line errors (unknown flag, missing argument, bad value) are ConversionError, printed
    by the CLI as one `error:` line with exit status 2 like any other bad input, instead of argparse's usage block.
    Subparsers made with add_subparsers() are of this class too."""

    def error(self, message: str):
        raise ConversionError(f"{message} (see `{self.prog} --help`)")


def note(message: str) -> None:
    """A one-line remark for the user (a default taken, an input ignored), on stderr so stdout stays clean."""
    import sys
    print(f"note: {message}", file=sys.stderr)


def warning(message: str) -> None:
    """Output that will be written but that a known consumer cannot use as it is (on stderr)."""
    import sys
    print(f"warning: {message}", file=sys.stderr)


def raise_if_problems(what: str, problems: list[str], limit: int = 25) -> None:
    """Report every mismatch found (not just the first), so one run tells the user all that is wrong."""
    if problems:
        shown = problems[:limit] + ([f"... and {len(problems) - limit} more"] if len(problems) > limit else [])
        raise ConversionError(f"{what}:\n  " + "\n  ".join(shown))
