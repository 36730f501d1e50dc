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
