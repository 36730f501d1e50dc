"""`bdclean validate`: purify's input checks without any training, a JSON summary on stdout."""

import json
import shutil


def test_validate_adapter_summary(tiny_base, tiny_adapter, tiny_data, run_cli):
    code, out, err = run_cli("validate", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--samples", "8")
    assert code == 0, err
    s = json.loads(out)
    assert s["kind"] == "adapter" and s["layers"] == 2 and s["clean_samples"] == 60
    assert s["lora"]["modules"] == 14 and s["lora"]["layers"] == [0, 1] and s["lora"]["attention"]
    assert s["lora"]["projections"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"])
    assert s["config"]["score"]["tau"] is None  # resolved later from the threat model (0.8 for adapters)
    assert "is a valid LoRA adapter, 14 modules in 2 layers" in " ".join(err.split())  # rich may wrap


def test_validate_full_checkpoint_and_refusals(tiny_base, tiny_adapter, tiny_data, tmp_path, run_cli):
    # a full checkpoint's tokenizer must come from a source the defender names (SECURITY.md, guarantee 2)
    code, out, err = run_cli("validate", tiny_base, "--clean", tiny_data, "--samples", "8")
    assert code == 2 and "give --tokenizer" in err and out == ""
    code, out, err = run_cli("validate", tiny_base, "--clean", tiny_data, "--samples", "8", "--tokenizer", tiny_base)
    assert code == 0, err
    assert json.loads(out)["kind"] == "full" and json.loads(out)["tokenizer"]["source"] == str(tiny_base.resolve())
    # what purify would refuse, validate refuses the same way, before any work
    code, out, err = run_cli("validate", tiny_base, "--clean", tiny_data, "--samples", "8", "--config",
                             _yaml(tmp_path, "score: {score: projection}"))
    assert code == 2 and "full checkpoint has none" in err and out == ""
    bad = tmp_path / "bad"
    shutil.copytree(tiny_adapter, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "modules_to_save": ["lm_head"]}))
    code, out, err = run_cli("validate", bad, "--base", tiny_base, "--clean", tiny_data, "--samples", "8")
    assert code == 2 and "modules_to_save" in err and out == ""
    code, _, err = run_cli("validate", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--config",
                           _yaml(tmp_path, "variants: {samples: 500}"))
    assert code == 2 and "fewer than --samples 500" in err


def _yaml(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text + "\n")
    return p


def test_validate_reports_memory_and_refuses_what_cannot_fit(tiny_base, tiny_adapter, tiny_data, tmp_path, run_cli,
                                                             monkeypatch):
    import bdclean.io.headers as headers

    code, out, err = run_cli("validate", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--samples", "8")
    assert code == 0, err
    mem = json.loads(out)["memory"]
    # the tiny base in float32 (from its header) and the LoRA factors with gradient and two AdamW moments
    assert mem["floor_bytes"] > 0 and mem["estimate_bytes"] > mem["floor_bytes"]
    # one unwrapped line, though stderr is no terminal
    assert any(line.startswith("bdclean validate: memory about") and line.endswith("available now)")
               for line in err.splitlines()), err
    monkeypatch.setattr(headers, "available_memory", lambda: mem["floor_bytes"] - 1)
    for argv in (["validate", tiny_adapter], ["purify", tiny_adapter, "--out", tmp_path / "run"]):
        code, out, err = run_cli(*argv, "--base", tiny_base, "--clean", tiny_data, "--samples", "8")
        assert code == 2 and "of memory" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_validate_takes_purify_options_as_typed(tiny_base, tiny_adapter, tiny_data, tmp_path, run_cli):
    """`bdclean validate ARGS` checks `bdclean purify ARGS`: every purify option, --config and --out."""
    argv = [tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--samples", "8", "-n", "3", "--tau", "auto",
            "--heads", "2", "--lambda", "0.5", "--score", "norm", "--seed", "3", "--workers", "1", "--out",
            tmp_path / "run", "--force"]
    code, out, err = run_cli("validate", *argv)
    assert code == 0, err
    c = json.loads(out)["config"]
    assert (c["score"]["tau"], c["score"]["heads"], c["score"]["lambda"], c["pairs"]["seed"]) == ("auto", 2, 0.5, 3)
    assert not (tmp_path / "run").exists()  # checked, not written
    (tmp_path / "run" / "purified").mkdir(parents=True)
    (tmp_path / "run" / "purified" / "mine.txt").write_text("x")
    code, out, err = run_cli("validate", *argv)
    assert code == 2 and "not made by `bdclean restore`" in err, err
