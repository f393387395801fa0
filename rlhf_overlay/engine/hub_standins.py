"""Tiny random stand-ins for the hub models that the upstreams' own test suites name, in a private HF cache.

    python -m rlhf_overlay.engine.hub_standins                 # -> <user cache>/upstream-tests/hf (prints HF_HOME)
    python -m rlhf_overlay.engine.hub_standins --hf-home DIR   # somewhere else

trlx's tests load `gpt2`, `EleutherAI/pythia-160m`, `facebook/opt-125m`, `t5-small`, ... from the hub. Offline,
each of those ids resolves here to a model of the same architecture and family settings (tied or untied
embeddings, OPT's bos, T5's gated-gelu for flan, GPT-NeoX's partial rotary, ...) but 4 layers of width 64,
random weights (seeded) and a byte-level BPE tokenizer trained on the project's synthetic language plus the
sentences the suites tokenize (distilbert gets a WordPiece one, as the real one). They are laid out
as the hub cache does (`hub/models--org--name/{refs/main,snapshots/<rev>/}`), so `from_pretrained("gpt2")`
with HF_HUB_OFFLINE=1 and HF_HOME pointing here loads them as if downloaded.

Nothing here says anything about the real models' quality: the suites check the code paths (shapes, save/load,
hydra heads, generation, PPO/ILQL/SFT steps), which need the architecture, not the trained weights.
A stamp (builder version + library versions) makes a second call a no-op; a build goes to a temporary folder
that is renamed into place.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_overlay.errors import ArgumentParser, UserError, main_guard

BUILDER_VERSION = 1
LIBS = ("torch", "transformers", "tokenizers", "safetensors")
STAMP = "STANDINS.json"
LAYERS, WIDTH, HEADS, POSITIONS = 4, 64, 4, 256   # 4 layers: test_peft trains `transformer.h.3.mlp` of gpt2


class StandinError(UserError, RuntimeError):
    pass


@dataclass(frozen=True)
class Standin:
    family: str                     # a key of BUILDERS
    options: dict = field(default_factory=dict)


# Every hub id the upstream suites name (tests/test_upstream_suites.py checks the suites name no other).
STANDINS: dict[str, Standin] = {
    "gpt2": Standin("gpt2"),
    "EleutherAI/pythia-160m": Standin("gpt_neox"),
    "EleutherAI/gpt-neox-20b": Standin("gpt_neox"),
    "EleutherAI/gpt-j-6B": Standin("gptj"),
    # 2048 positions as the real one: DeepSpeed-Chat's tests/test_training.py runs step 3 with 256 prompt + 256
    # answer tokens on it (prompts are padded to full length), beyond the other stand-ins' 256.
    "facebook/opt-125m": Standin("opt", {"max_position_embeddings": 2048}),
    "facebook/opt-1.3b": Standin("opt"),
    "t5-small": Standin("t5"),
    "google/t5-efficient-tiny": Standin("t5"),
    "google/flan-t5-small": Standin("t5", {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}),
    "distilbert-base-uncased": Standin("distilbert"),
}


def default_hf_home() -> Path:
    from rlhf_overlay.paths import cache_dir
    return cache_dir() / "upstream-tests" / "hf"


# ---------------------------------------------------------------------------------------------- tokenizers
def _corpus(texts) -> list[str]:
    """The synthetic language plus, twice (BPE merges pairs seen at least twice), the sentences the suites
    tokenize: their words then take one token each, about as many as with the real GPT-2/T5 vocabularies. A
    tokenizer that splits "goose" into 3 pieces makes a test's prompt 2-3x longer than upstream measured it
    (test_peft's generate then hits transformers' default max_length=20, which real GPT-2 does not)."""
    from rlhf_overlay.data import synthetic
    from rlhf_overlay.data.tiny_assets import SEED

    return synthetic.tokenizer_corpus(seed=SEED) + list(texts) * 2


def _train_byte_bpe(special_tokens: list[str], texts):
    """GPT-2 style byte-level BPE as rlhf_overlay.data.tiny_assets.train_byte_bpe, on _corpus(texts)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=4096, min_frequency=2, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(texts), trainer=trainer)
    return tok


def _gpt2_tokenizer(texts, cls_name: str = "GPT2TokenizerFast"):
    import transformers
    from rlhf_overlay.data.tiny_assets import MAX_POSITIONS

    eot = "<|endoftext|>"
    cls = getattr(transformers, cls_name)
    return cls(tokenizer_object=_train_byte_bpe([eot], texts), unk_token=eot, bos_token=eot, eos_token=eot,
               model_max_length=MAX_POSITIONS, clean_up_tokenization_spaces=False)


def _opt_tokenizer(texts):
    # OPT: GPT-2 BPE with <s>=0 <pad>=1 </s>=2 <unk>=3, bos = eos = </s>, and </s> prepended to every text.
    from tokenizers import processors
    from transformers import GPT2TokenizerFast
    from rlhf_overlay.data.tiny_assets import MAX_POSITIONS

    bpe = _train_byte_bpe(["<s>", "<pad>", "</s>", "<unk>"], texts)
    bpe.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B",
                                                       special_tokens=[("</s>", 2)])
    return GPT2TokenizerFast(tokenizer_object=bpe, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                             unk_token="<unk>", model_max_length=MAX_POSITIONS, clean_up_tokenization_spaces=False)


def _t5_tokenizer(texts):
    # T5: <pad>=0 </s>=1 <unk>=2, </s> appended to every text; byte-level BPE instead of SentencePiece.
    from tokenizers import processors
    from transformers import T5TokenizerFast
    from rlhf_overlay.data.tiny_assets import MAX_POSITIONS

    bpe = _train_byte_bpe(["<pad>", "</s>", "<unk>"], texts)
    bpe.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=bpe, extra_ids=0, eos_token="</s>", unk_token="<unk>",
                           pad_token="<pad>", model_max_length=MAX_POSITIONS, clean_up_tokenization_spaces=False)


def _wordpiece_tokenizer(texts):
    # distilbert-base-uncased: lower-cased WordPiece with [PAD]=0 [UNK] [CLS] [SEP] [MASK], [CLS] x [SEP].
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import DistilBertTokenizerFast
    from rlhf_overlay.data.tiny_assets import MAX_POSITIONS

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(_corpus(texts),
                            trainers.WordPieceTrainer(vocab_size=4096, special_tokens=special, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return DistilBertTokenizerFast(tokenizer_object=tok, model_max_length=MAX_POSITIONS, do_lower_case=True,
                                   clean_up_tokenization_spaces=False)


# ---------------------------------------------------------------------------------------------- models
# Random weights with std 0.1 rather than GPT-2's init std 0.02: the real checkpoints' trained weights are of that
# order, and at 0.02 a 4-layer, width-64 model passes so little gradient that test_peft's two SGD steps leave
# every gpt2 `lora_A` bit-identical (fp32 underflow; smallest change 7e-4 at 0.1).
INIT_STD = 0.1
# Rows the real model's embedding has beyond its tokenizer (config vocab_size - len(tokenizer)): a token a test
# adds (`add_special_tokens({"pad_token": "[PAD]"})`) fits in them for T5 (32128 vs 32100), as it does upstream.
SPARE_ROWS = {"gpt2": 0, "gpt_neox": 27, "gptj": 143, "opt": 7, "t5": 28, "distilbert": 0}


def _gpt2(opts, texts):
    from transformers import GPT2Config, GPT2LMHeadModel
    tok = _gpt2_tokenizer(texts)
    cfg = GPT2Config(vocab_size=len(tok) + SPARE_ROWS["gpt2"], n_positions=POSITIONS, n_embd=WIDTH, n_layer=LAYERS,
                     n_head=HEADS, initializer_range=INIT_STD,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **opts)   # tied, as gpt2
    return tok, GPT2LMHeadModel, cfg


def _gpt_neox(opts, texts):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    tok = _gpt2_tokenizer(texts, "GPTNeoXTokenizerFast")
    cfg = GPTNeoXConfig(vocab_size=len(tok) + SPARE_ROWS["gpt_neox"], hidden_size=WIDTH, num_hidden_layers=LAYERS,
                        num_attention_heads=HEADS, initializer_range=INIT_STD,
                        intermediate_size=4 * WIDTH, rotary_pct=0.25, max_position_embeddings=POSITIONS,
                        use_parallel_residual=True, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, **opts)
    return tok, GPTNeoXForCausalLM, cfg


def _gptj(opts, texts):
    from transformers import GPTJConfig, GPTJForCausalLM
    tok = _gpt2_tokenizer(texts)
    cfg = GPTJConfig(vocab_size=len(tok) + SPARE_ROWS["gptj"], n_positions=POSITIONS, n_embd=WIDTH, n_layer=LAYERS,
                     n_head=HEADS, initializer_range=INIT_STD,
                     rotary_dim=16, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, **opts)
    return tok, GPTJForCausalLM, cfg


def _opt(opts, texts):
    from transformers import OPTConfig, OPTForCausalLM
    tok = _opt_tokenizer(texts)
    opts.setdefault("max_position_embeddings", POSITIONS)
    cfg = OPTConfig(vocab_size=len(tok) + SPARE_ROWS["opt"], hidden_size=WIDTH, num_hidden_layers=LAYERS,
                    num_attention_heads=HEADS, init_std=INIT_STD,
                    ffn_dim=4 * WIDTH, word_embed_proj_dim=WIDTH,
                    do_layer_norm_before=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id, **opts)   # tied, as OPT
    return tok, OPTForCausalLM, cfg


def _t5(opts, texts):
    from transformers import T5Config, T5ForConditionalGeneration
    tok = _t5_tokenizer(texts)
    cfg = T5Config(vocab_size=len(tok) + SPARE_ROWS["t5"], d_model=WIDTH, d_kv=WIDTH // HEADS, d_ff=2 * WIDTH,
                   num_layers=LAYERS, num_heads=HEADS, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id, **opts)
    return tok, T5ForConditionalGeneration, cfg


def _distilbert(opts, texts):
    from transformers import DistilBertConfig, DistilBertForMaskedLM
    tok = _wordpiece_tokenizer(texts)
    cfg = DistilBertConfig(vocab_size=len(tok) + SPARE_ROWS["distilbert"], dim=WIDTH, hidden_dim=4 * WIDTH,
                           n_layers=2, n_heads=HEADS, max_position_embeddings=POSITIONS, pad_token_id=tok.pad_token_id, **opts)
    return tok, DistilBertForMaskedLM, cfg


BUILDERS = {"gpt2": _gpt2, "gpt_neox": _gpt_neox, "gptj": _gptj, "opt": _opt, "t5": _t5, "distilbert": _distilbert}


# ---------------------------------------------------------------------------------------------- cache layout
def _stamp_key(texts) -> dict:
    from importlib.metadata import version
    return {"builder": BUILDER_VERSION, "shape": [LAYERS, WIDTH, HEADS, POSITIONS], "spare_rows": SPARE_ROWS,
            "init_std": INIT_STD,
            "corpus": hashlib.sha256(json.dumps(_corpus(texts)).encode()).hexdigest(),
            "standins": {k: [v.family, v.options] for k, v in STANDINS.items()},
            "libs": {lib: version(lib) for lib in LIBS}}


def _revision(hub_id: str, key: dict) -> str:
    """A fake 40-hex commit for refs/main: changes whenever what we would build changes."""
    return hashlib.sha1(json.dumps([hub_id, key], sort_keys=True).encode()).hexdigest()


def _build_one(hub_id: str, spec: Standin, snapshot: Path, texts) -> None:
    import torch
    from rlhf_overlay.data.tiny_assets import SEED

    tok, model_cls, cfg = BUILDERS[spec.family](dict(spec.options), texts)
    tok.save_pretrained(snapshot)
    with torch.random.fork_rng(devices=[]):   # seeded random init that leaves the caller's RNG alone
        torch.manual_seed(SEED)
        model = model_cls(cfg)
    model.save_pretrained(snapshot, safe_serialization=True)


def ensure_standins(hf_home: str | os.PathLike | None = None, texts=()) -> Path:
    """Build (once) the stand-ins under `hf_home`/hub, their tokenizers also trained on `texts` (the sentences
    the suites tokenize, see suite_texts); returns `hf_home` (the value for HF_HOME)."""
    hf_home = Path(hf_home) if hf_home else default_hf_home()
    texts = sorted(set(texts))
    key = _stamp_key(texts)
    stamp = hf_home / STAMP
    if stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == key:
                return hf_home
        except ValueError:
            pass
    hf_home.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".hf-build-", dir=hf_home.parent))
    try:
        for hub_id, spec in STANDINS.items():
            repo = tmp / "hub" / ("models--" + hub_id.replace("/", "--"))
            rev = _revision(hub_id, key)
            snapshot = repo / "snapshots" / rev
            snapshot.mkdir(parents=True)
            _build_one(hub_id, spec, snapshot, texts)
            (repo / "refs").mkdir()
            (repo / "refs" / "main").write_text(rev)
        # transformers reads hub/version.txt; without it, it takes the cache for a pre-4.22 layout and warns
        (tmp / "hub" / "version.txt").write_text("1")
        (tmp / STAMP).write_text(json.dumps(key, indent=1, sort_keys=True) + "\n")
        old = hf_home.with_name(f".{hf_home.name}-old-{os.getpid()}")
        if hf_home.exists():
            os.replace(hf_home, old)
        os.replace(tmp, hf_home)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return hf_home


# ---------------------------------------------------------------------------------------------- which ids
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_ID_KEYWORDS = {"model_path", "tokenizer_path", "pretrained_model_name_or_path", "model_id", "model_name"}


def named_hub_ids(test_files) -> dict[str, list[str]]:
    """Hub ids a test suite names, read from its source: string arguments of `*.from_pretrained(...)`, of
    `model_path=`/`tokenizer_path=`-like keywords, string items of module-level lists/dicts whose name says
    PATH or MODEL, `model_id = "..."` assignments, and `parametrize("model_name", [...])` lists.
    Returns {id: ["file:line", ...]}."""
    found: dict[str, list[str]] = {}

    def add(node, where):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _HUB_ID.match(node.value):
            found.setdefault(node.value, []).append(f"{where}:{node.lineno}")

    for path in map(Path, test_files):
        tree = ast.parse(path.read_text(), str(path))
        where = path.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if fn == "from_pretrained" and node.args:
                    add(node.args[0], where)
                for kw in node.keywords:
                    if kw.arg in _ID_KEYWORDS:
                        add(kw.value, where)
                if fn == "parametrize" and len(node.args) >= 2 and isinstance(node.args[0], ast.Constant) \
                        and node.args[0].value in _ID_KEYWORDS and isinstance(node.args[1], (ast.List, ast.Tuple)):
                    for elt in node.args[1].elts:
                        add(elt, where)
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
                if any(n in _ID_KEYWORDS for n in names):
                    add(node.value, where)
                if any("PATH" in n or "MODEL" in n for n in names):
                    value = node.value
                    items = value.elts if isinstance(value, (ast.List, ast.Tuple)) else \
                        value.keys if isinstance(value, ast.Dict) else []
                    for elt in items:
                        add(elt, where)
    return found


def suite_texts(test_files) -> list[str]:
    """The sentences a suite tokenizes: its string constants of three words or more."""
    texts = set()
    for path in map(Path, test_files):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value.split()) >= 3:
                texts.add(node.value)
    return sorted(texts)


@main_guard   # UserError and bad flags -> `error: ...`, exit 2
def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m rlhf_overlay.engine.hub_standins", description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf-home", help="HF_HOME to build into (default: <user cache>/upstream-tests/hf)")
    ap.add_argument("--texts-from", nargs="*", default=[], help="test files whose sentences the tokenizers learn")
    args = ap.parse_args(argv)
    for f in args.texts_from:
        if not Path(f).is_file():
            raise StandinError(f"--texts-from {f}: no such file — pass the upstream test files whose sentences the "
                               f"stand-in tokenizers learn")
    print(ensure_standins(args.hf_home, suite_texts(args.texts_from)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
