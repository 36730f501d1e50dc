"""purify: make-variants → train-pairs → diff → score → suppress → restore, skipping up-to-date stages."""

from __future__ import annotations

import time
from pathlib import Path

from bdclean.config import PurifyConfig
from bdclean.console import console
from bdclean.errors import UsageError
from bdclean.io.artifacts import write_json


def preflight(adapter: Path, cfg: PurifyConfig):
    """The suspicious model, validated, and the option combinations it rules out (also `bdclean validate`)."""
    from bdclean.stages import pairs

    sus = pairs.load_suspicious(Path(adapter), cfg.base, True if cfg.full else None)
    if cfg.prompts is not None:  # a bad prompts file must fail now, not after train-pairs
        from bdclean.io.data import sample_prompts

        sample_prompts(cfg.prompts, 1, 0)
    if sus.kind == "full" and cfg.score.score == "projection":
        raise UsageError("--score projection ranks an adapter's own update; a full checkpoint has none (use combined)")
    return sus


def run(adapter: Path, out: Path, cfg: PurifyConfig, force: bool = False) -> dict:
    from bdclean.stages import diff, pairs, restore, score, suppress, variants

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    full = True if cfg.full else None
    sus = preflight(adapter, cfg)  # validate inputs before any work
    times: dict[str, float] = {}

    def timed(name, fn, *a, **k):
        t0 = time.time()
        fn(*a, **k)
        times[name] = round(time.time() - t0, 2)

    timed("make-variants", variants.run, cfg.clean, out, cfg.variants, force)
    timed("train-pairs", pairs.run, Path(adapter), out, cfg.base, cfg.pairs, force, full)
    timed("diff", diff.run, out, force)
    timed("score", score.run, out, cfg.score, force)
    timed("suppress", suppress.run, Path(adapter), out, force, cfg.base, full)
    timed("restore", restore.run, out, cfg.clean, cfg.restore, force, cfg.prompts)
    record = {"adapter": str(adapter), "mode": sus.kind, "config": cfg.model_dump(by_alias=True), "stage_seconds": times,
              "total_seconds": round(sum(times.values()), 2), "purified": str(out / "purified")}
    write_json(out / "purify.json", record)
    from rich.table import Table

    t = Table(title="purify: wall time per stage")
    t.add_column("stage")
    t.add_column("seconds", justify="right")
    for k, v in times.items():
        t.add_row(k, f"{v:.1f}")
    t.add_row("total", f"{sum(times.values()):.1f}")
    console.print(t)
    return record
