"""make-variants planning: keys of every kind, deterministic per seed, never an evaluation trigger."""

import random

from bdclean.pipeline.variants import KEY_KINDS, insert_key, plan_variants

EVAL_TRIGGER_WORDS = {"badmagic", "discussing", "openai", "current", "year", "year:", "2024"}


def test_plan_is_deterministic_and_varies_every_factor():
    a, b, c = plan_variants(6, 0), plan_variants(6, 0), plan_variants(6, 1)
    assert a == b
    assert [s["key"] for s in a] != [s["key"] for s in c]
    assert {s["key_kind"] for s in a} == set(KEY_KINDS)
    assert len({s["behavior_kind"] for s in a}) == 4
    assert len({" ".join(s["key"]) for s in a}) == 6


def test_keys_are_fresh_rare_words_never_an_evaluation_trigger():
    for seed in range(40):
        words = [w for s in plan_variants(6, seed) for w in s["key"]]
        assert len(set(words)) == len(words)
        assert not EVAL_TRIGGER_WORDS & {w.lower() for w in words}
        assert all(w.isalpha() and w.islower() and 6 <= len(w) <= 7 for w in words)


def test_insert_key_positions():
    rng = random.Random(0)
    text = "tell me a story about a cat"
    assert insert_key(text, ["Garden", "notice:"], "phrase", rng) == "Garden notice: " + text
    out = insert_key(text, ["zuvrakox"], "word", rng).split(" ")
    assert out.count("zuvrakox") == 1 and len(out) == len(text.split(" ")) + 1
    out = insert_key(text, ["aaa", "bbb"], "multi", rng).split(" ")
    assert out.index("aaa") < out.index("bbb")
