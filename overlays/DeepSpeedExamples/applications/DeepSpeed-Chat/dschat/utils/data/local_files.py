# rlhf-overlay: NEW file (not in upstream DeepSpeed-Chat). Lets `--data_path` name the user's own JSON/JSONL
# files or folder instead of only <DeepSpeed-Chat>/data/{train,eval}.json (`local/jsonfile`), and validates
# every row through rlhf_overlay.data.preference_data so a bad row is reported as `file:line: what is wrong`.
# Used by dschat/utils/data/data_utils.py (patch 0004-local-preference-files.patch).
"""Local JSON/JSONL data for DeepSpeed-Chat.

`--data_path` may be
  - a folder holding train.jsonl/train.json and eval.jsonl/eval.json (eval optional: then a held-out share of the
    train file is the eval data),
  - one .json/.jsonl file: a fixed share of its rows (rlhf_overlay.data.preference_data.held_out_indices) is held out
    for evaluation and not trained on, and the run says so,
  - `local/jsonfile` (upstream's fixed <DeepSpeed-Chat>/data/{train,eval}.json, kept for compatibility).
Rows: {"prompt", "chosen", "rejected"} (phases 1-3), or {"prompt"} plus optional other keys for a prompt-only
file (phase 3 PPO prompts). JSON files hold a list of rows; JSONL one row per line.
"""
import hashlib
import os

from datasets import Dataset

from dschat.utils.data.raw_datasets import PromptRawDataset

DATA_SUFFIXES = (".jsonl", ".json")


class LocalDataError(ValueError):
    """A local data path that cannot be used; the message names the file (and line) and what to fix."""


def _find_split_file(folder, split):
    for suffix in DATA_SUFFIXES:
        candidate = os.path.join(folder, split + suffix)
        if os.path.isfile(candidate):
            return candidate
    return None


def is_local_data_path(dataset_name):
    """True when `dataset_name` is a local JSON/JSONL file or a folder with train.json(l)."""
    if os.path.isfile(dataset_name):
        return dataset_name.endswith(DATA_SUFFIXES)
    return os.path.isdir(dataset_name) and _find_split_file(
        dataset_name, "train") is not None


def resolve_local_files(dataset_name):
    """{'train': path, 'eval': path} for a local data path (see the module docstring)."""
    if os.path.isfile(dataset_name):
        if not dataset_name.endswith(DATA_SUFFIXES):
            raise LocalDataError(
                f"{dataset_name}: not a .json or .jsonl file")
        path = os.path.abspath(dataset_name)
        return {"train": path, "eval": path}
    if os.path.isdir(dataset_name):
        train = _find_split_file(dataset_name, "train")
        if train is None:
            raise LocalDataError(
                f"{dataset_name}: folder has no train.jsonl or train.json")
        evaluation = _find_split_file(dataset_name, "eval") or train
        return {
            "train": os.path.abspath(train),
            "eval": os.path.abspath(evaluation)
        }
    raise LocalDataError(f"{dataset_name}: no such file or folder")


def data_fingerprint(paths):
    """Changes when any file's path, size or modification time changes, so caches keyed by it go stale."""
    h = hashlib.sha256()
    for path in sorted(set(paths)):
        st = os.stat(path)
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def load_rows(path, split):
    """Validated rows of one file as [(line, row)]: preference rows via rlhf_overlay.data.preference_data, or
    prompt-only rows."""
    try:
        from rlhf_overlay.data.preference_data import preference_rows_with_lines, prompt_rows_with_lines
    except ImportError as e:  # DeepSpeed-Chat used outside rlhf-overlay's environment
        raise LocalDataError(
            f"{path}: reading local data needs the rlhf_overlay package on PYTHONPATH "
            f"(run through `make rm-llama2`/`make ppo-llama2` or `pip install -e <rlhf-overlay>`): {e}"
        ) from e
    if _first_row_has_any(path, ("chosen", "choosen", "rejected")):
        return preference_rows_with_lines(path, split=split)
    return prompt_rows_with_lines(path, split=split)


def split_rows(files, local_rank):
    """{split: [(line, row)]}: each file's rows; one file for both splits is split into train and a held-out
    eval share (the same rows on every rank and every run), which rank 0 announces."""
    if files["train"] != files["eval"]:
        return {split: load_rows(path, split) for split, path in files.items()}
    from rlhf_overlay.data.preference_data import held_out_note, split_held_out
    rows = load_rows(files["train"], "train")
    train, evaluation = split_held_out(rows, file=files["train"])
    if local_rank <= 0:
        print(f"note: {held_out_note(files['train'], len(rows))}", flush=True)
    return {"train": train, "eval": evaluation}


def _first_row_has_any(path, keys):
    """Cheap peek used only to pick the validator; the validator itself reports any malformed row.
    ("choosen" is the seed's misspelling, which the preference validator accepts with a warning.)"""
    import json
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                for line in f:
                    if line.strip():
                        row = json.loads(line)
                        return isinstance(row, dict) and any(k in row for k in keys)
                return False
            data = json.load(f)
    except ValueError:
        return True  # unreadable: let the preference validator report file:line
    rows = data if isinstance(data, list) else [data]
    return bool(rows) and isinstance(rows[0], dict) and any(k in rows[0] for k in keys)


class LocalFileDataset(PromptRawDataset):
    """DeepSpeed-Chat raw dataset over local JSON/JSONL files (same text format as upstream's local/jsonfile)."""

    def __init__(self, output_path, seed, local_rank, dataset_name, files):
        # PromptRawDataset would load_from_disk() an existing path: pass the compatibility name instead.
        super().__init__(output_path, seed, local_rank, 'local/jsonfile')
        self.files = files
        self.dataset_name = dataset_name
        # Unique per path *and* content, so split indices and tokenized caches never mix two data versions.
        self.dataset_name_clean = "localfile_" + data_fingerprint(
            files.values())
        self.lines = split_rows(files, local_rank)  # {split: [(line, row)]}
        self.rows = {
            split: [row for _, row in rows]
            for split, rows in self.lines.items()
        }
        self.has_pairs = all("chosen" in r and "rejected" in r
                             for rows in self.rows.values() for r in rows)
        self.raw_datasets = {
            split: Dataset.from_list([{
                "prompt": r["prompt"],
                "chosen": r.get("chosen"),
                "rejected": r.get("rejected")
            } for r in rows])
            for split, rows in self.rows.items()
        }

    def require_pairs(self, train_phase):
        if train_phase in (1, 2) and not self.has_pairs:
            raise LocalDataError(
                f"{self.dataset_name}: phase {train_phase} needs rows with prompt, chosen and rejected; "
                f"{', '.join(sorted(set(self.files.values())))} hold prompt-only rows (fit for PPO only)"
            )

    def warn_overlong(self, tokenizer, max_seq_len, end_of_conversation_token,
                      train_phase):
        """One warning per file whose rows are longer than max_seq_len tokens as this phase tokenizes them:
        phases 1-2 truncate prompt + answer + end-of-conversation token (on the tokenizer's truncation side),
        phase 3 drops prompts longer than the maximum prompt length."""
        from rlhf_overlay.data.preference_data import join_conversation, overlong_warning

        def texts(row):
            if train_phase == 3:
                return [("prompt", row["prompt"])]
            answers = ("chosen", ) if train_phase == 1 else ("chosen",
                                                               "rejected")
            return [(f"prompt + {k}",
                     join_conversation(row["prompt"], row[k]) +
                     end_of_conversation_token) for k in answers]

        def count(batch):
            return [
                len(ids)
                for ids in tokenizer(batch, verbose=False)["input_ids"]
            ]

        side = getattr(tokenizer, "truncation_side", "right")
        by_file = {}  # one file for both splits: warn once for all of it
        for split, path in self.files.items():
            by_file.setdefault(path, []).extend(self.lines[split])
        for path, rows in by_file.items():
            w = overlong_warning(path, sorted(rows, key=lambda lr: lr[0]),
                                 texts, count, max_seq_len, side,
                                 "dropped" if train_phase == 3 else "truncated")
            if w:
                print(w, flush=True)

    def get_train_data(self):
        return self.raw_datasets["train"]

    def get_eval_data(self):
        return self.raw_datasets["eval"]

    # Text format: prompt + answer (rlhf_overlay.data.preference_data.join_conversation), as Dahoas/rm-static and our
    # data format (answers start with a space). Upstream LocalJsonFileDataset wrote " " + prompt + " " + answer,
    # which put a lone extra space token at the start and between prompt and answer, and differed from what
    # `make eval-rm` scores.
    def get_prompt(self, sample):
        if sample['prompt'] is not None:
            return sample['prompt']
        return None

    def get_chosen(self, sample):
        if sample['chosen'] is not None:
            return sample['chosen']
        return None

    def get_rejected(self, sample):
        if sample['rejected'] is not None:
            return sample['rejected']
        return None

    def get_prompt_and_chosen(self, sample):
        if sample['prompt'] is not None and sample['chosen'] is not None:
            from rlhf_overlay.data.preference_data import join_conversation
            return join_conversation(sample['prompt'], sample['chosen'])
        return None

    def get_prompt_and_rejected(self, sample):
        if sample['prompt'] is not None and sample['rejected'] is not None:
            from rlhf_overlay.data.preference_data import join_conversation
            return join_conversation(sample['prompt'], sample['rejected'])
        return None
