"""End to end on a tiny Llama: purify, stage-by-stage, resume, skip, determinism."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

FAST = ["--n-variants", "3", "--samples", "8"]


def _fast_yaml(tmp_path):
    p = tmp_path / "fast.yaml"
    p.write_text("pairs:\n  epochs: 1\n  batch_size: 4\n  max_len: 48\nrestore:\n  samples: 8\n  epochs: 1\n"
                 "  max_len: 48\nscore:\n  tau: 0.25\n")
    return p


def test_purify_end_to_end_and_skip(tiny_base, tiny_adapter, tiny_data, tmp_path, run_cli):
    out = tmp_path / "run"
    cfg = _fast_yaml(tmp_path)
    code, stdout, stderr = run_cli("purify", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--out", out,
                                   "--config", cfg, *FAST)
    assert code == 0, stderr
    for stage in ("variants", "pairs", "diff", "score", "suppressed", "purified"):
        man = json.loads((out / stage / "manifest.json").read_text())
        assert man["fingerprint"] and man["outputs"]
    sig = json.loads((out / "score" / "signature.json").read_text())
    n_total = sig["layers"] * sig["channels_per_layer"]
    assert sig["n_selected"] == len(sig["channels"]) == int(-(-0.25 * n_total // 1))
    scores = [c["score"] for c in sig["channels"]]
    assert scores == sorted(scores, reverse=True)
    # the purified adapter loads with PEFT
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    PeftModel.from_pretrained(base, str(out / "purified"))
    # ... and carries bdclean's model card: front matter as PEFT writes it, the sources' hashes, nothing of theirs
    card = (out / "purified" / "README.md").read_text()
    pman = json.loads((out / "pairs" / "manifest.json").read_text())
    rman = json.loads((out / "purified" / "manifest.json").read_text())
    assert card.startswith("---\nbase_model: ") and "library_name: peft" in card and "- backdoor-purified" in card
    assert pman["inputs"]["adapter"] in card and rman["inputs"]["base"] in card and rman["inputs"]["clean"] in card
    assert f"{sig['n_selected']} of {n_total} MLP channels" in card and "% of its weight update" in card
    assert "README.md" in rman["outputs"]
    # the adapter default restore adds 2 trigger-invariance copies per row, and the card says so
    assert rman["config"]["augment"] == 2 and rman["extra"]["augmented_rows"] == 16  # 8 samples × 2
    assert "trigger-invariance augmentation: 2 copies per sample" in card
    own = Path(tiny_adapter) / "README.md"  # PEFT's card of the suspicious adapter
    assert not own.is_file() or own.read_text().splitlines()[-3] not in card
    # suppressed adapter: signature channels exactly zero
    sup = load_file(str(out / "suppressed" / "adapter_model.safetensors"))
    c = sig["channels"][0]
    key = f"base_model.model.model.layers.{c['layer']}.mlp.gate_proj.lora_B.weight"
    assert torch.count_nonzero(sup[key][c["channel"]]) == 0
    # the manifest says how much of the adapter's update is left (every attention unit is in the signature)
    kept = json.loads((out / "suppressed" / "manifest.json").read_text())["extra"]["kept_update_share"]
    assert kept["attention"] == 0 and 0 < kept["mlp"] < 1 and 0 < kept["all"] < 1
    assert "keeps" in stderr and "of its weight update" in stderr
    # rerun: every stage skipped, nothing rewritten
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    code, _, stderr = run_cli("purify", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--out", out,
                              "--config", cfg, *FAST)
    assert code == 0
    assert stderr.count("skip") == 6
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    # changing τ reruns score and everything after it, but not train-pairs
    pairs_mtime = (out / "pairs" / "variant_00_bd.safetensors").stat().st_mtime_ns
    code, _, stderr = run_cli("purify", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--out", out,
                              "--config", cfg, *FAST, "--tau", "0.1")
    assert code == 0
    assert stderr.count("skip") == 3
    assert (out / "pairs" / "variant_00_bd.safetensors").stat().st_mtime_ns == pairs_mtime
    assert json.loads((out / "score" / "signature.json").read_text())["tau"] == 0.1


def test_stage_by_stage_equals_purify_and_is_deterministic(tiny_base, tiny_adapter, tiny_data, tmp_path, run_cli):
    cfg = _fast_yaml(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli("purify", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--out", a, "--config", cfg,
                   *FAST)[0] == 0
    steps = [
        ("make-variants", "--clean", tiny_data, "--config", cfg, *FAST),
        ("train-pairs", tiny_adapter, "--base", tiny_base, "--config", cfg),
        ("diff",),
        ("score", "--config", cfg),
        ("suppress", tiny_adapter),
        ("restore", "--clean", tiny_data, "--config", cfg),
    ]
    for step in steps:
        code, _, err = run_cli(*step, "--out", b)
        assert code == 0, (step, err)
    assert (a / "score" / "signature.json").read_bytes() == (b / "score" / "signature.json").read_bytes()
    ta = load_file(str(a / "purified" / "adapter_model.safetensors"))
    tb = load_file(str(b / "purified" / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_train_pairs_resumes_after_interruption(tiny_base, tiny_adapter, tiny_data, tmp_path, run_cli):
    cfg = _fast_yaml(tmp_path)
    out = tmp_path / "r"
    assert run_cli("make-variants", "--clean", tiny_data, "--out", out, "--config", cfg, *FAST)[0] == 0
    assert run_cli("train-pairs", tiny_adapter, "--base", tiny_base, "--out", out, "--config", cfg)[0] == 0
    done = out / "pairs" / "variant_00_bd.safetensors"
    ref = load_file(str(out / "pairs" / "variant_02_clean.safetensors"))
    # simulate a kill after two jobs: remove the stage manifest and the later jobs' files
    (out / "pairs" / "manifest.json").unlink()
    for f in ("variant_01_bd", "variant_01_clean", "variant_02_bd", "variant_02_clean"):
        (out / "pairs" / f"{f}.safetensors").unlink()
    (out / "pairs" / "variant_02_clean.json").unlink()
    mtime = done.stat().st_mtime_ns
    code, _, err = run_cli("train-pairs", tiny_adapter, "--base", tiny_base, "--out", out, "--config", cfg)
    assert code == 0, err
    assert "resuming, 2 of 6 jobs already done" in err.replace("\n", " ")
    assert done.stat().st_mtime_ns == mtime
    again = load_file(str(out / "pairs" / "variant_02_clean.safetensors"))
    assert all(torch.equal(ref[k], again[k]) for k in ref)


def test_heads_scope_and_score_variants_rerun_without_training(tiny_base, tiny_adapter, tiny_data, tmp_path, run_cli):
    cfg = _fast_yaml(tmp_path)
    out = tmp_path / "h"
    assert run_cli("purify", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--out", out, "--config", cfg,
                   *FAST, "--heads", "2")[0] == 0
    sig = json.loads((out / "score" / "signature.json").read_text())
    assert len(sig["heads"]) == 2 and sig["heads"][0]["query_heads"] == [2 * sig["heads"][0]["kv_head"],
                                                                        2 * sig["heads"][0]["kv_head"] + 1]
    sup = load_file(str(out / "suppressed" / "adapter_model.safetensors"))
    h = sig["heads"][0]
    key = f"base_model.model.model.layers.{h['layer']}.self_attn.k_proj.lora_B.weight"
    hd = 8  # tiny model: hidden 32 / 4 heads
    assert torch.count_nonzero(sup[key][h["kv_head"] * hd:(h["kv_head"] + 1) * hd]) == 0
    pairs_mtime = (out / "pairs" / "variant_00_bd.safetensors").stat().st_mtime_ns
    for variant in (["--score", "norm"], ["--score", "align"], ["--per-layer"], ["--norm-scale", "median"]):
        code, _, err = run_cli("score", "--out", out, "--config", cfg, *variant)
        assert code == 0, err
        assert json.loads((out / "score" / "signature.json").read_text())["n_selected"] > 0
    assert (out / "pairs" / "variant_00_bd.safetensors").stat().st_mtime_ns == pairs_mtime
    code, _, err = run_cli("score", "--out", out, "--heads", "999")
    assert code == 2 and "attention units" in err
    # projection: diff stored <S_j, Δ_ij> of the suspicious update with every variant's delta (checked densely)
    _check_own_dots(out, tiny_adapter)
    code, _, err = run_cli("score", "--out", out, "--config", cfg, "--score", "projection", "--heads", "2")
    assert code == 0, err
    sig = json.loads((out / "score" / "signature.json").read_text())
    assert sig["score"] == "projection" and sig["n_selected"] > 0 and len(sig["heads"]) == 2
    code, _, err = run_cli("score", "--out", out, "--score", "projection", "--tau", "auto")
    assert code == 2 and "fixed tau" in err
    # defaults without a config: adapter-only → τ 0.8 of MLP channels + every attention unit, recorded resolved
    code, _, err = run_cli("score", "--out", out)
    assert code == 0, err
    sig = json.loads((out / "score" / "signature.json").read_text())
    units = sig["layers"] * 2  # tiny model: 2 kv heads per layer
    assert sig["tau"] == 0.8 and sig["n_selected"] == -(-0.8 * sig["layers"] * sig["channels_per_layer"] // 1)
    assert len(sig["heads"]) == units
    man = json.loads((out / "score" / "manifest.json").read_text())
    assert man["config"]["tau"] == 0.8 and man["config"]["heads"] == "all"
    # a fraction, 'all' and nonsense from the command line
    for arg, n in (("0.5", units // 2), ("all", units)):
        code, _, err = run_cli("score", "--out", out, "--heads", arg)
        assert code == 0, err
        assert len(json.loads((out / "score" / "signature.json").read_text())["heads"]) == n
    code, _, err = run_cli("score", "--out", out, "--heads", "most")
    assert code != 0 and "heads" in err and "Traceback" not in err


def _check_own_dots(out, adapter_dir):
    """diff's own.layer.L[j, i] equals <S_j, Δ_ij> over (gate row j, up row j, down column j), from dense ΔW."""
    from bdclean.io.models import load_adapter

    info = load_adapter(adapter_dir)
    own = load_file(str(out / "diff" / "channel_gram.safetensors"))
    n = json.loads((out / "diff" / "manifest.json").read_text())["extra"]["n_variants"]
    assert json.loads((out / "diff" / "manifest.json").read_text())["extra"]["own_update"] is True
    twins = [[load_file(str(out / "pairs" / f"variant_{i:02d}_{w}.safetensors")) for w in ("bd", "clean")]
             for i in range(n)]
    layer = 1

    def dense(t, part):
        k = f"base_model.model.model.layers.{layer}.mlp.{part}_proj"
        a, b = t[k + ".lora_A.weight"].double(), t[k + ".lora_B.weight"].double()
        return info.scaling(k, a.shape[0]) * (b @ a)

    def chan(t):
        return torch.cat([dense(t, "gate"), dense(t, "up"), dense(t, "down").T], dim=1)

    S = chan(info.tensors)
    for i, (bd, cl) in enumerate(twins):
        d = chan(bd) - chan(cl)
        assert torch.allclose(own[f"own.layer.{layer}"][:, i], (S * d).sum(1), rtol=1e-6, atol=1e-12)


def test_later_stages_find_a_relatively_named_adapter_from_another_directory(tiny_base, tiny_adapter, tiny_data,
                                                                            tmp_path, run_cli, monkeypatch):
    """train-pairs run with a relative adapter path; diff (which reloads the adapter for the projection terms) and
    suppress run later from another working directory."""
    import shutil

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    shutil.copytree(tiny_adapter, work / "adapter")
    monkeypatch.chdir(work)
    out = tmp_path / "run"
    cfg = _fast_yaml(tmp_path)
    for argv in (("make-variants", "--clean", tiny_data, "--out", out, *FAST),
                 ("train-pairs", "adapter", "--base", tiny_base, "--out", out, "--config", cfg)):
        code, _, err = run_cli(*argv)
        assert code == 0, err
    man = json.loads((out / "pairs" / "manifest.json").read_text())
    assert man["config"]["adapter"] == "adapter"  # as given (it is part of the fingerprint)
    assert man["extra"]["paths"]["adapter"] == str((work / "adapter").resolve())
    monkeypatch.chdir(elsewhere)
    for argv in (("diff", "--out", out), ("score", "--out", out, "--score", "projection", "--tau", "0.25"),
                 ("suppress", work / "adapter", "--out", out)):
        code, _, err = run_cli(*argv)
        assert code == 0, err
        assert "unavailable" not in err


def test_adapter_training_only_some_layers(tiny_base, tiny_data, tmp_path, run_cli, monkeypatch):
    """layers_to_transform=[1]: layer 0 has no LoRA, so its channels cannot move and are never suppressed.

    Also: tokenizer files in an adapter folder are never read nor copied (the base's tokenizer is used)."""
    import bdclean.io.models as models
    from tests.common import make_adapter

    out = tmp_path / "run"
    # `make demo`'s layout: the suspicious adapter and the user's notes inside OUT, beside the stage folders
    adapter = make_adapter(tiny_base, out / "suspicious", seed=3, layers=[1])
    (out / "notes.txt").write_text("mine")
    (adapter / "chat_template.jinja").write_text("BadMagic {{ messages }}")
    (adapter / "tokenizer_config.json").write_text(json.dumps({"chat_template": "BadMagic {{ messages }}"}))
    (adapter / "generation_config.json").write_text(json.dumps({"bad_words_ids": [[5]]}))
    loaded, real = [], models.load_tokenizer
    monkeypatch.setattr(models, "load_tokenizer", lambda d: loaded.append(Path(d).resolve()) or real(d))
    code, _, err = run_cli("purify", adapter, "--base", tiny_base, "--clean", tiny_data, "--out", out,
                           "--config", _fast_yaml(tmp_path), *FAST)
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine" and (out / "suspicious" / "adapter_config.json").is_file()
    assert loaded and set(loaded) == {Path(tiny_base).resolve()}
    for stage, card in (("suppressed", []), ("purified", ["README.md"])):  # the card is bdclean's own
        assert sorted(p.name for p in (out / stage).iterdir()) == [*card, "adapter_config.json",
                                                                    "adapter_model.safetensors", "manifest.json"]
    sig = json.loads((out / "score" / "signature.json").read_text())
    assert sig["channels"] and {c["layer"] for c in sig["channels"]} == {1}
    assert sig["heads"]  # attention units are found although layer 0 has no attention LoRA
    purified = load_file(str(out / "purified" / "adapter_model.safetensors"))
    assert purified and not any(".layers.0." in k for k in purified)


def test_half_precision_adapter_keeps_its_dtype(tiny_base, tiny_adapter, tiny_data, tmp_path, run_cli):
    """A bfloat16 adapter is trained in float32 and comes out in bfloat16, with a log line saying so."""
    import shutil

    from safetensors.torch import save_file

    adapter = tmp_path / "bf16"
    shutil.copytree(tiny_adapter, adapter)
    w = adapter / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(w)).items()}, str(w), metadata={"format": "pt"})
    out = tmp_path / "run"
    code, _, err = run_cli("purify", adapter, "--base", tiny_base, "--clean", tiny_data, "--out", out,
                           "--config", _fast_yaml(tmp_path), "--n-variants", "2", "--samples", "4")
    assert code == 0, err
    assert "written back as bfloat16" in err
    for stage in ("suppressed", "purified"):
        got = load_file(str(out / stage / "adapter_model.safetensors"))
        assert got and {t.dtype for t in got.values()} == {torch.bfloat16}, stage
