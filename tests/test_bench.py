"""Smoke test of the benchmark grid on the tiny model, so `make bench` cannot rot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.common import FAST_COMPARE_YAML

ROOT = Path(__file__).resolve().parent.parent


def test_grid_one_cell_then_resume(tiny_base, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import grid

    cfg = tmp_path / "fast.yaml"
    cfg.write_text(FAST_COMPARE_YAML)
    results, md = tmp_path / "results", tmp_path / "BENCHMARKS.md"
    # an ablation line as scripts/diagnose.py writes it
    results.mkdir()
    (results / "ablation.jsonl").write_text(json.dumps(
        {"mask": "sig:norm:0.5:0.35", "run": "runs/x", "triggered_asr": 0.25, "clean_asr": 0.0, "n": 8}) + "\n")
    argv = ["--cells", "badnet-sentiment", "--methods", "prune", "--limit", "3", "--base", str(tiny_base),
            "--implant-args", "--samples 8 --epochs 1 --test-size 4 --max-len 48",
            "--compare-args", "--max-new-tokens 4", "--config", str(cfg),
            "--runs", str(tmp_path / "runs"), "--results", str(results), "--benchmarks", str(md)]
    grid.main(argv)
    cell = json.loads((results / "cells" / "badnet-sentiment.json").read_text())
    assert [r["method"] for r in cell["rows"]] == ["none", "prune", "ours"]
    assert cell["implant"]["attack"] == "badnet" and cell["machine"]["cores"]
    text = md.read_text()
    assert "| badnet-sentiment (3 prompts) |" in text and "| norm | 25 / 0 |" in text
    capsys.readouterr()
    grid.main(argv)  # resume: the finished cell is not recomputed
    assert "cell badnet-sentiment: done" in capsys.readouterr().out
