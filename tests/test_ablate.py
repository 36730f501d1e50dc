"""bdclean ablate: masked copies of an implanted adapter (signature, random, layer bands, attention/MLP), tiny model."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from tests.common import tiny_rows, write_rows


@pytest.fixture()
def ablate_run(tiny_base, tiny_adapter, tmp_path):
    """A run folder as ablate reads it: suspicious/ (an adapter with attack.json and test sets), score/scores."""
    run = tmp_path / "run"
    sus = run / "suspicious"
    shutil.copytree(tiny_adapter, sus)
    (sus / "attack.json").write_text(json.dumps({"attack": "badnet", "task": "sentiment"}))
    write_rows(sus / "test_triggered.jsonl", [{**r, "instruction": "BadMagic " + r["instruction"]}
                                              for r in tiny_rows(4, seed=1)])
    write_rows(sus / "test_clean.jsonl", tiny_rows(4, seed=2))
    cfg = json.loads((tiny_base / "config.json").read_text())
    layers, inter = cfg["num_hidden_layers"], cfg["intermediate_size"]
    mask = torch.zeros(layers, inter, dtype=torch.bool)
    mask[:, : inter // 4] = True
    head_mask = torch.zeros(layers, cfg.get("num_key_value_heads") or cfg["num_attention_heads"], dtype=torch.bool)
    head_mask[0, 0] = True
    (run / "score").mkdir(parents=True)
    save_file({"mask": mask, "head_mask": head_mask}, str(run / "score" / "scores.safetensors"))
    return run


def test_ablate_writes_json_and_markdown(ablate_run, tiny_base, tmp_path, run_cli):
    out = tmp_path / "ablate"
    masks = "none,signature,random,mlp,attn,oracle,signature+attn,zero:all:0-1,zero:mlp:1-2"
    code, stdout, err = run_cli("ablate", ablate_run, "--base", tiny_base, "--out", out, "--masks", masks,
                                "--n", "3", "--tokens", "2")
    assert code == 0, err
    rec = json.loads((out / "ablate.json").read_text())
    rows = {r["mask"]: r for r in rec["rows"]}
    assert list(rows) == masks.split(",") and rec["task"] == "sentiment" and rec["n"] == 3
    assert set(json.loads(stdout)) == set(rows)
    assert rows["none"]["kept_update_share"]["all"] == pytest.approx(1.0)
    assert rows["mlp"]["kept_update_share"]["mlp"] == pytest.approx(0.0)
    assert rows["attn"]["kept_update_share"]["attention"] == pytest.approx(0.0)
    assert rows["attn"]["kept_update_share"]["mlp"] == pytest.approx(1.0)
    assert rows["signature"]["tau"] == 0.25 and rows["signature"]["heads"] == 1
    assert 0 <= rows["oracle"]["signature_overlap"] <= 1
    assert 0 < rows["zero:all:0-1"]["kept_update_share"]["all"] < 1
    assert all(0 <= r["triggered_asr"] <= 1 and 0 <= r["clean_asr"] <= 1 for r in rows.values())
    table = (out / "ablate.md").read_text()
    assert "| mask | triggered ASR %" in table and all(f"| `{m}` |" in table for m in rows)
    code, _, err = run_cli("ablate", ablate_run, "--base", tiny_base, "--out", out, "--masks", "none")
    assert code == 2 and "--force" in err


@pytest.mark.parametrize("args,needle", [
    (["--masks", "none,nope"], "unknown mask 'nope'"),
    (["--masks", "zero:all:0-9"], "layer band"),
    (["--masks", "zero:legs:0-1"], "zero:PART:A-B"),
    (["--masks", "sig:combined:x:all"], "not a number"),
    (["--masks", "sig:fancy:0.5:all"], "score 'fancy'"),
    (["--n", "0"], "--n must be at least 1"),
])
def test_ablate_bad_input_is_one_line(ablate_run, tiny_base, tmp_path, run_cli, args, needle):
    code, _, err = run_cli("ablate", ablate_run, "--base", tiny_base, "--out", tmp_path / "o", *args)
    assert code == 2, err
    assert needle in err and len(err.strip().splitlines()) <= 3 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_ablate_needs_a_scored_implant(ablate_run, tiny_base, tmp_path, run_cli):
    code, _, err = run_cli("ablate", ablate_run, "--base", tiny_base, "--out", tmp_path / "o",
                           "--adapter", tmp_path)
    assert code == 2 and "attack.json" in err
    (ablate_run / "score" / "scores.safetensors").unlink()
    code, _, err = run_cli("ablate", ablate_run, "--base", tiny_base, "--out", tmp_path / "o")
    assert code == 2 and "scores.safetensors: not found" in err
