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



def test_quiet_says_only_the_result_and_verbose_adds_debug_lines(tmp_path, tiny_data, run_cli):
    def variants(out, *flags):
        code, _, err = run_cli("make-variants", "--clean", tiny_data, "--out", tmp_path / out, "-n", "3",
                               "--samples", "8", *flags)
        assert code == 0, err
        return err.splitlines()

    normal = variants("a")
    assert not any("debug:" in line for line in normal)
    assert variants("b", "--quiet") == [normal[-1].replace("/a/", "/b/")]  # the result line (eval's test: progress)
    skip = variants("b", "-q")
    assert len(skip) == 1 and "skip" in skip[0]
    verbose = variants("c", "-v")
    assert "debug: make-variants: fingerprint" in verbose[0] and len(verbose) > len(normal)
