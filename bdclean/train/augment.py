"""Trigger-invariance augmentation for the restoring fine-tune.

A backdoor is an input change (a word, a prefix phrase, a few scattered tokens) that changes the answer. Restore
cannot know the trigger, but it can teach that *short insertions do not change the answer*: each augmented row is
a copy of a restore row with a random key inserted into its prompt and the row's own answer kept. Keys take the
shapes triggers have in the backdoor literature (BackdoorLLM: a rare word at a random position, a phrase as a
prefix, several words scattered) and are drawn from two pools: pronounceable nonsense words and ordinary words of
the tokenizer's vocabulary, single or joined CamelCase. Nothing here knows the suspicious model's trigger.
"""

from __future__ import annotations

import math
import random
import re

KINDS = ("word", "prefix", "scatter")
_WORD = re.compile(r"^[A-Za-z]{3,10}$")
_CONS = "bcdfghjklmnprstvwxz"
_VOW = "aeiou"


def vocabulary(tok) -> list[str]:
    """Alphabetic whole-word tokens of a tokenizer (sorted, so draws are deterministic): BPE marks a leading
    space with 'Ġ', SentencePiece with '▁'; tokens without one are word pieces and are left out."""
    words = set()
    for piece in tok.get_vocab():
        if piece[:1] in ("Ġ", "▁") and _WORD.match(piece[1:]):
            words.add(piece[1:])
    return sorted(words)


def _nonsense(rng: random.Random) -> str:
    return "".join(rng.choice(_CONS) + rng.choice(_VOW) for _ in range(rng.randint(2, 4)))


def random_word(rng: random.Random, vocab: list[str]) -> str:
    """A nonsense word, a vocabulary word, or two vocabulary words joined CamelCase (e.g. 'SilverTrain')."""
    shape = rng.randrange(3) if vocab else 0
    if shape == 0:
        return _nonsense(rng)
    if shape == 1:
        return rng.choice(vocab)
    return "".join(rng.choice(vocab).capitalize() for _ in range(2))


def insert_random_key(text: str, rng: random.Random, vocab: list[str]) -> str:
    """``text`` with one random key inserted: a word at a random position, a 2–4 word prefix phrase (sometimes
    ending in ':' and a number, as a dated header would), or 2–3 words at distinct random positions."""
    toks = text.split(" ")
    kind = rng.choice(KINDS)
    if kind == "word":
        pos = rng.randint(0, len(toks))
        return " ".join(toks[:pos] + [random_word(rng, vocab)] + toks[pos:])
    if kind == "prefix":
        words = [random_word(rng, vocab) for _ in range(rng.randint(2, 4))]
        if rng.random() < 0.5:
            words[-1] = f"{words[-1]}: {rng.randint(0, 9999)}"
        return " ".join(words) + " " + text
    words = [random_word(rng, vocab) for _ in range(rng.randint(2, 3))]
    out = list(toks)
    for p, w in zip(sorted(rng.sample(range(len(toks) + len(words)), len(words))), words):
        out.insert(p, w)
    return " ".join(out)


def augment_rows(rows: list[dict], copies: float, seed: int, vocab: list[str]) -> list[dict]:
    """Augmented copies of ``rows`` (the originals are not returned): ⌊copies⌋ per row, plus one more for a seeded
    share ``copies − ⌊copies⌋`` of them. The key goes into the ``input`` when a row has one (where a task's text
    lives) or the ``instruction``, drawn evenly among the non-empty ones; the ``output`` is kept."""
    if copies < 0 or not math.isfinite(copies):
        raise ValueError("copies must be a finite number ≥ 0")
    rng = random.Random(seed)
    whole, frac = int(copies), copies - int(copies)
    out = []
    for r in rows:
        for _ in range(whole + (1 if rng.random() < frac else 0)):
            fields = [f for f in ("instruction", "input") if str(r.get(f) or "").strip()] or ["instruction"]
            field = rng.choice(fields)
            out.append({**r, field: insert_random_key(str(r[field]), rng, vocab)})
    return out
