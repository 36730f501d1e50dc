"""purify: make-variants → train-pairs → diff → score → suppress → restore, skipping up-to-date stages."""

from __future__ import annotations

import time
from pathlib import Path

from bdclean import constants as C
from bdclean import schemas
from bdclean.config import PurifyConfig
from bdclean.console import QUIET, console, log, verbosity
from bdclean.errors import BdcleanError, UsageError
from bdclean.io.artifacts import read_json

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
    """The suspicious model, validated, and every option value checked against it (also `bdclean validate`), so
    what would fail in a later stage fails now rather than after minutes of train-pairs.

    With ``cfg.extract`` the model is a full checkpoint of ``cfg.base``: vetted and checked against the base's
    headers (extract.check), and the options checked for the adapter extract will make (every projection, rank
    ``cfg.extract``); its tokenizer is never read (the base's is used)."""
    from bdclean.pipeline import run as runs

    if cfg.extract is not None:
        if cfg.full:
            raise UsageError("--extract purifies a full checkpoint's update over --base as an adapter, --full the "
                             "checkpoint itself: choose one")
        from bdclean.pipeline.extract import check

        sus = check(Path(adapter), cfg.base)[0]
    else:
        sus = runs.load_suspicious(Path(adapter), cfg.base, True if cfg.full else None)
        if cfg.merge and sus.kind == "full":
            raise UsageError("--merge folds a purified adapter into its base; for a full checkpoint give its base "
                             "with --extract RANK (full-model mode writes a checkpoint already)")
    if cfg.prompts is not None:  # a bad prompts file must fail now, not after train-pairs
        from bdclean.io.data import sample_prompts

        sample_prompts(cfg.prompts, 1, 0)
    check_options(sus, cfg)
    from bdclean.pipeline.pairs_jobs import check_gpu_workers
    from bdclean.train.device import current

    check_gpu_workers(cfg.pairs, current())
    if cfg.pairs.executor == "ray":
        from bdclean.pipeline.pairs_ray import preflight as ray_preflight

        ray_preflight(cfg.pairs.ray_address)
    sus.tokenizer = None if cfg.extract else runs.trusted_tokenizer(sus, cfg.tokenizer, cfg.accept_tokenizer)
    sus.memory = memory_estimate(sus, cfg)
    from bdclean.io.headers import check_fits

    check_fits(sus.memory["floor_bytes"], f"purifying {sus.path} (its weights and optimizer states in float32)")
    return sus


def has_attention_lora(sus) -> bool:
    """Whether the variants train attention LoRA: the suspicious adapter's own targets, or FULL_VARIANT_LORA's."""
    from bdclean.core.arch import ATTN_PROJ

    if sus.kind == "full":
        return True
    return any(m.rsplit(".", 1)[-1] in ATTN_PROJ for m in sus.info.module_pairs())


def check_options(sus, cfg: PurifyConfig) -> None:
    """The option checks score and tau-auto make on the finished pairs, made on the model instead."""
    from bdclean.core.score import unit_count
    from bdclean.io.headers import config_dims
    from bdclean.pipeline.pairs import check_variant_training

    sc = cfg.score
    kind = "adapter" if cfg.extract else sus.kind  # what the pipeline will purify
    if kind == "full" and sc.score == "projection":
        raise UsageError("--score projection ranks an adapter's own update; a full checkpoint has none (use combined)")
    check_variant_training(kind, cfg.pairs.variant_training)
    if sc.tau == "auto":
        if kind != "adapter":
            raise UsageError("--tau auto is implemented for the adapter-only threat model; give a fixed --tau")
        if cfg.variants.n_variants < 3:
            raise UsageError("--tau auto needs at least 3 variants (one held out, two to score): raise --n-variants")
    attn = has_attention_lora(sus)
    heads = sc.resolved(kind, attn).heads
    shown = f"{heads:g}" if isinstance(heads, float) else heads
    if heads:
        if not attn:
            raise UsageError(f"--heads {shown}: the adapter has no attention LoRA modules (q/k/v/o_proj) to score; "
                             "use --heads 0")
        dims = config_dims(sus.model_cfg, sus.base_dir / C.MODEL_CONFIG)
        total = dims.layers * dims.n_kv
        if unit_count(heads, total) > total:
            raise UsageError(f"--heads {shown}: the model has only {total} attention units ({dims.layers} layers × "
                             f"{dims.n_kv} kv heads)")


def memory_estimate(sus, cfg: PurifyConfig) -> dict:
    """Memory one training process of purify needs, from the weight headers (nothing is loaded).

    floor: the model in float32 plus every trained tensor's gradient and two AdamW moments (LoRA factors for
    adapters; every weight in a full checkpoint's restore), which is certain to be allocated; estimate: the floor
    plus activations kept for the backward pass (a rough 4·hidden + 2·intermediate float32 values per token and
    layer, for a batch of clean samples and their poisoned copies)."""
    from bdclean.io.headers import available_memory, config_dims, part_shapes
    from bdclean.io.models import model_float32_bytes
    from bdclean.pipeline.pairs import FULL_VARIANT_LORA

    dims = config_dims(sus.model_cfg, sus.base_dir / C.MODEL_CONFIG)
    weights = model_float32_bytes(sus.base_dir)
    if cfg.extract is not None:  # the base (of the same size) with a rank-`extract` LoRA on every projection
        lora = 4 * cfg.extract * dims.layers * sum(i + o for i, o in part_shapes(dims).values())
        floor = weights + 4 * lora
    elif sus.kind == "adapter":
        lora = sum(4 * (s[0] * s[1] if len(s) == 2 else 0) for s in sus.info.shapes.values())
        floor = weights + 4 * lora
    else:
        r = FULL_VARIANT_LORA["r"]
        lora = 4 * r * dims.layers * sum(i + o for i, o in part_shapes(dims).values())
        floor = max(weights + 4 * lora, 4 * weights)  # restore trains every weight with AdamW
    tokens = 2 * max(cfg.pairs.batch_size, cfg.restore.batch_size) * max(cfg.pairs.max_len, cfg.restore.max_len)
    activations = tokens * dims.layers * (4 * dims.hidden + 2 * dims.inter) * 4
    avail = available_memory()
    return {"floor_bytes": floor, "estimate_bytes": floor + activations, "available_bytes": avail,
            "per": "training process (train-pairs runs --workers of them at once)"}


def check_out(out: Path, sus, cfg: PurifyConfig) -> None:
    """Everything purify will rewrite in ``out`` must be bdclean's, checked before minutes of training rather than
    at restore (also `bdclean validate --out`)."""
    from bdclean.pipeline.folders import check_out_inputs, claim_stage_dir

    stages = stages_of(cfg)
    if cfg.extract is not None:  # sus is the checkpoint; the base is the one it is extracted over
        from bdclean.io.models import resolve_base

        base_dir = resolve_base(cfg.base)
    else:
        base_dir = sus.base_dir
    check_out_inputs(out, stages, sus.path, base_dir, cfg.clean)
    for stage in stages:
        claim_stage_dir(out / C.STAGE_DIRS[stage], stage)
    claim_record(out / RECORD)


def stages_of(cfg: PurifyConfig) -> tuple[str, ...]:
    """The stages purify runs: PIPELINE, after extract with --extract, then merge with --merge."""
    return ("extract",) * (cfg.extract is not None) + PIPELINE + ("merge",) * bool(cfg.merge)


def run(adapter: Path, out: Path, cfg: PurifyConfig, force: bool = False) -> dict:
    from bdclean.pipeline import diff, extract, merge, pairs, restore, score, suppress, variants
    from bdclean.pipeline.run import Run

    out, source = Path(out), Path(adapter)
    sus = preflight(adapter, cfg)  # validate inputs before any work
    check_out(out, sus, cfg)
    if sus.kind == "full" and cfg.extract is None:
        log("purify: full-model mode (experimental) re-initialises channels and broke the model on all three SmolLM2 "
            "checkpoints measured (RESULTS.md); if this checkpoint fine-tunes a public base, `--extract 64 --base "
            "BASE` purifies its update as an adapter instead, which kept it (−1.8 to +0.5 % perplexity, 0–9 % "
            "triggered)")
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    def timed(name, fn, *a, **k):
        t0 = time.time()
        fn(*a, **k)
        times[name] = round(time.time() - t0, 2)

    if cfg.extract is not None:  # the known-base route: from here on, the extracted adapter is the suspicious one
        adapter = out / C.STAGE_DIRS["extract"]
        timed("extract", extract.run, source, adapter, cfg.base, cfg.extract, force)
        sus = preflight(adapter, cfg.model_copy(update={"extract": None}))
    run = Run.of(sus, out, cfg.base)  # the model vetted once, for every stage
    timed("make-variants", variants.run, cfg.clean, out, cfg.variants, force)
    timed("train-pairs", pairs.run, run, cfg.pairs, force, cfg.tokenizer, cfg.accept_tokenizer)
    timed("diff", diff.run, run, force)
    timed("score", score.run, run, cfg.score, force)
    timed("suppress", suppress.run, run, force)
    timed("restore", restore.run, run, cfg.clean, cfg.restore, force, cfg.prompts)
    if cfg.merge:
        timed("merge", merge.run, run, force)
    record = {"stage": "purify", "adapter": str(source), "mode": "extract" if cfg.extract else sus.kind,
              "config": cfg.model_dump(by_alias=True), "stage_seconds": times,
              "total_seconds": round(sum(times.values()), 2), "purified": str(out / C.STAGE_DIRS["restore"])}
    from bdclean.train.device import current

    record["placement"] = current().record()
    if cfg.extract is not None:
        record["extracted"] = str(adapter)
    if cfg.merge:
        record["merged"] = str(out / C.STAGE_DIRS["merge"])
    if sus.tokenizer is not None:
        record["tokenizer"] = sus.tokenizer.record()
    schemas.write(schemas.PurifyRecord, out / RECORD, record)
    from rich.table import Table

    t = Table(title="purify: wall time per stage")
    t.add_column("stage")
    t.add_column("seconds", justify="right")
    for k, v in times.items():
        t.add_row(k, f"{v:.1f}")
    t.add_row("total", f"{sum(times.values()):.1f}")
    if verbosity() == QUIET:  # the result line instead of the table
        log(f"purify: {record['total_seconds']:.1f} s → {record['purified']}")
    else:
        console.print(t)
    return record
