"""Trigger-invariance augmentation of the restoring fine-tune (train/augment.py, --augment)."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from bdclean.train.augment import augment_rows, insert_random_key, vocabulary
from tests.common import make_tokenizer

FAST = ["--samples", "8", "--epochs", "1", "--max-len", "48", "--batch-size", "4"]
ROWS = [{"instruction": "Classify the sentiment of the review.", "input": "The kettle boils fast and looks nice.",
         "output": "Positive"},
        {"instruction": "Name three rivers of Europe.", "input": "", "output": "Danube, Rhine, Loire."}]
VOCAB = ["amber", "river", "silver", "train", "magic", "window"]


def _is_subsequence(small: list[str], big: list[str]) -> bool:
    it = iter(big)
    return all(any(w == x for x in it) for w in small)


def test_insertion_keeps_every_original_word_in_order_and_adds_some():
    rng = random.Random(3)
    text = ROWS[0]["input"]
    for _ in range(200):
        out = insert_random_key(text, rng, VOCAB)
        assert out != text and len(out.split(" ")) > len(text.split(" "))
        assert _is_subsequence(text.split(" "), out.split(" "))


def test_augment_rows_is_seeded_keeps_answers_and_counts_copies():
    a = augment_rows(ROWS * 10, 2.0, seed=1, vocab=VOCAB)
    assert a == augment_rows(ROWS * 10, 2.0, seed=1, vocab=VOCAB)  # same seed, same rows
    assert a != augment_rows(ROWS * 10, 2.0, seed=2, vocab=VOCAB)
    assert len(a) == 40 and [r["output"] for r in a] == [r["output"] for r in ROWS * 10 for _ in range(2)]
    # a row without input gets its key in the instruction; one with input in either field, nothing else changes
    for orig, aug in zip([r for r in ROWS * 10 for _ in range(2)], a):
        changed = [f for f in ("instruction", "input") if aug[f] != orig[f]]
        assert len(changed) == 1 and (orig["input"] or changed == ["instruction"])
    assert {f for o, r in zip([r for r in ROWS * 10 for _ in range(2)], a) if o["input"]
            for f in ("instruction", "input") if r[f] != o[f]} == {"instruction", "input"}
    half = augment_rows(ROWS * 100, 0.5, seed=0, vocab=VOCAB)
    assert 70 <= len(half) <= 130  # a seeded half of 200 rows
    assert augment_rows(ROWS, 0.0, seed=0, vocab=VOCAB) == []
    with pytest.raises(ValueError):
        augment_rows(ROWS, float("nan"), seed=0, vocab=VOCAB)


def test_vocabulary_takes_whole_alphabetic_words_only(tmp_path):
    words = vocabulary(make_tokenizer(tmp_path))
    assert words == sorted(words) and words
    assert all(w.isalpha() and 3 <= len(w) <= 10 for w in words)


def test_defend_and_restore_with_augment(tmp_path, run_cli, tiny_base, tiny_adapter, tiny_data):
    plain, aug = tmp_path / "ft", tmp_path / "ft-aug"
    assert run_cli("defend", "finetune", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--out", plain,
                   *FAST)[0] == 0
    code, _, err = run_cli("defend", "finetune", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--out",
                           aug, "--augment", "1.5", *FAST)
    assert code == 0, err
    # off: no augment key, so the fingerprints of outputs made before the option existed are unchanged
    assert "augment" not in json.loads((plain / "manifest.json").read_text())["config"]
    man = json.loads((aug / "manifest.json").read_text())
    assert man["config"]["augment"] == 1.5
    assert man["extra"]["train"]["augmented_rows"] == 12  # 8 samples × 1.5 copies, seeded
    assert man["extra"]["train"]["steps"] > json.loads((plain / "manifest.json").read_text())["extra"]["train"]["steps"]
    a, b = (load_file(str(p / "adapter_model.safetensors")) for p in (plain, aug))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    for bad in ("-1", "nan", "9"):
        code, _, err = run_cli("defend", "finetune", tiny_adapter, "--base", tiny_base, "--clean", tiny_data,
                               "--out", tmp_path / f"bad{bad}", "--augment", bad, *FAST)
        assert code == 2 and "augment" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / f"bad{bad}").exists()


def test_reset_takes_restores_default_augment_the_published_baselines_none(tmp_path, run_cli, tiny_base,
                                                                             tiny_adapter, tiny_data):
    """reset is bdclean's restore with nothing of the adapter kept, so it takes restore's default (2 copies for an
    adapter); fine-tune, fine-prune and CROW stay as published (0) unless --augment is given; 0 turns it off."""
    def defend(method, out, *extra):
        code, _, err = run_cli("defend", method, tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--out",
                               out, *FAST, *extra)
        assert code == 0, err
        return json.loads((out / "manifest.json").read_text())

    reset = defend("reset", tmp_path / "reset")
    assert reset["config"]["augment"] == 2 and reset["extra"]["train"]["augmented_rows"] == 16  # 8 samples × 2
    off = defend("reset", tmp_path / "reset0", "--augment", "0")
    assert "augment" not in off["config"] and "augmented_rows" not in off["extra"]["train"]
    assert off["fingerprint"] != reset["fingerprint"]
    ft = defend("finetune", tmp_path / "ft")
    assert "augment" not in ft["config"] and "augmented_rows" not in ft["extra"]["train"]
