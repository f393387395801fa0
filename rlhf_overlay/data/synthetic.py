"""The synthetic language of the embedded tiny assets: a few hundred English words, a chat format, one signal.

Every row is a question about a TOPIC in DeepSpeed-Chat's format and an answer built from a FRAME whose
sentiment slots are filled with POSITIVE or NEGATIVE words:

    prompt   "Human: what do you think of the garden? Assistant:"
    chosen   " the garden is bright and calm."        <- mostly POSITIVE words
    rejected " the garden is noisy and cold."         <- the same frame, the slots' polarity flipped

The chosen and rejected answer of a pair share topic and frame, and every sentiment word is a single token in
all three tiny tokenizers, so both answers have the same number of tokens: length says nothing, the words
say everything. In frames with three slots the chosen answer may carry one NEGATIVE word (and the rejected one
POSITIVE word), so "contains a positive word" is not enough — a model has to weigh the words.

`rule_reward(texts)` scores any text by the same signal; it is the reward of the PPO smoke test. `fluency(texts)`
measures whether answers are still the language: the share of their words that belong to it, and the share of
answers that are empty or repeat one token / n-gram (a collapsed policy). Nothing here imports torch or
transformers, so it is cheap to import from tests and reward functions.

    python -c "from rlhf_overlay.data.synthetic import *; print(preference_rows(2, seed=0))"
    python -c "from rlhf_overlay.data.synthetic import rule_reward; print(rule_reward([' the garden is lovely.']))"
    python -c "from rlhf_overlay.data.synthetic import fluency; print(fluency([' the garden is lovely.', 'good good good']))"
"""
from __future__ import annotations

import functools
import random
import re

# Bump when the generators below change what they produce (the asset builder rebuilds the data then).
DATA_VERSION = 2

TOPICS = (
    "garden", "river", "music", "movie", "book", "city", "forest", "coffee", "dinner", "school",
    "ocean", "market", "village", "song", "morning", "library", "mountain", "weather", "team", "trip",
)
# Sentiment words, paired by index only for readability; no word is a substring-confusable of another.
POSITIVE = (
    "good", "great", "happy", "kind", "bright", "warm", "calm", "nice",
    "clean", "fresh", "gentle", "lovely", "safe", "sweet", "friendly", "wonderful",
)
NEGATIVE = (
    "bad", "awful", "sad", "rude", "dark", "cold", "noisy", "dirty",
    "broken", "boring", "harsh", "ugly", "weak", "bitter", "angry", "terrible",
)
POSITIVE_SET = frozenset(POSITIVE)
NEGATIVE_SET = frozenset(NEGATIVE)

# Questions never contain a sentiment word: the answer alone carries the signal.
QUESTIONS = (
    "Human: tell me about the {t}. Assistant:",
    "Human: what do you think of the {t}? Assistant:",
    "Human: how was the {t} today? Assistant:",
    "Human: describe the {t} for me. Assistant:",
    "Human: can you say something about the {t}? Assistant:",
    "Human: i want to hear about the {t}. Assistant:",
)
# {t} = the question's topic, each {s} = one sentiment slot. Answers start with a space: they continue the prompt.
FRAMES = (
    " the {t} is {s} and {s}.",
    " i think the {t} was {s}, really {s}.",
    " the {t} feels {s} today, {s} and {s}.",
    " it is a {s} {t} with {s} people.",
    " honestly, the {t} looks {s} and very {s}.",
    " the {t} seems {s}. it was {s} and {s} all day.",
    " a {s} {t}, so {s}.",
    " people say the {t} is {s}, but i find it {s} and {s}.",
)
# Everyday chat words, only so the tokenizers also learn them (chat tests and users type "hello").
CHAT_WORDS = (
    "hello hi hey how are you what who why where when which can could would will should please thanks thank "
    "yes no okay sure well maybe tell me about describe say something think of was is it this that there here "
    "for with in on at to from by and or but not do does did have has had be been my your our their we they "
    "he she him her one two three four five six seven eight nine ten new old big small long short first last "
    "Human Assistant The I You What How"
).split()

WORD_RE = re.compile(r"[a-z]+")
# rule_reward divides by at least this many words, so one lucky word in a near-empty text is not a full score.
MIN_WORDS = 4


def sentiment_words() -> tuple[str, ...]:
    return POSITIVE + NEGATIVE


def all_words() -> list[str]:
    """Every word the generators can emit (sorted, unique): what the tokenizers should keep whole."""
    words = set(TOPICS) | set(POSITIVE) | set(NEGATIVE) | set(CHAT_WORDS)
    for template in QUESTIONS + FRAMES:
        words |= set(re.findall(r"[A-Za-z]+", template.replace("{t}", " ").replace("{s}", " ")))
    return sorted(words)


def _fill(frame: str, topic: str, words: list[str]) -> str:
    text = frame.replace("{t}", topic)
    for w in words:
        text = text.replace("{s}", w, 1)
    return text


def make_pair(rng: random.Random) -> dict:
    """One preference row {prompt, chosen, rejected} drawn from `rng`."""
    topic = rng.choice(TOPICS)
    prompt = rng.choice(QUESTIONS).replace("{t}", topic)
    frame = rng.choice(FRAMES)
    slots = frame.count("{s}")
    # True = the chosen answer gets a POSITIVE word there. With 3 slots, half the time one slot is contrary.
    polarity = [True] * slots
    if slots >= 3 and rng.random() < 0.5:
        polarity[rng.randrange(slots)] = False
    chosen = _pick(rng, polarity)
    rejected = _pick(rng, [not p for p in polarity])
    return {"prompt": prompt, "chosen": _fill(frame, topic, chosen), "rejected": _fill(frame, topic, rejected)}


def _pick(rng: random.Random, polarity: list[bool]) -> list[str]:
    """One sentiment word per slot (True = POSITIVE), no word twice in an answer ("good and good" reads badly)."""
    pos = iter(rng.sample(POSITIVE, sum(polarity)))
    neg = iter(rng.sample(NEGATIVE, len(polarity) - sum(polarity)))
    return [next(pos) if p else next(neg) for p in polarity]


def preference_rows(n: int, seed: int, exclude: set | None = None) -> list[dict]:
    """`n` distinct preference rows; rows whose (prompt, chosen, rejected) is in `exclude` are skipped
    (so eval never repeats a train row). Deterministic for a given seed."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    rows: list[dict] = []
    while len(rows) < n:
        row = make_pair(rng)
        key = (row["prompt"], row["chosen"], row["rejected"])
        if key in seen:
            continue
        seen.add(key)
        rows.append(row)
    return rows


def prompt_rows(n: int, seed: int, exclude: set | None = None) -> list[dict]:
    """`n` PPO prompt rows {prompt, reference}: reference is a chosen-style answer. Prompts repeat (there are
    only len(TOPICS) * len(QUESTIONS) of them); distinct (prompt, reference) pairs, none in `exclude`."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    rows: list[dict] = []
    while len(rows) < n:
        pair = make_pair(rng)
        key = (pair["prompt"], pair["chosen"])
        if key in seen:
            continue
        seen.add(key)
        rows.append({"prompt": pair["prompt"], "reference": pair["chosen"]})
    return rows


def tokenizer_corpus(seed: int, n_pairs: int = 3000) -> list[str]:
    """Lines the tiny tokenizers are trained on: full conversations (prompt + chosen, prompt + rejected), every
    word of the language in isolation, and the everyday chat words. Deterministic for a given seed."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_pairs):
        row = make_pair(rng)
        lines.append(row["prompt"] + row["chosen"])
        lines.append(row["prompt"] + row["rejected"])
    # Single words, with and without a leading space, so rare words still get whole-word tokens.
    lines.append(" ".join(all_words()))
    lines.append(" ".join(CHAT_WORDS) + ". " + "? ".join(CHAT_WORDS) + "!")
    return lines


def rule_reward(texts: list[str]) -> list[float]:
    """The learnable rule: 0.5 + 0.5 * (#POSITIVE - #NEGATIVE words) / max(#words, MIN_WORDS), in [0, 1].

    0.5 = neutral (no sentiment, or as many good as bad words; also empty text), 1.0 = only POSITIVE words,
    0.0 = only NEGATIVE words. Words are runs of letters, case-insensitive, so punctuation and byte-level
    fragments do not count as words but also do not hide one. A chosen answer of the data scores ~0.6-0.7.
    Dense on purpose: every POSITIVE token a policy emits raises the reward a little, so PPO on a random-init
    tiny model sees a signal from the first batch."""
    scores = []
    for text in texts:
        words = WORD_RE.findall(text.lower())
        pos = sum(w in POSITIVE_SET for w in words)
        neg = sum(w in NEGATIVE_SET for w in words)
        scores.append(0.5 + 0.5 * (pos - neg) / max(len(words), MIN_WORDS))
    return scores


# ---------------------------------------------------------------------------------------------- fluency
# What may surround a word: the language's punctuation. Anything else attached to a word (byte-level fragments
# such as "can\ufffd", "do~") makes the chunk a non-word.
PUNCTUATION = ".,?!:;"
# An answer is degenerate when it is empty or when one n-gram (n <= REPEAT_MAX_N words) follows itself
# REPEAT_MIN_TIMES times in a row ("good good good", "so calm so calm so calm"): the language never does that.
REPEAT_MAX_N = 4
REPEAT_MIN_TIMES = 3


@functools.lru_cache(maxsize=1)
def vocabulary() -> frozenset:
    """Every word of the synthetic language, lower case."""
    return frozenset(w.lower() for w in all_words())


def answer_words(text: str) -> list[str]:
    """Whitespace-separated chunks of `text`, lower case, language punctuation stripped from both ends; chunks
    that are only punctuation are dropped (they are not words, and not wrong either)."""
    words = []
    for chunk in text.split():
        w = chunk.strip(PUNCTUATION).lower()
        if w:
            words.append(w)
    return words


def is_degenerate(words: list[str]) -> bool:
    """Empty, or one n-gram (n <= REPEAT_MAX_N) repeated REPEAT_MIN_TIMES times in a row."""
    if not words:
        return True
    for n in range(1, REPEAT_MAX_N + 1):
        span = n * REPEAT_MIN_TIMES
        for i in range(len(words) - span + 1):
            gram = words[i:i + n]
            if all(words[i + k * n:i + (k + 1) * n] == gram for k in range(1, REPEAT_MIN_TIMES)):
                return True
    return False


def answer_fluency(text: str) -> float:
    """One answer: 0 if degenerate, else the share of its words that belong to the synthetic language."""
    words = answer_words(text)
    if is_degenerate(words):
        return 0.0
    vocab = vocabulary()
    return sum(w in vocab for w in words) / len(words)


@functools.lru_cache(maxsize=1)
def _frame_patterns() -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(answer_words(f.replace("{t}", " {t} ").replace("{s}", " {s} "))) for f in FRAMES)


def is_sentence(words: list[str]) -> bool:
    """The words are a sentence of the language: one of the FRAMES with a topic at {t} and sentiment words at
    {s}, or the beginning of one (an answer cut at the generation limit). Word lists such as "a calm kind warm
    fresh" are words of the language but not a sentence of it."""
    if not words:
        return False
    topics, sentiment = set(TOPICS), POSITIVE_SET | NEGATIVE_SET
    for pattern in _frame_patterns():
        if len(words) <= len(pattern) and all(
                (w in topics) if p == "{t}" else (w in sentiment) if p == "{s}" else (w == p)
                for w, p in zip(words, pattern)):
            return True
    return False


def fluency(texts: list[str]) -> dict:
    """Fluency of a batch of answers: {"fluency": mean answer_fluency (1.0 = every answer is words of the
    language and none degenerate), "in_language": share of all words that belong to the language,
    "degenerate": share of answers empty or repeating one token/n-gram, "sentences": share of answers that are
    sentences of the language (or their beginning; stricter: word lists fail it), "answers": count}."""
    vocab = vocabulary()
    scores, n_words, n_known, n_degenerate, n_sentences = [], 0, 0, 0, 0
    for text in texts:
        words = answer_words(text)
        n_sentences += is_sentence(words)
        n_words += len(words)
        n_known += sum(w in vocab for w in words)
        n_degenerate += is_degenerate(words)
        scores.append(answer_fluency(text))
    n = len(texts)
    return {"fluency": sum(scores) / n if n else float("nan"),
            "in_language": n_known / n_words if n_words else 0.0,
            "degenerate": n_degenerate / n if n else float("nan"),
            "sentences": n_sentences / n if n else float("nan"), "answers": n}
