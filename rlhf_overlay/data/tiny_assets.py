"""Build the embedded tiny models, tokenizers and synthetic data: everything the CPU jobs and tests need, offline.

    python -m rlhf_overlay.data.tiny_assets                   # -> assets/ at the repo root (or $RLHF_OVERLAY_ASSETS)
    python -m rlhf_overlay.data.tiny_assets --out /tmp/assets # somewhere else
    python -m rlhf_overlay.data.tiny_assets --force           # rebuild everything, even over files you edited
    make assets

From Python (tests, training scripts):   from rlhf_overlay.data.tiny_assets import ensure_tiny_assets
                                          root = ensure_tiny_assets()   # Path of the assets folder

Layout (a contract: other modules use these exact names):
    models/tiny-llama/      LlamaForCausalLM, grouped-query attention; SentencePiece tokenizer.model (+ tokenizer.json)
    models/tiny-bloom/      BloomForCausalLM; byte-level BPE BloomTokenizerFast (<unk> <s> </s> <pad>)
    models/tiny-gptj/       GPTJForCausalLM; GPT-2 style byte-level BPE (<|endoftext|> = bos = eos = pad)
    data/preference/        train.jsonl, eval.jsonl: {"prompt", "chosen", "rejected"} (docs/data_formats.md)
    data/prompts/           train.jsonl, eval.jsonl: {"prompt", "reference"} for PPO
    BUILD_INFO.json         per part: a hash of the settings that made it, the sha256 of every file, and for each
                            model how it was trained (PRETRAIN) and its held-out loss

Each tiny model is pre-trained (PRETRAIN: ~300 AdamW steps, ~15 s per model on one core) as a language model on
synthetic conversations, prompt + chosen and prompt + rejected answers alike, each ending in EOS: it answers a
prompt in the synthetic language, stops, and is neutral between POSITIVE and NEGATIVE words (it saw both
equally) — a stand-in for an SFT model. `--random-init` (ensure_tiny_assets(random_init=True)) builds the
untrained models instead (same tokenizers and data), e.g. into a separate --out folder.

Random init, pre-training and tokenizer training are seeded (SentencePiece single-threaded; the byte-level BPE
trainer gives the same merges with or without TOKENIZERS_PARALLELISM; pre-training runs on one thread with
torch.use_deterministic_algorithms), and nothing written records a path or a time, so two builds on one machine
give byte-identical files (tested). A second call checks the stamp and the file hashes (~50 ms, imports
neither torch nor transformers) and rewrites nothing. A part is rebuilt when it is
missing, incomplete, or made by other settings/library versions; the new part is built in a temporary folder
beside the old one and swapped in by rename. A file you edited (its hash no longer matches the stamp) is kept,
with a warning; a rebuild that would overwrite it stops with an error unless --force.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from rlhf_overlay.data import synthetic
from rlhf_overlay.errors import ArgumentParser, UserError, main_guard

# Bump when a builder below changes what it writes: the stamp only knows settings and versions, so without a
# bump existing assets/ folders keep the old output. 2: LLaMA tokenizer legacy=True, add_prefix_space=True.
# 3: models pre-trained on the synthetic conversations (PRETRAIN) unless random_init.
BUILDER_VERSION = 3
SEED = 1234
STAMP_FILE = "BUILD_INFO.json"
LOCK_FILE = ".build.lock"
MAX_POSITIONS = 512

# Model shapes: tiny enough that a forward+backward step takes milliseconds on one CPU core, big enough to have
# every feature the real model has (LLaMA's grouped-query attention: 2 KV heads for 4 query heads).
LLAMA = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-5)
BLOOM = dict(hidden_size=64, n_layer=2, n_head=4)
GPTJ = dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=16, n_positions=MAX_POSITIONS)
# SentencePiece BPE needs ~700 pieces (256 of them byte-fallback) before every word of the language is one piece.
LLAMA_SP_VOCAB = 768
# Byte-level BPE stops by itself once every word is one token (~650); this is only an upper bound.
BPE_MAX_VOCAB = 2048
DATA_SIZES = {"preference": {"train": 4000, "eval": 400}, "prompts": {"train": 2000, "eval": 200}}
# Language-model pre-training of every tiny model (the stand-in for SFT): conversations from
# synthetic.preference_rows(rows, seed) as prompt + chosen and prompt + rejected (+ EOS), loss on every token;
# held-out loss on eval_rows conversations of another seed. ~0.7-0.85 nats/token at the end (the language's own
# entropy: topic, frame and sentiment words are drawn at random), from ~6.5 at random init.
PRETRAIN = dict(rows=6000, eval_rows=200, seed=SEED + 20, steps=300, batch_size=64, lr=3e-3, warmup=0.1,
                schedule="one-cycle (linear warm-up, cosine down)", optimizer="AdamW, no weight decay",
                grad_clip=1.0, threads=1, data="synthetic.preference_rows: prompt + chosen, prompt + rejected, + EOS")

MODEL_LIBS = ("torch", "transformers", "tokenizers", "sentencepiece", "safetensors")


class AssetsError(UserError, RuntimeError):
    """The assets cannot be built or updated as asked; the message says which file and what to do."""


@dataclass(frozen=True)
class Part:
    """One independently built folder of the assets."""
    name: str                           # relative path inside the assets folder, e.g. "models/tiny-llama"
    settings: dict                      # everything that decides its content (hashed into the stamp)
    libs: tuple[str, ...]               # packages whose version can change its bytes
    build: Callable[[Path], dict]       # writes the part into an empty folder, returns info for the stamp


# ---------------------------------------------------------------------------------------------- tokenizers
def _language_fingerprint() -> str:
    """Changes whenever the synthetic language (word lists, templates, generator version) changes."""
    lang = {k: getattr(synthetic, k) for k in ("DATA_VERSION", "TOPICS", "POSITIVE", "NEGATIVE", "QUESTIONS",
                                               "FRAMES", "CHAT_WORDS", "MIN_WORDS")}
    return hashlib.sha256(json.dumps(lang, sort_keys=True).encode()).hexdigest()[:16]


def _corpus() -> list[str]:
    return synthetic.tokenizer_corpus(seed=SEED)


def train_sentencepiece(vocab_size: int) -> bytes:
    """A LLaMA-style SentencePiece BPE model (serialized proto), trained on the synthetic corpus.

    Options as LLaMA 2's tokenizer.model: identity normalization, no whitespace squashing, a dummy prefix space,
    digits split, byte fallback (any text encodes, no <unk> in practice), unk/bos/eos = 0/1/2, no pad.
    Trained from an iterator into memory, so no temporary path ends up in the model's trainer_spec."""
    import io

    import sentencepiece as spm

    spm.set_random_generator_seed(SEED)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        character_coverage=1.0, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2)
    return buf.getvalue()


def train_byte_bpe(special_tokens: list[str]):
    """A GPT-2 style byte-level BPE (`tokenizers.Tokenizer`) on the synthetic corpus; special tokens get ids
    0..n-1. All 256 bytes are in the alphabet, so any text encodes; merges stop once every word is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=BPE_MAX_VOCAB, min_frequency=2, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def word_token_count(tokenizer, word: str) -> int:
    """How many tokens `word` takes inside a sentence (after a space), the way it appears in the data."""
    base = tokenizer("the", add_special_tokens=False)["input_ids"]
    return len(tokenizer("the " + word, add_special_tokens=False)["input_ids"]) - len(base)


# ---------------------------------------------------------------------------------------------- models
def _save_model(model_cls, config, dest: Path, pretrain: dict | None) -> dict:
    """Random-init `model_cls(config)` with a fixed seed (without disturbing the caller's RNG), pre-train it as
    `pretrain` says (None = keep the random init), save it as safetensors; returns info for the stamp."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = model_cls(config)
        info = {"params": sum(p.numel() for p in model.parameters())}
        if pretrain is None:
            info["init"] = "random"
        else:
            from transformers import AutoTokenizer

            info["init"] = "pretrained"
            info["pretrain"] = pretrain_lm(model, AutoTokenizer.from_pretrained(dest), pretrain)
    model.eval()
    model.save_pretrained(dest, safe_serialization=True)
    return info


def _lm_batch(tokenizer, texts: list[str]):
    """Right-padded input_ids/attention_mask/labels; every text ends in EOS, which is learnt (not masked), also
    where EOS = pad (GPT-J): the labels follow the attention mask, not the pad id."""
    import torch

    ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    width = max(map(len, ids))
    x = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for i, row in enumerate(ids):
        x[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return x, mask, x.masked_fill(mask == 0, -100)


def conversations(n_rows: int, seed: int) -> list[str]:
    """prompt + chosen and prompt + rejected of `n_rows` synthetic pairs: both polarities equally often."""
    return [r["prompt"] + r[k] for r in synthetic.preference_rows(n_rows, seed=seed) for k in ("chosen", "rejected")]


def pretrain_lm(model, tokenizer, cfg: dict) -> dict:
    """Train `model` in place as a language model on synthetic conversations; deterministic (one thread,
    deterministic algorithms, seeded order). Returns what BUILD_INFO.json records: the settings, the last
    training losses and the held-out loss (nats per token)."""
    import math
    import random

    import torch

    train = conversations(cfg["rows"], cfg["seed"])
    held_out = conversations(cfg["eval_rows"], cfg["seed"] + 1)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg["threads"])
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(cfg["seed"])
        rng = random.Random(cfg["seed"])
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
        warm = max(1, int(cfg["steps"] * cfg["warmup"]))

        def lr_factor(step):
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg["steps"] - warm)))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        model.train()
        losses = []
        for _ in range(cfg["steps"]):
            x, mask, labels = _lm_batch(tokenizer, rng.sample(train, cfg["batch_size"]))
            loss = model(input_ids=x, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            opt.step()
            sched.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            total, tokens = 0.0, 0
            for i in range(0, len(held_out), 100):
                x, mask, labels = _lm_batch(tokenizer, held_out[i:i + 100])
                n = int((labels[:, 1:] != -100).sum())
                total += model(input_ids=x, attention_mask=mask, labels=labels).loss.item() * n
                tokens += n
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    tail = losses[-20:]
    return {"settings": cfg, "train_loss_first": round(losses[0], 4), "train_loss_last20": round(sum(tail) / len(tail), 4),
            "heldout_loss": round(total / tokens, 4), "heldout_conversations": len(held_out)}


def _check_tokenizer(dest: Path, name: str) -> int:
    """Reload the saved folder as a user would and check the contract; returns the vocabulary size."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dest)
    cfg = AutoConfig.from_pretrained(dest)
    if len(tok) != cfg.vocab_size:
        raise AssetsError(f"{dest}: tokenizer has {len(tok)} tokens but the model {cfg.vocab_size} (builder bug)")
    split = [w for w in synthetic.sentiment_words() if word_token_count(tok, w) != 1]
    if split:
        # The data's chosen/rejected length matching rests on this; a bigger vocabulary setting fixes it.
        raise AssetsError(f"{name}: sentiment words {split} are not single tokens; raise the vocabulary size "
                          f"in rlhf_overlay/data/tiny_assets.py")
    return len(tok)


def build_tiny_llama(dest: Path, pretrain: dict | None = PRETRAIN) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer, LlamaTokenizerFast

    # The slow tokenizer reads tokenizer.model (DeepSpeed-Chat uses LlamaTokenizer); the fast one is converted
    # from it once here and saved as tokenizer.json, so AutoTokenizer never converts at load time.
    # legacy=True (explicit, so no warning): slow and fast then tokenize identically, also text that starts with
    # a space, which DeepSpeed-Chat's " " + prompt + " " + answer always does (with legacy=False, 4.44's slow
    # tokenizer gives "▁", "▁the" there and the fast one "▁the"). add_prefix_space=True must be explicit too:
    # left at None, transformers passes None down to the slow tokenizer and "Human" loses its "▁" as first word.
    scratch = dest / ".sp"
    scratch.mkdir()
    (scratch / "tokenizer.model").write_bytes(train_sentencepiece(LLAMA_SP_VOCAB))
    common = dict(legacy=True, add_prefix_space=True, add_bos_token=True, add_eos_token=False,
                  model_max_length=MAX_POSITIONS, clean_up_tokenization_spaces=False,
                  unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast = LlamaTokenizerFast(vocab_file=str(scratch / "tokenizer.model"), from_slow=True, **common)
    fast.save_pretrained(dest)   # tokenizer.json, tokenizer.model, tokenizer_config.json, special_tokens_map.json
    shutil.rmtree(scratch)
    slow = LlamaTokenizer.from_pretrained(dest)  # must load: DeepSpeed-Chat's path
    config = LlamaConfig(vocab_size=len(slow), bos_token_id=slow.bos_token_id, eos_token_id=slow.eos_token_id,
                         pad_token_id=None, tie_word_embeddings=False, torch_dtype="float32", **LLAMA)
    info = _save_model(LlamaForCausalLM, config, dest, pretrain)
    return {**info, "vocab_size": _check_tokenizer(dest, "tiny-llama")}


def build_tiny_bloom(dest: Path, pretrain: dict | None = PRETRAIN) -> dict:
    from transformers import BloomConfig, BloomForCausalLM, BloomTokenizerFast

    # BLOOM's special tokens and ids: <unk>=0 <s>=1 </s>=2 <pad>=3; no bos/eos added to encoded text (as BLOOM).
    tok = BloomTokenizerFast(tokenizer_object=train_byte_bpe(["<unk>", "<s>", "</s>", "<pad>"]),
                             unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                             model_max_length=MAX_POSITIONS, clean_up_tokenization_spaces=False)
    tok.save_pretrained(dest)
    config = BloomConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, unk_token_id=tok.unk_token_id, torch_dtype="float32",
                         **BLOOM)
    info = _save_model(BloomForCausalLM, config, dest, pretrain)
    return {**info, "vocab_size": _check_tokenizer(dest, "tiny-bloom")}


def build_tiny_gptj(dest: Path, pretrain: dict | None = PRETRAIN) -> dict:
    from transformers import GPT2TokenizerFast, GPTJConfig, GPTJForCausalLM

    eot = "<|endoftext|>"
    bpe = train_byte_bpe([eot])
    # vocab.json + merges.txt as GPT-J's hub folder has, so the slow GPT2Tokenizer loads too.
    vocab_dir = dest / ".bpe"
    vocab_dir.mkdir()
    vocab_file, merges_file = bpe.model.save(str(vocab_dir))
    # pad = eos: GPT-J has no pad token and every trainer here falls back to eos anyway; setting it saves a step.
    tok = GPT2TokenizerFast(vocab_file=vocab_file, merges_file=merges_file, tokenizer_object=bpe,
                            unk_token=eot, bos_token=eot, eos_token=eot, pad_token=eot,
                            model_max_length=MAX_POSITIONS, clean_up_tokenization_spaces=False)
    tok.save_pretrained(dest)
    shutil.rmtree(vocab_dir)
    config = GPTJConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, tie_word_embeddings=False, torch_dtype="float32", **GPTJ)
    info = _save_model(GPTJForCausalLM, config, dest, pretrain)
    return {**info, "vocab_size": _check_tokenizer(dest, "tiny-gptj")}


# ---------------------------------------------------------------------------------------------- data
def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_preference(dest: Path) -> dict:
    sizes = DATA_SIZES["preference"]
    train = synthetic.preference_rows(sizes["train"], seed=SEED)
    seen = {(r["prompt"], r["chosen"], r["rejected"]) for r in train}
    evaluation = synthetic.preference_rows(sizes["eval"], seed=SEED + 1, exclude=seen)
    _write_jsonl(dest / "train.jsonl", train)
    _write_jsonl(dest / "eval.jsonl", evaluation)
    return {"rows": {"train": len(train), "eval": len(evaluation)}}


def build_prompts(dest: Path) -> dict:
    sizes = DATA_SIZES["prompts"]
    train = synthetic.prompt_rows(sizes["train"], seed=SEED + 2)
    seen = {(r["prompt"], r["reference"]) for r in train}
    evaluation = synthetic.prompt_rows(sizes["eval"], seed=SEED + 3, exclude=seen)
    _write_jsonl(dest / "train.jsonl", train)
    _write_jsonl(dest / "eval.jsonl", evaluation)
    return {"rows": {"train": len(train), "eval": len(evaluation)}}


def parts(random_init: bool = False) -> list[Part]:
    lang = _language_fingerprint()
    tok_common = {"language": lang, "seed": SEED, "corpus": "synthetic.tokenizer_corpus"}
    pretrain = None if random_init else PRETRAIN
    train = {"pretrain": pretrain}
    return [
        Part("models/tiny-llama", {"model": LLAMA, "tokenizer": {"sentencepiece_bpe": LLAMA_SP_VOCAB, **tok_common},
                                   **train}, MODEL_LIBS, functools.partial(build_tiny_llama, pretrain=pretrain)),
        Part("models/tiny-bloom", {"model": BLOOM, "tokenizer": {"byte_bpe_max": BPE_MAX_VOCAB, **tok_common},
                                   **train}, MODEL_LIBS, functools.partial(build_tiny_bloom, pretrain=pretrain)),
        Part("models/tiny-gptj", {"model": GPTJ, "tokenizer": {"byte_bpe_max": BPE_MAX_VOCAB, **tok_common},
                                  **train}, MODEL_LIBS, functools.partial(build_tiny_gptj, pretrain=pretrain)),
        Part("data/preference", {"sizes": DATA_SIZES["preference"], "language": lang, "seed": SEED}, (),
             build_preference),
        Part("data/prompts", {"sizes": DATA_SIZES["prompts"], "language": lang, "seed": SEED}, (), build_prompts),
    ]


# ---------------------------------------------------------------------------------------------- stamp and files
@functools.lru_cache(maxsize=None)
def _lib_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def settings_hash(part: Part) -> str:
    """What the stamp compares: builder version, the part's settings and the versions of the libraries whose
    output it contains (read from package metadata, so the up-to-date check imports nothing heavy)."""
    key = {"builder": BUILDER_VERSION, "settings": part.settings,
           "libs": {lib: _lib_version(lib) for lib in part.libs}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


from rlhf_overlay.paths import sha256_file as _sha256  # noqa: E402


def _file_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): _sha256(p)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _read_stamp(root: Path) -> dict:
    path = root / STAMP_FILE
    if not path.is_file():
        return {"parts": {}}
    try:
        stamp = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(stamp.get("parts"), dict):
            raise ValueError("no `parts` object")
        return stamp
    except ValueError as e:
        # Unreadable stamp = unknown provenance: every part is rebuilt, and the foreign-file check below
        # still refuses to overwrite anything that differs from what the builder makes.
        warnings.warn(f"{path}: unreadable ({e}); treating every part as not built")
        return {"parts": {}}


def _write_stamp(root: Path, stamp: dict) -> None:
    stamp = {"builder": "rlhf_overlay.data.tiny_assets", "builder_version": BUILDER_VERSION,
             "parts": {k: stamp["parts"][k] for k in sorted(stamp["parts"])}}
    tmp = root / (STAMP_FILE + ".tmp")
    tmp.write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, root / STAMP_FILE)


@contextlib.contextmanager
def _locked(root: Path):
    """One builder at a time per assets folder (parallel test sessions share assets/). Yields None when locked,
    or the OSError when the folder is read-only (e.g. shared prepared assets): checking still works then."""
    import fcntl

    try:
        f = open(root / LOCK_FILE, "a")
    except OSError as e:
        yield e
        return
    with f:
        from rlhf_overlay.runtime.waits import acquire_flock  # a live builder is waited for (named, RLHF_LOCK_TIMEOUT)

        from rlhf_overlay.runtime.waits import WaitTimeout
        try:
            acquire_flock(f, f"the tiny-asset build lock {root / LOCK_FILE}",
                          "Another process is building the tiny assets; this run goes on when it is done.")
        except WaitTimeout as e:
            raise AssetsError(str(e)) from None
        try:
            yield None
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _part_state(root: Path, part: Part, entry: dict | None, force: bool) -> tuple[str | None, list[str]]:
    """(why it must be rebuilt or None, files whose content differs from the stamp)."""
    dest = root / part.name
    if force:
        return "--force", []
    if not entry or not dest.is_dir():
        return "not built", []
    if entry.get("settings_hash") != settings_hash(part):
        return "built with other settings or library versions", []
    edited, missing = [], []
    for rel, digest in entry.get("files", {}).items():
        f = dest / rel
        if not f.is_file():
            missing.append(rel)
        elif _sha256(f) != digest:
            edited.append(rel)
    if missing:
        return f"missing {', '.join(missing)}", edited
    return None, edited


def _build_part(root: Path, part: Part, old_entry: dict | None, force: bool) -> dict:
    """Build `part` in a temporary folder beside its destination, then swap it in. Refuses (unless force) when
    the destination holds a file that neither the previous build nor this one made (an edit of yours)."""
    dest = root / part.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the swapped-in folder should read like any other
    try:
        info = part.build(tmp)
        files = _file_hashes(tmp)
        if dest.exists():
            old_files = (old_entry or {}).get("files", {})
            foreign = []
            for rel, digest in _file_hashes(dest).items():
                if digest not in (old_files.get(rel), files.get(rel)):
                    foreign.append(str(dest / rel))
            if foreign and not force:
                raise AssetsError(
                    f"{dest}: needs a rebuild but holds files the builder did not make or that were edited: "
                    f"{', '.join(foreign)} — move them elsewhere (e.g. pass your own data with DATA=...) or "
                    f"rebuild anyway with `python -m rlhf_overlay.data.tiny_assets --force`")
            old = dest.parent / f".{dest.name}.old-{os.getpid()}"
            os.rename(dest, old)
            os.rename(tmp, dest)
            shutil.rmtree(old)
        else:
            os.rename(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {"settings_hash": settings_hash(part), "settings": part.settings, "files": files, "info": info}


def _remove_leftovers(root: Path) -> None:
    """Temporary folders of a build that was killed (we hold the lock, so no build is running)."""
    for parent in (root / "models", root / "data"):
        if parent.is_dir():
            for p in parent.iterdir():
                if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name) and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)


def ensure_tiny_assets(out_dir: str | os.PathLike | None = None, force: bool = False,
                       log: Callable[[str], None] | None = None, random_init: bool = False) -> Path:
    """Make sure the tiny assets exist and are current in `out_dir` (default: $RLHF_OVERLAY_ASSETS or
    <repo>/assets); build only what is missing or outdated. Returns the folder (absolute).
    random_init=True: the models are left untrained (their stamp differs, so switching rebuilds them).
    Raises AssetsError when a rebuild would overwrite a file you edited (pass force=True to allow it)."""
    from rlhf_overlay.paths import assets_dir

    say = log or (lambda msg: print(f"tiny assets: {msg}", file=sys.stderr, flush=True))
    root = Path(out_dir if out_dir is not None else assets_dir()).expanduser().resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AssetsError(f"{root}: cannot create the assets folder ({e}) — set RLHF_OVERLAY_ASSETS or pass "
                          f"--out to a folder you can write") from None
    with _locked(root) as read_only:
        stamp = _read_stamp(root)
        todo = []
        all_parts = parts(random_init)
        for part in all_parts:
            entry = stamp["parts"].get(part.name)
            reason, edited = _part_state(root, part, entry, force)
            if reason:
                todo.append((part, entry, reason))
            elif edited:
                warnings.warn(f"{root / part.name}: {', '.join(edited)} differ(s) from what the builder made; "
                              f"keeping your edit (rebuild with `python -m rlhf_overlay.data.tiny_assets --force`)",
                              stacklevel=2)
        if not todo:
            return root
        if read_only:
            part, _, reason = todo[0]
            raise AssetsError(f"{root / part.name}: needs a build ({reason}) but {root} is not writable "
                              f"({read_only}) — set RLHF_OVERLAY_ASSETS or pass --out to a folder you can write")
        _remove_leftovers(root)
        for part, entry, reason in todo:
            t0 = time.perf_counter()
            say(f"building {part.name} ({reason}) in {root}")
            stamp["parts"][part.name] = _build_part(root, part, entry, force)
            # Stamp after every part: an interrupted build keeps what it finished.
            stamp["parts"] = {k: v for k, v in stamp["parts"].items() if k in {p.name for p in all_parts}}
            _write_stamp(root, stamp)
            say(f"built {part.name} in {time.perf_counter() - t0:.1f}s")
    return root


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m rlhf_overlay.data.tiny_assets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", metavar="DIR", default=None,
                   help="assets folder (default: $RLHF_OVERLAY_ASSETS or <repo>/assets)")
    p.add_argument("--force", action="store_true",
                   help="rebuild every part, overwriting files you edited in it")
    p.add_argument("--random-init", action="store_true",
                   help="leave the models untrained (random init) instead of pre-training them; best with --out")
    return p


@main_guard   # AssetsError (an edit a rebuild would overwrite, a folder it cannot write) or a bad flag -> `error: ...`, 2
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Building never needs the hub; make sure nothing below tries.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    root = ensure_tiny_assets(args.out, force=args.force, random_init=args.random_init)
    stamp = _read_stamp(root)
    print(f"{root}  ({time.perf_counter() - t0:.1f}s)")
    for name, entry in sorted(stamp["parts"].items()):
        info = entry.get("info", {})
        if "params" in info:
            what = f"{info['params']:,} params, vocab {info['vocab_size']}"
            if "pretrain" in info:
                what += f", pre-trained: held-out loss {info['pretrain']['heldout_loss']:.3f}"
            elif info.get("init") == "random":
                what += ", random init"
        else:
            what = ", ".join(f"{k} {v} rows" for k, v in info.get("rows", {}).items())
        print(f"  {name:<20} {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
