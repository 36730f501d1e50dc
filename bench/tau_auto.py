"""`--tau auto` against the fixed default τ on a finished benchmark cell (the τ-selection issue's evidence).

    .venv/bin/python bench/tau_auto.py --cells badnet-refusal   (evaluates on the cell's own prompt count)

For each cell the variants, twins and diff of the cell's `ours` run are reused (nothing is retrained): `score --tau
auto`, `suppress`, `restore` and `eval` run in runs/bench/<cell>/tau-auto, and bench/results/tau_auto/<cell>.json
records the chosen τ, the selection's reason and measurements, and the real backdoor's ASR / perplexity next to
the cell's fixed-τ `ours` row. BENCHMARKS.md (bench/grid.py) renders them as a table.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from grid import sh, write_markdown  # noqa: E402
from machine import describe, portable  # noqa: E402

from bdclean import constants as C  # noqa: E402
from bdclean import schemas  # noqa: E402
from bdclean.io.artifacts import write_json  # noqa: E402


def run_cell(cell: str, a, bd: str) -> dict:
    task = cell.split("-")[1]
    cdir = Path(a.runs) / cell
    sus, src, dst = cdir / "suspicious", cdir / "compare" / "ours", cdir / "tau-auto"
    fixed = json.loads((Path(a.results) / "cells" / f"{cell}.json").read_text())
    for stage in ("variants", "pairs", "diff"):
        if not (dst / stage).is_dir():
            shutil.copytree(src / stage, dst / stage)
    base = ["--base", a.base] if a.base != "smollm2" else []
    t0 = time.time()
    cmds = [[bd, "score", "--out", str(dst), "--tau", "auto", *shlex.split(a.score_args)],
            [bd, "suppress", str(sus), "--out", str(dst), *base],
            [bd, "restore", "--out", str(dst), "--augment", "0"],  # as the grid's `ours` row it is compared with
            [bd, "eval", str(dst / "purified"), "--base", a.base, "--triggered", str(sus / "test_triggered.jsonl"),
             "--clean", str(sus / "test_clean.jsonl"), "--task", task, "--limit", str(fixed["limit"]),
             "--out", str(dst / "eval.json")]]
    for c in cmds:
        sh(c)
    sel = json.loads((dst / "score" / "tau_selection.json").read_text())
    ev = schemas.read(schemas.Eval, dst / C.EVAL_FILE)
    ours = next(r for r in fixed["rows"] if r["method"] == "ours")
    return {"cell": cell, "date": time.strftime("%Y-%m-%d"), "machine": describe(), "limit": fixed["limit"],
            "commands": [" ".join(c) for c in cmds], "seconds": round(time.time() - t0, 1),
            "chosen_tau": sel["tau"], "reason": sel.get("reason"), "selection_table": sel.get("table"),
            "auto": {"triggered_asr": ev.triggered.asr, "clean_asr": ev.clean.asr, "perplexity": ev.perplexity},
            "fixed": {"tau": schemas.read(schemas.Signature, src / C.STAGE_DIRS["score"] / C.SIGNATURE).tau,
                      "triggered_asr": ours["triggered_asr"], "clean_asr": ours["clean_asr"],
                      "perplexity": ours["perplexity"]}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="badnet-sentiment,badnet-refusal", help="comma list of grid cells already run")
    ap.add_argument("--base", default="smollm2", help="base model (tests pass a tiny one)")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "bench"), help="the grid's work folder")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"), help="where results/tau_auto/*.json go")
    ap.add_argument("--benchmarks", default=str(ROOT / "BENCHMARKS.md"), help="the generated table")
    ap.add_argument("--score-args", default="", help="extra `bdclean score` options, e.g. '--config sel.yaml'")
    a = ap.parse_args(argv)
    bd = str(Path(sys.executable).parent / "bdclean")
    out = Path(a.results) / "tau_auto"
    out.mkdir(parents=True, exist_ok=True)
    for cell in a.cells.split(","):
        path = out / f"{cell}.json"
        if path.is_file():
            print(f"tau-auto {cell}: done ({path})", flush=True)
            continue
        if not (Path(a.results) / "cells" / f"{cell}.json").is_file():
            print(f"tau-auto {cell}: skipped, the cell has not been run (bench/grid.py --cells {cell})", flush=True)
            continue
        write_json(path, portable(run_cell(cell, a, bd)))
    write_markdown(Path(a.results), Path(a.benchmarks))
    print(f"wrote {a.benchmarks}")


if __name__ == "__main__":
    main()
