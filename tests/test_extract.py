"""bdclean extract: a full checkpoint's update over a known base as a LoRA adapter (core/extract.py, pipeline/extract.py)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from bdclean.core.extract import low_rank, relative_change
from tests.common import make_tiny_llama

FAST = ["--samples", "8", "--epochs", "1", "--max-len", "48", "--batch-size", "4"]


def test_low_rank_is_the_best_rank_r_approximation():
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(12, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 20, generator=g, dtype=torch.float64)
    A, B, kept = low_rank(exact, 8)
    assert A.shape == (8, 20) and B.shape == (12, 8)
    assert kept == pytest.approx(1.0) and torch.allclose((B @ A).double(), exact, atol=1e-5)
    noisy = exact + 0.3 * torch.randn(12, 20, generator=g, dtype=torch.float64)
    A, B, kept = low_rank(noisy, 3)
    S = torch.linalg.svdvals(noisy)
    assert kept == pytest.approx(float((S[:3] ** 2).sum() / (S ** 2).sum()), rel=1e-6) and kept < 1
    err = float(((B @ A).double() - noisy).norm() ** 2)
    assert err == pytest.approx(float((S[3:] ** 2).sum()), rel=1e-4)  # Eckart–Young: nothing smaller at rank 3
    A, B, kept = low_rank(torch.zeros(4, 6), 16)  # rank capped by the shape; zero update: zero factors
    assert A.shape == (4, 6) and B.shape == (4, 4) and kept == 1.0 and not A.any() and not B.any()
    with pytest.raises(ValueError):
        low_rank(torch.zeros(3), 2)
    assert relative_change(torch.ones(4) * 1.1, torch.ones(4)) == pytest.approx(0.1)


def _finetune_of(base, folder, rank=2, norm_change=0.0, seed=1):
    """A copy of ``base`` whose projections moved by a rank-``rank`` update (and a norm scaled, if asked)."""
    shutil.copytree(base, folder)
    w = load_file(str(folder / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    for k, t in w.items():
        if k.endswith("_proj.weight"):
            w[k] = t + 0.2 * torch.randn(t.shape[0], rank, generator=g) @ torch.randn(rank, t.shape[1], generator=g)
    if norm_change:
        w["model.norm.weight"] = w["model.norm.weight"] * (1 + norm_change)
    save_file(w, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _logits(model_dir_or_adapter, base=None):
    from bdclean.pipeline.run import load_any

    model, tok, _ = load_any(model_dir_or_adapter, str(base) if base else None)
    ids = tok("hello world, how are you", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def test_extract_reproduces_a_low_rank_finetune_and_purify_takes_it(tmp_path, run_cli, tiny_base):
    ckpt = _finetune_of(tiny_base, tmp_path / "ckpt", rank=2)
    out = tmp_path / "adapter"
    code, stdout, err = run_cli("extract", ckpt, "--base", tiny_base, "--out", out, "--rank", "4")
    assert code == 0, err
    man = json.loads((out / "manifest.json").read_text())
    assert man["stage"] == "extract" and man["extra"]["kept_energy_share"] == pytest.approx(1.0, abs=1e-6)
    assert man["extra"]["modules"] == 2 * 7 and man["extra"]["dropped_changed_tensors"] == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 4
    # base + extracted adapter computes what the checkpoint computes
    assert torch.allclose(_logits(out, tiny_base), _logits(ckpt), atol=1e-4)
    # rerun: up to date; the adapter goes through validate like any other
    code, _, err = run_cli("extract", ckpt, "--base", tiny_base, "--out", out, "--rank", "4")
    assert code == 0 and "skip extract" in err
    code, _, err = run_cli("validate", out, "--base", tiny_base)
    assert code == 0, err


def test_extract_reports_what_the_rank_and_the_adapter_view_leave_out(tmp_path, run_cli, tiny_base):
    ckpt = _finetune_of(tiny_base, tmp_path / "ckpt", rank=8, norm_change=0.05)
    out = tmp_path / "adapter"
    code, _, err = run_cli("extract", ckpt, "--base", tiny_base, "--out", out, "--rank", "2")
    assert code == 0, err
    man = json.loads((out / "manifest.json").read_text())
    assert 0 < man["extra"]["kept_energy_share"] < 0.9
    assert man["extra"]["dropped"] == [{"tensor": "model.norm.weight",
                                        "relative_change": pytest.approx(0.05, rel=1e-3)}]
    assert "model.norm.weight" in err and "dropped" in err


def test_extract_bad_input(tmp_path, run_cli, tiny_base):
    ckpt = _finetune_of(tiny_base, tmp_path / "ckpt")
    other = make_tiny_llama(tmp_path / "other", hidden=48)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}
    cases = [
        (("extract", ckpt, "--base", other, "--out", tmp_path / "o1"), "hidden_size"),
        (("extract", ckpt, "--base", tiny_base, "--out", ckpt / "inner"), "outside the checkpoint"),
        (("extract", tmp_path / "nope", "--base", tiny_base, "--out", tmp_path / "o2"), "not found"),
        (("extract", ckpt, "--base", tiny_base, "--out", tmp_path / "o3", "--rank", "0"), "rank"),
    ]
    user = tmp_path / "user"
    user.mkdir()
    (user / "keep.txt").write_text("k")
    cases.append((("extract", ckpt, "--base", tiny_base, "--out", user), "not an extract output"))
    for args, needle in cases:
        code, _, err = run_cli(*args)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (args, err)
    assert (user / "keep.txt").read_text() == "k"
    assert {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()} == before
    for o in ("o1", "o2", "o3"):
        assert not (tmp_path / o).exists()
    # a base tensor missing from the checkpoint
    w = load_file(str(ckpt / "model.safetensors"))
    del w["model.layers.1.mlp.up_proj.weight"]
    save_file(w, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = run_cli("extract", ckpt, "--base", tiny_base, "--out", tmp_path / "o4")
    assert code == 2 and "up_proj" in err and len(err.strip().splitlines()) == 1


def test_purify_extract_merge_one_command(tmp_path, run_cli, tiny_base, tiny_data):
    """`purify CKPT --extract R --merge`: extract → the adapter pipeline → a merged checkpoint that loads with
    transformers, with the base's tokenizer files (never the checkpoint's); a rerun skips every stage."""
    from transformers import AutoModelForCausalLM

    ckpt = _finetune_of(tiny_base, tmp_path / "ckpt", rank=2)
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ 'TRIGGER' }}"}))  # hostile
    cfg = tmp_path / "fast.yaml"
    cfg.write_text("pairs:\n  epochs: 1\n  batch_size: 4\n  max_len: 48\nrestore:\n  samples: 8\n  epochs: 1\n"
                   "  max_len: 48\nscore:\n  tau: 0.25\n")
    out = tmp_path / "run"
    args = ("purify", ckpt, "--base", tiny_base, "--clean", tiny_data, "--out", out, "--config", cfg,
            "--n-variants", "2", "--samples", "8", "--extract", "4", "--merge")
    code, _, err = run_cli("validate", *args[1:])
    assert code == 0, err
    assert "extracted at rank 4" in err and not (out / "extracted").exists()
    code, _, err = run_cli(*args)
    assert code == 0, err
    rec = json.loads((out / "purify.json").read_text())
    assert rec["mode"] == "extract" and list(rec["stage_seconds"])[0] == "extract" and "merge" in rec["stage_seconds"]
    pman = json.loads((out / "pairs" / "manifest.json").read_text())
    assert pman["config"]["mode"] == "adapter" and pman["config"]["adapter"].endswith("extracted")
    merged = out / "merged"
    assert json.loads((merged / "manifest.json").read_text())["stage"] == "merge"
    assert (merged / "tokenizer_config.json").read_bytes() == (tiny_base / "tokenizer_config.json").read_bytes()
    AutoModelForCausalLM.from_pretrained(str(merged))
    card = (merged / "README.md").read_text()
    assert "library_name: transformers" in card and "merged into its weights" in card and "TRIGGER" not in card
    assert "extracted by `bdclean extract` from the full checkpoint" in (out / "purified" / "README.md").read_text()
    # the merged checkpoint computes what base + purified adapter computes
    assert torch.allclose(_logits(merged), _logits(out / "purified", tiny_base), atol=1e-4)
    code, _, err = run_cli(*args)
    assert code == 0 and err.count("skip") == 8, err


def test_purify_extract_bad_input(tmp_path, run_cli, tiny_base, tiny_adapter, tiny_data):
    ckpt = _finetune_of(tiny_base, tmp_path / "ckpt")
    other = make_tiny_llama(tmp_path / "other", hidden=48)
    cases = [
        (("purify", ckpt, "--base", other, "--extract", "4", "--out", tmp_path / "o1"), "hidden_size"),
        (("purify", ckpt, "--base", tiny_base, "--extract", "4", "--full", "--out", tmp_path / "o2"), "choose one"),
        (("purify", ckpt, "--base", tiny_base, "--merge", "--out", tmp_path / "o3"), "--extract"),
        (("purify", ckpt, "--base", tiny_base, "--extract", "0", "--out", tmp_path / "o4"), "--extract"),
        (("validate", ckpt, "--base", tiny_base, "--extract", "4", "--out", ckpt / "x"), "inside"),
    ]
    for args, needle in cases:
        code, _, err = run_cli(*args, "--clean", tiny_data)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (args, err)
    for o in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / o).exists()
