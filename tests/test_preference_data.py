"""preference_data: the one loader for preference/prompt rows. Accepts .json, .jsonl and train/eval folders;
every bad row fails with `<file>:<line>: <what is wrong> — <what to do>`."""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest

from rlhf_overlay.data.preference_data import PreferenceDataError, load_preference_rows, load_prompt_rows

ROWS = [
    {"prompt": "Human: tell me about the garden. Assistant:", "chosen": " the garden is calm.",
     "rejected": " the garden is noisy."},
    {"prompt": "Human: how was the river today? Assistant:", "chosen": " a lovely river.",
     "rejected": " a dirty river."},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")  # one field per line: objects span lines
    return path


def at(path: Path, line: int) -> str:
    """The start of the expected message, as a regex."""
    return "^" + re.escape(f"{path}:{line}: ")


# ---------------------------------------------------------------------------------------------- accepted shapes
def test_json_and_jsonl_give_the_same_rows(tmp_path):
    a = load_preference_rows(write_jsonl(tmp_path / "rows.jsonl", ROWS))
    b = load_preference_rows(write_json(tmp_path / "rows.json", ROWS))
    assert a == b == ROWS


def test_blank_lines_bom_and_extra_keys_are_fine(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text("\ufeff" + json.dumps({**ROWS[0], "id": 7}) + "\n\n   \n" + json.dumps(ROWS[1]) + "\n",
                 encoding="utf-8")
    assert load_preference_rows(f) == ROWS  # only the three fields come back


def test_folder_with_train_and_eval(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_json(tmp_path / "eval.json", ROWS[:1])
    assert load_preference_rows(tmp_path, split="train") == ROWS
    assert load_preference_rows(str(tmp_path), split="eval") == ROWS[:1]
    with pytest.raises(PreferenceDataError, match=r"is a folder — pass split="):
        load_preference_rows(tmp_path)
    with pytest.raises(PreferenceDataError, match=r"no test\.jsonl or test\.json"):
        load_preference_rows(tmp_path, split="test")
    write_jsonl(tmp_path / "train.json", ROWS)
    with pytest.raises(PreferenceDataError, match=r"both train\.jsonl and train\.json"):
        load_preference_rows(tmp_path, split="train")


def test_misspelt_choosen_is_read_as_chosen_with_one_warning(tmp_path):
    seed_rows = [{"prompt": r["prompt"], "choosen": r["chosen"], "rejected": r["rejected"]} for r in ROWS]
    f = write_jsonl(tmp_path / "seed.jsonl", seed_rows)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = load_preference_rows(f)
    assert rows == ROWS
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and messages[0].startswith(f"{f}:1: ") and "'choosen'" in messages[0]
    with pytest.warns(UserWarning, match="choosen"):
        assert load_prompt_rows(f)[0]["reference"] == ROWS[0]["chosen"]


def test_prompt_rows(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Human: hi Assistant:"},
                                           {"prompt": "Human: yo Assistant:", "reference": " hello."},
                                           {"prompt": "Human: hm Assistant:", "reference": None}])
    assert load_prompt_rows(f) == [{"prompt": "Human: hi Assistant:"},
                                   {"prompt": "Human: yo Assistant:", "reference": " hello."},
                                   {"prompt": "Human: hm Assistant:"}]
    # a preference file works as prompts: the chosen answer is the reference
    pref = write_json(tmp_path / "pref.json", ROWS)
    assert load_prompt_rows(pref) == [{"prompt": r["prompt"], "reference": r["chosen"]} for r in ROWS]


# ---------------------------------------------------------------------------------------------- bad rows
GOOD = ROWS[0]
BAD_ROWS = [
    ("not an object", ["just a string"], "a row must be a JSON object, got a string"),
    ("list row", [["a", "b", "c"]], "a row must be a JSON object, got a list"),
    ("missing field", [{"prompt": "p", "chosen": "c"}], "missing field 'rejected'"),
    ("near-miss key", [{"prompt": "p", "chosen": "c", "rejectd": "r"}], "did you mean 'rejectd'"),
    ("non-string", [{"prompt": "p", "chosen": 1, "rejected": "r"}], "field 'chosen' is a number, not a string"),
    ("null", [{"prompt": None, "chosen": "c", "rejected": "r"}], "field 'prompt' is null, not a string"),
    ("empty", [{"prompt": "p", "chosen": "c", "rejected": ""}], "field 'rejected' is empty"),
    ("blank", [{"prompt": "  \n", "chosen": "c", "rejected": "r"}], "field 'prompt' is empty"),
    ("same answers", [{"prompt": "p", "chosen": " same", "rejected": " same "}], "are the same text"),
    ("both spellings", [{"prompt": "p", "chosen": "c", "choosen": "c", "rejected": "r"}], "both 'chosen' and"),
]


@pytest.mark.parametrize("case,bad,what", BAD_ROWS, ids=[c[0] for c in BAD_ROWS])
def test_bad_row_in_jsonl_names_file_and_line(tmp_path, case, bad, what):
    f = write_jsonl(tmp_path / "rows.jsonl", [GOOD, GOOD] + bad)
    with pytest.raises(PreferenceDataError, match=at(f, 3)) as info:
        load_preference_rows(f)
    assert what in str(info.value) and " — " in str(info.value)


@pytest.mark.parametrize("case,bad,what", BAD_ROWS, ids=[c[0] for c in BAD_ROWS])
def test_bad_row_in_json_names_the_line_where_the_object_starts(tmp_path, case, bad, what):
    f = write_json(tmp_path / "rows.json", [GOOD] + bad)
    # indent=2: "[" is line 1, GOOD spans lines 2-6, so the bad row starts on line 7
    assert f.read_text().splitlines()[6].strip().startswith(("{", "[", '"'))
    with pytest.raises(PreferenceDataError, match=at(f, 7)) as info:
        load_preference_rows(f)
    assert what in str(info.value)


def test_every_error_is_a_value_error_with_a_remedy(tmp_path):
    f = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "p"}])
    with pytest.raises(ValueError) as info:
        load_preference_rows(f)
    assert isinstance(info.value, PreferenceDataError)
    assert re.match(rf"{re.escape(str(f))}:1: .+ — .+", str(info.value))


@pytest.mark.parametrize("suffix,text,line,what", [
    (".jsonl", '{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p",\n', 2, "invalid JSON"),
    (".jsonl", '[\n{"prompt": "p"}\n]\n', 1, "looks like a JSON list: name the file .json"),
    (".json", '[\n  {"prompt": "p", "chosen": "c", "rejected": "r"},\n  {"prompt": "p" "chosen": "c"}\n]', 3,
     "invalid JSON: Expecting ',' delimiter"),
    (".json", '[\n  {"prompt": "p", "chosen": "c", "rejected": "r"}\n', 3, "not closed"),
    (".json", '{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "q"}\n', 2,
     "looks like JSON Lines"),
    (".json", '\n{"rows": []}', 2, "the top level is an object, not a list of rows"),
    (".json", '[{"prompt": "p", "chosen": "c", "rejected": "r"}]\n[]', 2, "extra data after the list"),
    (".json", "", 1, "no rows"),
    (".json", "[]", 1, "no rows"),
    (".jsonl", "\n\n", 1, "no rows"),
])
def test_unusable_files(tmp_path, suffix, text, line, what):
    f = tmp_path / f"rows{suffix}"
    f.write_text(text, encoding="utf-8")
    with pytest.raises(PreferenceDataError, match=at(f, line) + ".*" + re.escape(what)):
        load_preference_rows(f)


def test_not_utf8_names_the_line(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_bytes(json.dumps(GOOD).encode() + b'\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(PreferenceDataError, match=at(f, 2) + "not UTF-8"):
        load_preference_rows(f)


def test_missing_file_and_wrong_type(tmp_path):
    with pytest.raises(PreferenceDataError, match=re.escape(f"{tmp_path / 'nope.jsonl'}: no such file or folder — ")):
        load_preference_rows(tmp_path / "nope.jsonl")
    csv = tmp_path / "rows.csv"
    csv.write_text("prompt,chosen,rejected\n")
    with pytest.raises(PreferenceDataError, match=r"unknown data file type '\.csv' — use \.jsonl"):
        load_preference_rows(csv)


def test_prompt_row_errors(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"question": "where is the prompt"}])
    with pytest.raises(PreferenceDataError, match=at(f, 2) + "missing field 'prompt'"):
        load_prompt_rows(f)
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok", "reference": ["a"]}])
    with pytest.raises(PreferenceDataError, match=at(f, 1) + "field 'reference' is a list, not a string"):
        load_prompt_rows(f)


def test_cli_validates_a_folder(tmp_path, capsys):
    from rlhf_overlay.data.preference_data import main

    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "eval.jsonl", ROWS[:1])
    assert main([str(tmp_path)]) == 0
    assert "train.jsonl: 2 valid preference rows" in capsys.readouterr().out
    write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "p"}])
    assert main([str(tmp_path)]) == 2
    assert f"{tmp_path / 'eval.jsonl'}:1: missing field 'chosen'" in capsys.readouterr().err


def test_cli_refuses_a_folder_without_train_as_training_does(tmp_path, capsys):
    """A folder with only eval.jsonl used to pass (`eval.jsonl: 100 valid rows`, exit 0); every training target
    refuses it, so the validator does too."""
    from rlhf_overlay.data.preference_data import main

    write_jsonl(tmp_path / "eval.jsonl", ROWS)
    before = sorted(tmp_path.iterdir())
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path}: folder has no train.jsonl or train.json — put the train rows there, or pass " \
                  f"the data file itself\n"
    assert sorted(tmp_path.iterdir()) == before


def test_a_single_file_is_split_into_train_and_a_held_out_share(tmp_path, capsys):
    from rlhf_overlay.data.preference_data import held_out_indices, main, split_held_out

    rows = [dict(ROWS[0], prompt=f"Human: question {i}? Assistant:") for i in range(50)]
    f = write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert main([str(f)]) == 0
    out = capsys.readouterr().out
    assert f"{f}: 50 valid preference rows: 45 train, 5 eval" in out
    assert f"note: {f} is the only data file (no eval file): 5 of its 50 rows (10%) are held out for evaluation " \
           f"and not trained on" in out
    train, ev = split_held_out(rows)
    assert len(train) == 45 and len(ev) == 5 and not {r["prompt"] for r in train} & {r["prompt"] for r in ev}
    assert held_out_indices(50) == held_out_indices(50) and held_out_indices(50) != [45, 46, 47, 48, 49]
    with pytest.raises(PreferenceDataError, match="too few to hold out"):
        split_held_out(rows[:1], file=f)


def test_overlong_rows_are_one_warning_per_file_with_line_tokens_and_side(tmp_path):
    from rlhf_overlay.data.preference_data import overlong_warning, preference_rows_with_lines

    rows = [dict(ROWS[0]), dict(ROWS[1], chosen=" long" * 40), dict(ROWS[0], rejected=" x" * 20)]
    f = write_jsonl(tmp_path / "pairs.jsonl", rows)
    words = lambda texts: [len(t.split()) for t in texts]  # noqa: E731  (a whitespace "tokenizer")
    both = lambda r: [("prompt + chosen", r["prompt"] + r["chosen"]), ("prompt + rejected", r["prompt"] + r["rejected"])]  # noqa: E731
    w = overlong_warning(f, preference_rows_with_lines(f), both, words, 20, "right")
    n = len((ROWS[1]["prompt"] + " long" * 40).split())
    assert w == (f"warning: {f}:2: prompt + chosen is longer than 20 tokens ({n - 20} of its {n} tokens dropped from "
                 f"the right); 2 rows of this file are truncated to 20 tokens — raise the maximum length (max_seq_len "
                 f"/ --max-length) or shorten these rows")
    assert overlong_warning(f, preference_rows_with_lines(f), both, words, 1000, "left") is None


def test_join_conversation_is_prompt_plus_answer():
    from rlhf_overlay.data.preference_data import join_conversation

    assert join_conversation("Human: hi Assistant:", " hello") == "Human: hi Assistant: hello"
    assert join_conversation("Human: hi Assistant:", "hello") == "Human: hi Assistant: hello"   # one space added
    assert join_conversation("Human: hi Assistant: ", "hello") == "Human: hi Assistant: hello"
    assert join_conversation("", "hello") == "hello"


# ---------------------------------------------------------------------------------------------- in the training runs
def _single_file_with_a_long_row(tiny_assets, tmp_path) -> Path:
    rows = [json.loads(line) for line in (tiny_assets / "data" / "preference" / "train.jsonl").read_text().splitlines()[:60]]
    rows[6]["chosen"] += " and" * 400          # line 7: far longer than any maximum length used here
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def _run(argv, tmp_path):
    import os
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))


@pytest.mark.slow
def test_trlx_reward_model_holds_out_a_share_and_warns_about_the_long_row(tiny_assets, tmp_path):
    data = _single_file_with_a_long_row(tiny_assets, tmp_path)
    before = data.read_bytes()
    res = _run(["rlhf_overlay.trlx_jobs.reward_model", "--data", "pairs.jsonl", "--max-steps", "2", "--output", "out"],
               tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"data: 54 train / 6 eval pairs (train: {data}; eval: {data} (6 of its rows held out, not trained on))" \
        in res.stdout
    warnings_ = [line for line in res.stdout.splitlines() if line.startswith("warning: ")]
    assert len(warnings_) == 1 and warnings_[0].startswith(f"warning: {data}:7: prompt + chosen is longer than 128 "
                                                           f"tokens (") and "dropped from the left" in warnings_[0]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["train_pairs"] + metrics["eval_pairs"] == 60 and metrics["eval_pairs"] == 6
    assert data.read_bytes() == before


@pytest.mark.slow
@pytest.mark.upstream
def test_dschat_reward_model_holds_out_a_share_and_warns_about_the_long_row(dschat_dir, tiny_assets, tmp_path):
    """The issue's case: `make rm-llama2 DATA=file.json` evaluated on its own training rows ("eval accuracy 1.000")
    without a word, and cut a long row from the right silently."""
    data = _single_file_with_a_long_row(tiny_assets, tmp_path)
    res = _run(["rlhf_overlay.dschat_jobs.reward_model", "--data", "pairs.jsonl", "--max-steps", "3", "--max-seq-len", "48",
                "--output", "out"], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (f"note: {data} is the only data file (no eval file): 6 of its 60 rows (10%) are held out for evaluation "
            f"and not trained on") in res.stdout
    warnings_ = [line for line in res.stdout.splitlines() if line.startswith("warning: ")]
    assert len(warnings_) == 1 and warnings_[0].startswith(f"warning: {data}:7: prompt + chosen is longer than 48 "
                                                           f"tokens (") and "dropped from the right" in warnings_[0]


def test_ppo_prompts_longer_than_the_prompt_budget_are_one_warning(tiny_assets, tmp_path):
    from rlhf_overlay.data.preference_data import prompt_overlong_warnings

    rows = [{"prompt": "Human: tell me about the garden. Assistant:"} for _ in range(10)]
    rows[4]["prompt"] = "Human: " + "garden " * 200 + "Assistant:"
    f = write_jsonl(tmp_path / "prompts.jsonl", rows)
    [w] = prompt_overlong_warnings(f, tiny_assets / "models" / "tiny-bloom", 52)
    assert w.startswith(f"warning: {f}:5: prompt is longer than 52 tokens (") and "dropped from the left" in w
    assert w.endswith("raise the maximum length (--seq-length, or fewer --max-new-tokens) or shorten these rows")
    assert prompt_overlong_warnings(f, tiny_assets / "models" / "tiny-bloom", 10_000) == []
