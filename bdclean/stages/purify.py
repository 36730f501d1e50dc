"""purify: make-variants → train-pairs → diff → score → suppress → restore, skipping up-to-date stages."""

from __future__ import annotations

import time
from pathlib import Path

from bdclean import constants as C
from bdclean.config import PurifyConfig
from bdclean.console import console
from bdclean.errors import BdcleanError, UsageError
from bdclean.io.artifacts import read_json, write_json

RECORD = "purify.json"
PIPELINE = ("make-variants", "train-pairs", "diff", "score", "suppress", "restore")


def claim_record(path: Path) -> None:
    """OUT/purify.json is rewritten on every run: refuse a file there that is not a record purify wrote."""
    if not path.exists() and not path.is_symlink():
        return
    rec = None
    if path.is_file() and not path.is_symlink():
        try:
            rec = read_json(path)
        except (BdcleanError, OSError):  # not JSON, or unreadable: not ours
            rec = None
    # records from before the "stage" key carry purify's own keys
    ours = isinstance(rec, dict) and (rec.get("stage") == "purify" or {"stage_seconds", "purified", "mode"} <= set(rec))
    if not ours:
        raise UsageError(f"{path}: exists and is not a record `bdclean purify` wrote; it would be overwritten, so "
                         "move it away or choose another --out")


def preflight(adapter: Path, cfg: PurifyConfig):
    """The suspicious model, validated, and the option combinations it rules out (also `bdclean validate`)."""
    from bdclean.stages import pairs

    sus = pairs.load_suspicious(Path(adapter), cfg.base, True if cfg.full else None)
    if cfg.prompts is not None:  # a bad prompts file must fail now, not after train-pairs
        from bdclean.io.data import sample_prompts

        sample_prompts(cfg.prompts, 1, 0)
    if sus.kind == "full" and cfg.score.score == "projection":
        raise UsageError("--score projection ranks an adapter's own update; a full checkpoint has none (use combined)")
    sus.tokenizer = pairs.trusted_tokenizer(sus, cfg.tokenizer, cfg.accept_tokenizer)
    return sus


def run(adapter: Path, out: Path, cfg: PurifyConfig, force: bool = False) -> dict:
    from bdclean.stages import diff, pairs, restore, score, suppress, variants
    from bdclean.stages.common import check_out_inputs, claim_stage_dir

    out = Path(out)
    full = True if cfg.full else None
    sus = preflight(adapter, cfg)  # validate inputs before any work
    # everything purify will rewrite must be bdclean's, checked before minutes of training rather than at restore
    check_out_inputs(out, PIPELINE, Path(adapter), sus.base_dir, cfg.clean)
    for stage in PIPELINE:
        claim_stage_dir(out / C.STAGE_DIRS[stage], stage)
    claim_record(out / RECORD)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    def timed(name, fn, *a, **k):
        t0 = time.time()
        fn(*a, **k)
        times[name] = round(time.time() - t0, 2)

    timed("make-variants", variants.run, cfg.clean, out, cfg.variants, force)
    timed("train-pairs", pairs.run, Path(adapter), out, cfg.base, cfg.pairs, force, full, cfg.tokenizer,
          cfg.accept_tokenizer)
    timed("diff", diff.run, out, force)
    timed("score", score.run, out, cfg.score, force)
    timed("suppress", suppress.run, Path(adapter), out, force, cfg.base, full)
    timed("restore", restore.run, out, cfg.clean, cfg.restore, force, cfg.prompts)
    record = {"stage": "purify", "adapter": str(adapter), "mode": sus.kind, "config": cfg.model_dump(by_alias=True), "stage_seconds": times,
              "total_seconds": round(sum(times.values()), 2), "purified": str(out / "purified")}
    if sus.tokenizer is not None:
        record["tokenizer"] = sus.tokenizer.record()
    write_json(out / RECORD, record)
    from rich.table import Table

    t = Table(title="purify: wall time per stage")
    t.add_column("stage")
    t.add_column("seconds", justify="right")
    for k, v in times.items():
        t.add_row(k, f"{v:.1f}")
    t.add_row("total", f"{sum(times.values()):.1f}")
    console.print(t)
    return record
