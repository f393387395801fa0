"""The one loader and validator for preference and prompt data, used by every path (DeepSpeed-Chat overlay, trlx
reward models and PPO, evaluation), so a bad row is reported the same way everywhere:

    <file>:<line>: <what is wrong> — <what to do>

Accepted inputs (docs/data_formats.md has the full description):
    rows.jsonl            one JSON object per line (blank lines are skipped)
    rows.json             a JSON list of objects (the line reported is where the object starts)
    folder/               holding train.jsonl|train.json and eval.jsonl|eval.json; pass split="train" or "eval"
Preference rows: {"prompt": str, "chosen": str, "rejected": str}; the seed's misspelt "choosen" is read as
"chosen" with one warning per file. Prompt rows: {"prompt": str, "reference": str (optional)}; a preference
row also works as a prompt row (its chosen answer becomes the reference). Other keys are ignored.

    python -m rlhf_overlay.preference_data my_pairs.jsonl              # validate a file, print a summary
    python -m rlhf_overlay.preference_data assets/data/prompts --prompts
    from rlhf_overlay.preference_data import load_preference_rows
    rows = load_preference_rows("assets/data/preference", split="train")
"""
from __future__ import annotations

import difflib
import json
import re
import sys
import warnings
from pathlib import Path
from typing import Iterator, Sequence
from rlhf_overlay.errors import UserError

DATA_SUFFIXES = (".jsonl", ".json")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
PROMPT_FIELDS = ("prompt", "reference")
MISSPELT_CHOSEN = "choosen"  # the seed's spelling (trlx_bloom_rlhf.py), accepted for compatibility

_WS = re.compile(r"\s*")


class PreferenceDataError(UserError, ValueError):
    """A data file or row that cannot be used; the message is `<file>:<line>: <what is wrong> — <what to do>`."""


def join_conversation(prompt: str, answer: str) -> str:
    """The text a reward model scores: `prompt + answer`, as in DeepSpeed-Chat's Dahoas/rm-static (answers start
    with a space); one space is put in between only when neither side has one. DeepSpeed-Chat's local data
    (overlay local_files.py) and `make eval-rm` both use this, so eval-rm scores exactly what step 2 trained on."""
    if answer[:1].isspace() or prompt[-1:].isspace() or not prompt:
        return prompt + answer
    return prompt + " " + answer


def _error(file, line: int | None, what: str, todo: str) -> PreferenceDataError:
    where = f"{file}:{line}" if line is not None else f"{file}"
    return PreferenceDataError(f"{where}: {what} — {todo}")


def _kind(value) -> str:
    """A JSON-flavoured name for what a value is, for messages."""
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------------- files
def resolve_data_file(path, split: str | None = None) -> Path:
    """The file to read: `path` itself, or <path>/<split>.jsonl|.json for a folder."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not split:
            raise _error(p, None, "is a folder", 'pass split="train" or split="eval" to pick train.jsonl/eval.jsonl '
                         "in it, or pass one .json/.jsonl file")
        found = [p / f"{split}{suffix}" for suffix in DATA_SUFFIXES if (p / f"{split}{suffix}").is_file()]
        if not found:
            raise _error(p, None, f"folder has no {split}.jsonl or {split}.json",
                         f"put the {split} rows there, or pass the data file itself")
        if len(found) > 1:
            raise _error(p, None, f"folder has both {split}.jsonl and {split}.json",
                         "keep one of them so it is clear which rows are used")
        return found[0]
    if not p.exists():
        raise _error(p, None, "no such file or folder",
                     "pass a .json/.jsonl file or a folder with train.jsonl and eval.jsonl")
    if p.suffix not in DATA_SUFFIXES:
        raise _error(p, None, f"unknown data file type {p.suffix or '(no suffix)'!r}",
                     "use .jsonl (one JSON object per line) or .json (a JSON list of objects)")
    return p


def _read_text(file: Path) -> str:
    data = file.read_bytes()
    try:
        return data.decode("utf-8-sig")  # tolerate a byte-order mark from Windows editors
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise _error(file, line, f"not UTF-8 text (byte {data[e.start]:#04x})",
                     "save the file as UTF-8") from None


def _jsonl_objects(file: Path, text: str) -> Iterator[tuple[int, object]]:
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            yield number, json.loads(raw)
        except json.JSONDecodeError as e:
            todo = "write one complete JSON object per line"
            if number == 1 and raw.strip() == "[":
                todo = "this looks like a JSON list: name the file .json, or write one object per line"
            raise _error(file, number, f"invalid JSON: {e.msg} (column {e.colno})", todo) from None


def _json_list_objects(file: Path, text: str) -> Iterator[tuple[int, object]]:
    """The elements of a top-level JSON list, each with the line where it starts (json.load loses that)."""
    decoder = json.JSONDecoder()
    pos = _WS.match(text, 0).end()
    if pos == len(text):
        return
    if text[pos] != "[":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            todo = "fix the JSON syntax"
            if e.msg == "Extra data":
                todo = "this looks like JSON Lines (one object per line): name the file .jsonl"
            raise _error(file, e.lineno, f"invalid JSON: {e.msg} (column {e.colno})", todo) from None
        raise _error(file, text.count("\n", 0, pos) + 1, f"the top level is {_kind(value)}, not a list of rows",
                     "wrap the rows in [ ... ], or use .jsonl with one object per line")
    pos = _WS.match(text, pos + 1).end()
    if text.startswith("]", pos):
        return
    line, counted = 1, 0  # count newlines incrementally: O(file) overall
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise _error(file, e.lineno, f"invalid JSON: {e.msg} (column {e.colno})",
                         "fix the JSON syntax of this row") from None
        yield line, value
        pos = _WS.match(text, end).end()
        if text.startswith(",", pos):
            pos = _WS.match(text, pos + 1).end()
            continue
        if text.startswith("]", pos):
            rest = _WS.match(text, pos + 1).end()
            if rest != len(text):
                raise _error(file, text.count("\n", 0, rest) + 1, "extra data after the list of rows",
                             "keep exactly one JSON list in a .json file")
            return
        at = text.count("\n", 0, pos) + 1
        if pos == len(text):
            raise _error(file, at, "the list of rows is not closed", "end the file with ]")
        raise _error(file, at, "expected ',' or ']' after a row", "separate rows with commas")


def _objects(file: Path) -> Iterator[tuple[int, object]]:
    text = _read_text(file)
    return _jsonl_objects(file, text) if file.suffix == ".jsonl" else _json_list_objects(file, text)


# ---------------------------------------------------------------------------------------------- rows
def _text_field(file, line, row: dict, key: str, required_fields: Sequence[str]) -> str:
    if key not in row:
        close = difflib.get_close_matches(key, [k for k in row if isinstance(k, str)], n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        have = ", ".join(repr(k) for k in row) or "none"
        raise _error(file, line, f"missing field {key!r} (the row has {have})",
                     f"{hint}every row needs the string fields {', '.join(required_fields)}")
    value = row[key]
    if not isinstance(value, str):
        raise _error(file, line, f"field {key!r} is {_kind(value)}, not a string",
                     f"write {key} as a JSON string")
    if not value.strip():
        raise _error(file, line, f"field {key!r} is empty", f"give every row a non-empty {key}, or drop the row")
    return value


def _not_an_object(file, line, value, example: str) -> PreferenceDataError:
    return _error(file, line, f"a row must be a JSON object, got {_kind(value)}", f"write each row as {example}")


def _take_chosen_alias(file, line, row: dict) -> bool:
    """Rename the seed's 'choosen' to 'chosen' in `row`; True when it did."""
    if MISSPELT_CHOSEN not in row:
        return False
    if "chosen" in row:
        raise _error(file, line, "the row has both 'chosen' and the misspelt 'choosen'", "keep only 'chosen'")
    row["chosen"] = row.pop(MISSPELT_CHOSEN)
    return True


def _warn_alias(file, line) -> None:
    warnings.warn(f"{file}:{line}: rows use the misspelt field 'choosen' (the seed's spelling); reading it as "
                  f"'chosen' — rename the field to 'chosen' to silence this warning", UserWarning, stacklevel=3)


def load_preference_rows(path, split: str | None = None) -> list[dict]:
    """Validated preference rows [{"prompt", "chosen", "rejected"}] of a .json/.jsonl file, or of a folder's
    <split>.jsonl|.json. Raises PreferenceDataError (`file:line: what — what to do`) at the first bad row."""
    file = resolve_data_file(path, split)
    example = '{"prompt": "...", "chosen": "...", "rejected": "..."}'
    rows, alias_line = [], None
    for line, value in _objects(file):
        if not isinstance(value, dict):
            raise _not_an_object(file, line, value, example)
        row = dict(value)
        if _take_chosen_alias(file, line, row) and alias_line is None:
            alias_line = line
        prompt, chosen, rejected = (_text_field(file, line, row, k, PREFERENCE_FIELDS) for k in PREFERENCE_FIELDS)
        if chosen.strip() == rejected.strip():
            raise _error(file, line, "'chosen' and 'rejected' are the same text",
                         "a preference pair needs two different answers: fix or drop this row")
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    if alias_line is not None:
        _warn_alias(file, alias_line)
    if not rows:
        raise _error(file, 1, "no rows", f"a preference file needs at least one row {example}")
    return rows


def load_prompt_rows(path, split: str | None = None) -> list[dict]:
    """Validated prompt rows [{"prompt", "reference"?}] (PPO prompts) of a .json/.jsonl file or a folder's
    <split> file. A preference row is accepted too: its chosen answer becomes the reference."""
    file = resolve_data_file(path, split)
    example = '{"prompt": "...", "reference": "..."}'
    rows, alias_line = [], None
    for line, value in _objects(file):
        if not isinstance(value, dict):
            raise _not_an_object(file, line, value, example)
        row = dict(value)
        if _take_chosen_alias(file, line, row) and alias_line is None:
            alias_line = line
        out = {"prompt": _text_field(file, line, row, "prompt", ("prompt",))}
        if row.get("reference") is not None:
            out["reference"] = _text_field(file, line, row, "reference", ("prompt",))
        elif "chosen" in row:
            out["reference"] = _text_field(file, line, row, "chosen", ("prompt",))
        rows.append(out)
    if alias_line is not None:
        _warn_alias(file, alias_line)
    if not rows:
        raise _error(file, 1, "no rows", f"a prompt file needs at least one row {example}")
    return rows


# ---------------------------------------------------------------------------------------------- CLI
def build_parser():
    import argparse

    p = argparse.ArgumentParser(prog="python -m rlhf_overlay.preference_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a .json/.jsonl file or a folder with train/eval files")
    p.add_argument("--split", default=None, help="train or eval (for a folder; default: both that exist)")
    p.add_argument("--prompts", action="store_true", help="validate as prompt rows (PPO) instead of preference rows")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    load = load_prompt_rows if args.prompts else load_preference_rows
    p = Path(args.path)
    splits = [args.split] if args.split or not p.is_dir() else \
        [s for s in ("train", "eval") if any((p / f"{s}{x}").is_file() for x in DATA_SUFFIXES)] or ["train"]
    try:
        for split in splits:
            rows = load(p, split=split)
            name = resolve_data_file(p, split)
            print(f"{name}: {len(rows)} valid {'prompt' if args.prompts else 'preference'} rows")
    except PreferenceDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
