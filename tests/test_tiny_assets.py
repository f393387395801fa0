"""The embedded tiny assets: models load and run offline, tokenizers keep the synthetic words whole, the data
validates and carries a learnable (not length-based) signal, the pre-trained bases answer fluently and neutrally
(random-init ones do not), builds are deterministic, idempotent and careful with your edits. Everything is built into tmp folders, never into the repo's assets/."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_overlay import PROJECT_ROOT

from rlhf_overlay.data import synthetic
from rlhf_overlay.data.preference_data import load_preference_rows, load_prompt_rows
from rlhf_overlay.data.tiny_assets import LOCK_FILE, STAMP_FILE, AssetsError, ensure_tiny_assets, word_token_count

MODELS = ["tiny-llama", "tiny-bloom", "tiny-gptj"]
ARCHITECTURES = {"tiny-llama": "LlamaForCausalLM", "tiny-bloom": "BloomForCausalLM", "tiny-gptj": "GPTJForCausalLM"}
SENTENCE = "Human: what do you think of the garden? Assistant: the garden is wonderful, really calm."


def _quiet(_msg):
    pass


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Path:
    # Pre-training the three models takes ~40 s of CPU (benchmarked by `make assets`, not asserted here).
    return ensure_tiny_assets(tmp_path_factory.mktemp("assets-a"), log=_quiet)


def _tokenizer(root: Path, name: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(root / "models" / name)


def _all_files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------------- layout and models
def test_layout_is_the_contract(assets):
    for name in MODELS:
        folder = assets / "models" / name
        assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
        assert not (folder / "pytorch_model.bin").exists()
        assert (folder / "tokenizer.json").is_file()
    assert (assets / "models" / "tiny-llama" / "tokenizer.model").is_file()
    for kind in ("preference", "prompts"):
        for split in ("train", "eval"):
            assert (assets / "data" / kind / f"{split}.jsonl").is_file()
    assert json.loads((assets / STAMP_FILE).read_text())["parts"].keys() == {
        "models/tiny-llama", "models/tiny-bloom", "models/tiny-gptj", "data/preference", "data/prompts"}


@pytest.mark.parametrize("name", MODELS)
def test_model_loads_offline_runs_forward_and_generate(assets, name, monkeypatch):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = assets / "models" / name
    tok = _tokenizer(assets, name)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    config = AutoConfig.from_pretrained(folder)
    assert type(model).__name__ == ARCHITECTURES[name]
    assert config.vocab_size == len(tok) == model.get_input_embeddings().weight.shape[0]
    enc = tok([SENTENCE], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=pad)
    assert out.shape[1] <= enc["input_ids"].shape[1] + 5 and out.shape[1] > enc["input_ids"].shape[1]
    # special token ids agree between tokenizer, config.json and generation_config.json
    gen = json.loads((folder / "generation_config.json").read_text())
    for key in ("bos_token_id", "eos_token_id"):
        assert getattr(config, key) == getattr(tok, key) == gen[key], key
    assert tok.unk_token_id is not None and tok.bos_token is not None and tok.eos_token is not None


def test_tiny_llama_has_grouped_query_attention_and_a_slow_sentencepiece_tokenizer(assets):
    from transformers import AutoConfig, LlamaTokenizer

    folder = assets / "models" / "tiny-llama"
    config = AutoConfig.from_pretrained(folder)
    assert config.num_key_value_heads < config.num_attention_heads
    slow = LlamaTokenizer.from_pretrained(folder)  # DeepSpeed-Chat's path
    fast = _tokenizer(assets, "tiny-llama")
    assert type(fast).__name__ == "LlamaTokenizerFast"
    assert (slow.bos_token, slow.eos_token, slow.unk_token) == ("<s>", "</s>", "<unk>")
    assert (slow.bos_token_id, slow.eos_token_id) == (config.bos_token_id, config.eos_token_id) == (1, 2)
    assert len(slow) == len(fast) == config.vocab_size
    rows = _read_jsonl(assets / "data" / "preference" / "eval.jsonl")[:50]
    # DeepSpeed-Chat's text format (" " + prompt + " " + answer) starts with a space: slow and fast must agree
    texts = [" " + r["prompt"] + " " + r["chosen"] for r in rows] + [SENTENCE, "Héllo wörld 123 ✓", "a  b"]
    for text in texts:
        assert slow(text)["input_ids"] == fast(text)["input_ids"], text
    assert slow.tokenize("Human: hello")[0] == "▁Human"


def test_bloom_and_gptj_special_tokens(assets):
    bloom = _tokenizer(assets, "tiny-bloom")
    assert type(bloom).__name__ == "BloomTokenizerFast"
    assert (bloom.unk_token, bloom.bos_token, bloom.eos_token, bloom.pad_token) == ("<unk>", "<s>", "</s>", "<pad>")
    assert (bloom.unk_token_id, bloom.bos_token_id, bloom.eos_token_id, bloom.pad_token_id) == (0, 1, 2, 3)
    gptj = _tokenizer(assets, "tiny-gptj")
    assert gptj.bos_token == gptj.eos_token == gptj.pad_token == "<|endoftext|>"
    from transformers import GPT2Tokenizer
    slow = GPT2Tokenizer.from_pretrained(assets / "models" / "tiny-gptj")  # vocab.json + merges.txt
    assert slow(SENTENCE)["input_ids"] == gptj(SENTENCE)["input_ids"]


@pytest.mark.parametrize("name", MODELS)
def test_tokenizer_roundtrip_and_whole_words(assets, name):
    tok = _tokenizer(assets, name)
    for text in (SENTENCE, "hello, how are you?", "Héllo wörld 123 — ✓"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    # POSITIVE (and NEGATIVE) words are single tokens: the rule reward and the length matching rely on it.
    assert [w for w in synthetic.sentiment_words() if word_token_count(tok, w) != 1] == []
    # ... and so is every other word of the synthetic language
    assert [w for w in synthetic.all_words() if word_token_count(tok, w) != 1] == []


# ---------------------------------------------------------------------------------------------- data
def test_data_validates_with_the_one_loader(assets):
    pref = assets / "data" / "preference"
    train, evaluation = load_preference_rows(pref, split="train"), load_preference_rows(pref, split="eval")
    assert len(train) >= 2000 and 200 <= len(evaluation) < len(train)
    assert all(r["prompt"].startswith("Human: ") and r["prompt"].endswith(" Assistant:") for r in train)
    assert all(r["chosen"].startswith(" ") and r["rejected"].startswith(" ") for r in train)
    key = lambda r: (r["prompt"], r["chosen"], r["rejected"])  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in evaluation}, "eval repeats train rows"
    prompts = load_prompt_rows(assets / "data" / "prompts", split="train")
    assert len(prompts) >= 1000 and all(r.get("reference") for r in prompts)
    assert load_prompt_rows(assets / "data" / "prompts", split="eval")


@pytest.mark.parametrize("name", MODELS)
def test_chosen_and_rejected_have_the_same_token_length(assets, name):
    tok = _tokenizer(assets, name)
    rows = load_preference_rows(assets / "data" / "preference", split="eval")
    lengths = lambda key: [len(x) for x in tok([r["prompt"] + r[key] for r in rows])["input_ids"]]  # noqa: E731
    assert lengths("chosen") == lengths("rejected")


def test_rule_reward_bounds_and_order():
    from rlhf_overlay.data.synthetic import rule_reward

    pos, ref, neutral, neg = rule_reward([" good great happy kind", " the garden is bright and calm.",
                                          " the garden is there.", " bad awful sad rude"])
    assert pos == 1.0 and neg == 0.0 and neutral == 0.5
    assert pos > ref > neutral > neg
    assert rule_reward(["", "!!!", "GOOD"]) == [0.5, 0.5, 0.5 + 0.5 / synthetic.MIN_WORDS]
    assert all(0.0 <= x <= 1.0 for x in rule_reward(["good bad " * 20, "x" * 1000, "good" * 3]))


def test_rule_reward_prefers_every_chosen_answer(assets):
    rows = load_preference_rows(assets / "data" / "preference", split="eval")
    chosen = synthetic.rule_reward([r["chosen"] for r in rows])
    rejected = synthetic.rule_reward([r["rejected"] for r in rows])
    assert all(c > r for c, r in zip(chosen, rejected))


def test_signal_is_learnable_but_not_by_length(assets):
    """A bag-of-words Bradley-Terry model (logistic regression on count differences) learns the preference in a
    few seconds; the length of the answers alone is a coin flip."""
    import torch

    tok = _tokenizer(assets, "tiny-bloom")
    pref = assets / "data" / "preference"

    def features(rows):
        def bow(texts):
            x = torch.zeros(len(texts), len(tok))
            for i, ids in enumerate(tok(texts, add_special_tokens=False)["input_ids"]):
                x[i].index_add_(0, torch.tensor(ids), torch.ones(len(ids)))
            return x
        return bow([r["chosen"] for r in rows]) - bow([r["rejected"] for r in rows])

    train_rows, eval_rows = load_preference_rows(pref, split="train"), load_preference_rows(pref, split="eval")
    x_train, x_eval = features(train_rows), features(eval_rows)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        w = torch.zeros(len(tok), requires_grad=True)
        opt = torch.optim.Adam([w], lr=0.05)
        for _ in range(100):
            opt.zero_grad()
            loss = torch.nn.functional.softplus(-(x_train @ w)).mean()  # -log sigmoid(score_chosen - score_rej)
            loss.backward()
            opt.step()
    accuracy = ((x_eval @ w.detach()) > 0).float().mean().item()
    assert accuracy > 0.9, accuracy

    def by_length(r):  # predict "the longer answer is chosen", ties count half
        c, j = (len(tok(r[k], add_special_tokens=False)["input_ids"]) for k in ("chosen", "rejected"))
        return 1.0 if c > j else 0.5 if c == j else 0.0
    length_accuracy = sum(by_length(r) for r in eval_rows) / len(eval_rows)
    assert abs(length_accuracy - 0.5) < 0.05, length_accuracy


# ---------------------------------------------------------------------------------------------- build behaviour
def test_two_builds_are_byte_identical(assets, tmp_path):
    other = ensure_tiny_assets(tmp_path / "assets-b", log=_quiet)
    a, b = _all_files(assets), _all_files(other)
    assert a.keys() == b.keys()
    # Every file, including safetensors, tokenizer.json, tokenizer.model and BUILD_INFO.json, is byte-identical:
    # seeds are fixed, training is single-threaded, and nothing records a path or a time.
    different = [rel for rel in a if a[rel].read_bytes() != b[rel].read_bytes()]
    assert different == []


def _copy(assets: Path, dest: Path) -> Path:
    shutil.copytree(assets, dest, copy_function=shutil.copy2)  # copy2 keeps mtimes
    return dest


def _mtimes(root: Path) -> dict[str, int]:
    return {rel: p.stat().st_mtime_ns for rel, p in _all_files(root).items()}


def test_second_call_is_a_fast_no_op(assets):
    before = _mtimes(assets)
    messages = []
    t0 = time.perf_counter()
    assert ensure_tiny_assets(assets, log=messages.append) == assets
    assert time.perf_counter() - t0 < 2.0
    assert messages == [] and _mtimes(assets) == before


def test_only_a_missing_part_is_rebuilt(assets, tmp_path):
    root = _copy(assets, tmp_path / "copy")
    (root / "models" / "tiny-gptj" / "config.json").unlink()
    before = _mtimes(root)
    messages = []
    ensure_tiny_assets(root, log=messages.append)
    after = _mtimes(root)
    changed = {rel for rel in after if before.get(rel) != after[rel]} - {STAMP_FILE}
    assert changed and all(rel.startswith("models/tiny-gptj/") for rel in changed), changed
    assert any("models/tiny-gptj" in m for m in messages)
    assert (root / "models" / "tiny-gptj" / "config.json").read_bytes() == \
        (assets / "models" / "tiny-gptj" / "config.json").read_bytes()


def test_an_edited_file_is_kept_with_a_warning(assets, tmp_path):
    root = _copy(assets, tmp_path / "copy")
    edited = root / "data" / "preference" / "eval.jsonl"
    edited.write_text(edited.read_text().splitlines()[0] + "\n")
    with pytest.warns(UserWarning, match="eval.jsonl.*keeping your edit"):
        ensure_tiny_assets(root, log=_quiet)
    assert len(edited.read_text().splitlines()) == 1


def test_a_rebuild_never_overwrites_an_edit_silently(assets, tmp_path):
    root = _copy(assets, tmp_path / "copy")
    part = root / "data" / "preference"
    (part / "eval.jsonl").write_text("my own rows\n")
    (part / "train.jsonl").unlink()                     # the part must be rebuilt now
    with pytest.raises(AssetsError, match=r"eval\.jsonl.*--force"):
        ensure_tiny_assets(root, log=_quiet)
    assert (part / "eval.jsonl").read_text() == "my own rows\n"   # untouched
    assert not list((root / "data").glob(".*tmp-*"))               # no temporary folder left behind
    ensure_tiny_assets(root, force=True, log=_quiet)
    assert (part / "eval.jsonl").read_bytes() == (assets / "data" / "preference" / "eval.jsonl").read_bytes()


def test_outdated_stamp_rebuilds_an_unedited_part(assets, tmp_path):
    root = _copy(assets, tmp_path / "copy")
    stamp = json.loads((root / STAMP_FILE).read_text())
    stamp["parts"]["data/prompts"]["settings_hash"] = "0" * 64   # as if built by another builder version
    (root / STAMP_FILE).write_text(json.dumps(stamp))
    messages = []
    ensure_tiny_assets(root, log=messages.append)
    assert [m for m in messages if m.startswith("building")] == [
        f"building data/prompts (built with other settings or library versions) in {root}"]
    assert (root / STAMP_FILE).read_bytes() == (assets / STAMP_FILE).read_bytes()


def test_env_variable_picks_the_folder(assets, monkeypatch):
    monkeypatch.setenv("RLHF_OVERLAY_ASSETS", str(assets))
    assert ensure_tiny_assets(log=_quiet) == assets


def test_cli_help_is_instant_and_imports_nothing_heavy():
    code = ("import sys, rlhf_overlay.data.tiny_assets as t\n"
            "try:\n    t.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "heavy = [m for m in ('torch', 'transformers', 'tokenizers', 'sentencepiece') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "python -m rlhf_overlay.data.tiny_assets" in res.stdout and "--force" in res.stdout


def test_cli_reports_the_parts(assets):
    res = subprocess.run([sys.executable, "-m", "rlhf_overlay.data.tiny_assets", "--out", str(assets)], cwd=PROJECT_ROOT,
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert res.returncode == 0, res.stderr
    assert "models/tiny-llama" in res.stdout and "params" in res.stdout and "train 4000 rows" in res.stdout



def test_read_only_assets_are_usable_when_current_and_say_so_when_not(assets, tmp_path, monkeypatch):
    import contextlib

    from rlhf_overlay.data import tiny_assets
    @contextlib.contextmanager
    def read_only(root):  # what _locked yields when the lock file cannot be created (read-only folder)
        yield PermissionError(13, "Permission denied")

    monkeypatch.setattr(tiny_assets, "_locked", read_only)
    root = _copy(assets, tmp_path / "ro")
    assert ensure_tiny_assets(root, log=_quiet) == root
    (root / "data" / "prompts" / "eval.jsonl").unlink()
    with pytest.raises(AssetsError, match=r"data/prompts: needs a build \(missing eval\.jsonl\) but .* not writable"):
        ensure_tiny_assets(root, log=_quiet)


# ---------------------------------------------------------------------------------------------- pre-trained bases
def _sample_answers(folder: Path, prompts: list[str], seed: int = 0) -> list[str]:
    """Sampled (temperature 1, as PPO's rollouts) answers of the model in `folder` to `prompts`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(**enc, do_sample=True, top_k=0, max_new_tokens=20, pad_token_id=tok.pad_token_id)
    return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="session")
def random_init_assets(tmp_path_factory) -> Path:
    return ensure_tiny_assets(tmp_path_factory.mktemp("assets-random"), log=_quiet, random_init=True)


@pytest.mark.parametrize("name", MODELS)
def test_pretrained_bases_answer_fluently_and_neutrally_random_init_do_not(assets, random_init_assets, name):
    prompts = [r["prompt"] for r in _read_jsonl(assets / "data" / "prompts" / "eval.jsonl")[:48]]
    answers = _sample_answers(assets / "models" / name, prompts)
    flu = synthetic.fluency(answers)
    assert flu["fluency"] >= 0.95 and flu["degenerate"] <= 0.05, (flu, answers[:5])
    # neutral between POSITIVE and NEGATIVE words: it saw both equally often
    reward = sum(synthetic.rule_reward(answers)) / len(answers)
    assert abs(reward - 0.5) < 0.07, (reward, answers[:5])
    noise = synthetic.fluency(_sample_answers(random_init_assets / "models" / name, prompts))
    assert noise["fluency"] < 0.5, noise


def test_build_info_records_how_each_base_was_trained(assets, random_init_assets):
    from rlhf_overlay.data.tiny_assets import PRETRAIN

    for name in MODELS:
        info = json.loads((assets / STAMP_FILE).read_text())["parts"][f"models/{name}"]["info"]
        assert info["init"] == "pretrained" and info["pretrain"]["settings"] == PRETRAIN
        # held-out loss in nats/token: far below random init (~ln(vocab) = 6.5), near the language's own entropy
        assert 0.3 < info["pretrain"]["heldout_loss"] < 1.2, info["pretrain"]
        assert info["pretrain"]["train_loss_first"] > 5.0
        rand = json.loads((random_init_assets / STAMP_FILE).read_text())["parts"][f"models/{name}"]["info"]
        assert rand["init"] == "random" and "pretrain" not in rand


def test_random_init_flag_rebuilds_only_the_models(assets, tmp_path):
    root = _copy(assets, tmp_path / "copy")
    messages = []
    ensure_tiny_assets(root, log=messages.append, random_init=True)
    built = sorted(m.split()[1] for m in messages if m.startswith("building"))
    assert built == ["models/tiny-bloom", "models/tiny-gptj", "models/tiny-llama"]
    assert (root / "data").exists() and _all_files(root)["data/preference/train.jsonl"].read_bytes() == \
        (assets / "data" / "preference" / "train.jsonl").read_bytes()


def test_fluency_measure():
    good = " the garden is bright and calm."
    assert synthetic.fluency([good])["fluency"] == 1.0
    assert synthetic.answer_fluency("\ufffd calm can\ufffd\ufffd gentle happy do~") == pytest.approx(0.5)
    for degenerate in ("", "  .  ", "good good good", " so calm so calm so calm.", "a b c d a b c d a b c d"):
        assert synthetic.answer_fluency(degenerate) == 0.0, degenerate
    flu = synthetic.fluency([good, "good good good", "xyzzy garden"])
    assert flu["degenerate"] == pytest.approx(1 / 3) and flu["in_language"] == pytest.approx(10 / 11)
    assert flu["fluency"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)
    rows = synthetic.preference_rows(300, seed=3)   # the language itself is fluent, and made of sentences
    flu = synthetic.fluency([r["chosen"] for r in rows] + [r["rejected"] for r in rows])
    assert flu["fluency"] == 1.0 and flu["sentences"] == 1.0
    # sentences: a frame of the language, or its beginning (cut by the generation limit); not a word list
    words = synthetic.answer_words
    assert synthetic.is_sentence(words(" the garden is bright and calm."))
    assert synthetic.is_sentence(words(" people say the river is calm, but i"))
    assert not synthetic.is_sentence(words(" a friendly happy safe kind gentle bright"))
    assert not synthetic.is_sentence(words(" the garden is bright and calm. the garden is"))
    assert not synthetic.is_sentence([])
