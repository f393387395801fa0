"""The one loader and validator for preference and prompt data, used by every path (DeepSpeed-Chat overlay, trlx
reward models and PPO, evaluation), so a bad row is reported the same way everywhere:

    <file>:<line>: <what is wrong> — <what to do>

Accepted inputs (docs/data_formats.md has the full description):
    rows.jsonl            one JSON object per line (blank lines are skipped)
    rows.json             a JSON list of objects (the line reported is where the object starts)
    folder/               holding train.jsonl|train.json and eval.jsonl|eval.json; pass split="train" or "eval"
A single file given as DATA is split: a fixed EVAL_SHARE of its rows is held out for evaluation (split_held_out).
Preference rows: {"prompt": str, "chosen": str, "rejected": str}; the seed's misspelt "choosen" is read as
"chosen" with one warning per file. Prompt rows: {"prompt": str, "reference": str (optional)}; a preference
row also works as a prompt row (its chosen answer becomes the reference). Other keys are ignored.

    python -m rlhf_overlay.data.preference_data my_pairs.jsonl              # validate DATA as training reads it
    python -m rlhf_overlay.data.preference_data assets/data/prompts --prompts
    from rlhf_overlay.data.preference_data import load_preference_rows
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
from rlhf_overlay.errors import ArgumentParser, UserError, main_guard

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
                  f"'chosen' — rename the field to 'chosen' to silence this warning", UserWarning, stacklevel=4)


def load_preference_rows(path, split: str | None = None) -> list[dict]:
    """Validated preference rows [{"prompt", "chosen", "rejected"}] of a .json/.jsonl file, or of a folder's
    <split>.jsonl|.json. Raises PreferenceDataError (`file:line: what — what to do`) at the first bad row."""
    return [row for _, row in preference_rows_with_lines(path, split)]


def preference_rows_with_lines(path, split: str | None = None) -> list[tuple[int, dict]]:
    """load_preference_rows with the line each row starts on: [(line, row)]."""
    def pair(file, line, row: dict) -> dict:
        prompt, chosen, rejected = (_text_field(file, line, row, k, PREFERENCE_FIELDS) for k in PREFERENCE_FIELDS)
        if chosen.strip() == rejected.strip():
            raise _error(file, line, "'chosen' and 'rejected' are the same text",
                         "a preference pair needs two different answers: fix or drop this row")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    return _rows_with_lines(path, split, "preference", '{"prompt": "...", "chosen": "...", "rejected": "..."}', pair)


def load_prompt_rows(path, split: str | None = None) -> list[dict]:
    """Validated prompt rows [{"prompt", "reference"?}] (PPO prompts) of a .json/.jsonl file or a folder's
    <split> file. A preference row is accepted too: its chosen answer becomes the reference."""
    return [row for _, row in prompt_rows_with_lines(path, split)]


def prompt_rows_with_lines(path, split: str | None = None) -> list[tuple[int, dict]]:
    """load_prompt_rows with the line each row starts on: [(line, row)]."""
    def prompt(file, line, row: dict) -> dict:
        out = {"prompt": _text_field(file, line, row, "prompt", ("prompt",))}
        if row.get("reference") is not None:
            out["reference"] = _text_field(file, line, row, "reference", ("prompt",))
        elif "chosen" in row:
            out["reference"] = _text_field(file, line, row, "chosen", ("prompt",))
        return out

    return _rows_with_lines(path, split, "prompt", '{"prompt": "...", "reference": "..."}', prompt)


def _rows_with_lines(path, split: str | None, kind: str, example: str, make_row) -> list[tuple[int, dict]]:
    """The rows of a `kind` data file, each an object turned into our row by make_row(file, line, row) (which
    validates it), the seed's 'choosen' read as 'chosen' (one warning per file); [(line, row)], at least one."""
    file = resolve_data_file(path, split)
    rows, alias_line = [], None
    for line, value in _objects(file):
        if not isinstance(value, dict):
            raise _not_an_object(file, line, value, example)
        row = dict(value)
        if _take_chosen_alias(file, line, row) and alias_line is None:
            alias_line = line
        rows.append((line, make_row(file, line, row)))
    if alias_line is not None:
        _warn_alias(file, alias_line)
    if not rows:
        raise _error(file, 1, "no rows", f"a {kind} file needs at least one row {example}")
    return rows


# ---------------------------------------------------------------------------------------------- train / eval
EVAL_SHARE = 0.1   # share of a single data file held out for evaluation
SPLIT_SEED = 1234  # which rows: a fixed permutation, so every run and every rank holds out the same ones


def data_files(path) -> tuple[Path, Path | None]:
    """(train file, eval file or None) of DATA as every training target reads it: a folder must hold
    train.jsonl|.json and may hold eval.jsonl|.json; a single file is both (None: hold out a share of it)."""
    p = Path(path).expanduser()
    if p.is_dir():
        train = resolve_data_file(p, "train")
        has_eval = any((p / f"eval{x}").is_file() for x in DATA_SUFFIXES)
        return train, resolve_data_file(p, "eval") if has_eval else None
    return resolve_data_file(p), None


def held_out_indices(n: int, share: float = EVAL_SHARE) -> list[int]:
    """The row indices of a single file that are held out for evaluation: max(1, round(n * share)) of them, from a
    fixed permutation (as DeepSpeed-Chat's data_split picks rows), in file order."""
    import random
    if n < 2:
        raise ValueError("need at least 2 rows to hold one out")
    k = min(n - 1, max(1, round(n * share)))
    order = list(range(n))
    random.Random(SPLIT_SEED).shuffle(order)
    return sorted(order[:k])


def split_held_out(rows: Sequence, share: float = EVAL_SHARE, file=None) -> tuple[list, list]:
    """(train, eval) of one file's rows, eval = held_out_indices; too few rows is a PreferenceDataError."""
    if len(rows) < 2:
        raise _error(file or "data", None, f"{len(rows)} row(s) are too few to hold out an evaluation share",
                     "add rows, or give a folder with train.jsonl and eval.jsonl")
    held = set(held_out_indices(len(rows), share))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def held_out_note(file, n_rows: int, share: float = EVAL_SHARE) -> str:
    k = len(held_out_indices(n_rows, share)) if n_rows >= 2 else 0
    return (f"{file} is the only data file (no eval file): {k} of its {n_rows} rows ({share:.0%}) are held out for "
            f"evaluation and not trained on — put train.jsonl and eval.jsonl in a folder to choose them yourself")


# ---------------------------------------------------------------------------------------------- over-long rows
def truncation_warning(file, cuts: Sequence[tuple[int, str, int]], max_tokens: int, side: str,
                       action: str = "truncated", setting: str = "max_seq_len / --max-length") -> str | None:
    """One warning for a file whose rows are longer than `max_tokens`: `cuts` = [(line, field, tokens)] of the
    rows that are too long; `side` = "left" or "right" (where the tokens are dropped). None when nothing is cut."""
    if not cuts:
        return None
    line, what, n = max(cuts, key=lambda c: c[2])
    dropped = (f"{n - max_tokens} of its {n} tokens dropped from the {side}" if action == "truncated"
               else f"{n} tokens, the row is dropped")
    lines = len({c[0] for c in cuts})
    more = f"; {lines} rows of this file are {action} to {max_tokens} tokens" if lines > 1 else ""
    return (f"warning: {file}:{line}: {what} is longer than {max_tokens} tokens ({dropped}){more} — raise the "
            f"maximum length ({setting}) or shorten these rows")


def overlong_warning(file, rows: Sequence[tuple[int, dict]], texts, count_tokens, max_tokens: int, side: str,
                     action: str = "truncated", setting: str = "max_seq_len / --max-length") -> str | None:
    """The one warning for `file` (None if no row is too long). `rows` = [(line, row)]; `texts(row)` = [(what,
    text)] as the model sees them (e.g. ("prompt + chosen", ...)); `count_tokens(list of texts)` = their lengths in
    tokens; `side` = where the tokens are dropped ("left" / "right")."""
    labelled = [(line, what, text) for line, row in rows for what, text in texts(row)]
    counts = count_tokens([t for _, _, t in labelled]) if labelled else []
    cuts = [(line, what, n) for (line, what, _), n in zip(labelled, counts) if n > max_tokens]
    return truncation_warning(file, cuts, max_tokens, side, action, setting)


def prompt_overlong_warnings(data, tokenizer_path, max_tokens: int, side: str = "left") -> list[str]:
    """One warning per prompt file of DATA whose prompts are longer than `max_tokens` with the policy's tokenizer
    (trlx PPO cuts them to seq_length - max_new_tokens from the left)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    train, evaluation = data_files(data)
    out = []
    for f in [train] + ([evaluation] if evaluation is not None else []):
        w = overlong_warning(f, prompt_rows_with_lines(f), lambda r: [("prompt", r["prompt"])],
                             lambda ts: [len(ids) for ids in tok(ts, add_special_tokens=False, verbose=False)["input_ids"]],
                             max_tokens, side, setting="--seq-length, or fewer --max-new-tokens")
        if w:
            out.append(w)
    return out


# ---------------------------------------------------------------------------------------------- CLI
def build_parser():
    import argparse

    p = ArgumentParser(prog="python -m rlhf_overlay.data.preference_data", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a .json/.jsonl file or a folder with train.jsonl [+ eval.jsonl], as DATA= takes it")
    p.add_argument("--prompts", action="store_true", help="validate as prompt rows (PPO) instead of preference rows")
    return p


@main_guard   # PreferenceDataError and bad flags -> `error: ...`, exit 2
def main(argv: Sequence[str] | None = None) -> int:
    """Validate DATA exactly as the training targets read it: a folder needs train.jsonl|.json (eval optional), a
    single file is split into train and a held-out eval share; exit 2 with `file:line: ...` at the first bad row."""
    args = build_parser().parse_args(argv)
    load = prompt_rows_with_lines if args.prompts else preference_rows_with_lines
    kind = "prompt" if args.prompts else "preference"
    train_file, eval_file = data_files(args.path)
    train = load(train_file)
    if eval_file is not None:
        print(f"{train_file}: {len(train)} valid {kind} rows (train)")
        print(f"{eval_file}: {len(load(eval_file))} valid {kind} rows (eval)")
    else:
        tr, ev = split_held_out(train, file=train_file)
        print(f"{train_file}: {len(train)} valid {kind} rows: {len(tr)} train, {len(ev)} eval")
        print(f"note: {held_out_note(train_file, len(train))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
