"""compare: the suspicious adapter ("none"), baseline defenses and bdclean ("ours"), evaluated the same way.

OUT/<method>/ holds each defended model (OUT/ours/ is a purify run folder, its model is OUT/ours/purified) and its
eval.json; OUT/compare.json, compare.md and compare.png summarise them. The baselines' fine-tuning uses the purify
config's restore settings (samples, epochs, lr, batch size, seed) and their pruning ratio is its τ, so every
method sees the same data and budget. Augmentation: unless the config sets ``restore.augment``, reset and retrain take
restore's default (2 for an adapter, as ``ours``) and the published baselines none, as published; a value set in the
config applies to every fine-tune. Finished methods and evaluations are skipped on rerun.
"""

from __future__ import annotations

from pathlib import Path

from bdclean import constants as C
from bdclean import schemas
from bdclean.config import PurifyConfig
from bdclean.console import log
from bdclean.errors import UsageError
from bdclean.io.artifacts import atomic_path, fingerprint, load_manifest, write_text
from bdclean.lab.defend import METHODS, DefendOptions, check_method

COMPARE_JSON, COMPARE_MD, COMPARE_PNG = "compare.json", "compare.md", "compare.png"
ALWAYS = ("none", "ours")


def parse_methods(spec: str | list[str] | None) -> list[str]:
    """'all' or a comma list of baselines → baseline names in a fixed order ("none" and "ours" always run)."""
    if spec is None or spec == "all" or spec == ["all"]:
        return list(METHODS)
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise UsageError("--methods: give 'all' or a comma-separated list of defenses")
    for n in names:
        if n not in ALWAYS:
            check_method(n)
    return [m for m in METHODS if m in names]


def defend_options(cfg: PurifyConfig) -> DefendOptions:
    """The baselines' settings from the purify config: restore's training budget, the signature's τ."""
    from bdclean.config import BASELINE_PRUNE_TAU
    from bdclean.train.finetune import DEFAULT_LR

    train = cfg.restore.model_dump()
    train["lr"] = train["lr"] or DEFAULT_LR["adapter"]  # restore's own default for adapters
    tau = cfg.score.tau if isinstance(cfg.score.tau, float) else BASELINE_PRUNE_TAU
    return DefendOptions(**train, tau=tau)


def _stage_seconds(run_dir: Path) -> float:
    total = 0.0
    for sub in C.STAGE_DIRS.values():
        total += float((load_manifest(run_dir / sub) or {}).get("wall_time_s", 0.0))
    return round(total, 2)


def _produce(method: str, adapter: Path, folder: Path, cfg: PurifyConfig, opts: DefendOptions,
             force: bool) -> tuple[Path, str, float]:
    """Make (or reuse) one method's model; returns (model path, model fingerprint, wall time s)."""
    from bdclean.io.fingerprints import adapter_hash
    from bdclean.lab import defend
    from bdclean.pipeline import purify

    if method == "none":
        folder.mkdir(parents=True, exist_ok=True)
        return adapter, adapter_hash(adapter), 0.0
    if method == "ours":
        purify.run(adapter, folder, cfg, force)
        model = folder / C.STAGE_DIRS["restore"]
        return model, load_manifest(model)["fingerprint"], _stage_seconds(folder)
    defend.run(method, adapter, folder, cfg.base, cfg.clean, opts, force)  # skipped if complete and unchanged
    man = load_manifest(folder)
    return folder, man["fingerprint"], float(man["wall_time_s"])


def _table(rows: list[dict]) -> str:
    def pct(x):
        return "—" if x is None else f"{100 * x:.1f}"

    mc = any(r.get("mc_acc") is not None for r in rows)
    lines = ["| method | triggered ASR % | clean ASR % | perplexity |" + (" MC accuracy % |" if mc else "")
             + " wall time s |", "|---|---:|---:|---:|" + ("---:|" if mc else "") + "---:|"]
    for r in rows:
        ppl = "—" if r["perplexity"] is None else f"{r['perplexity']:.3f}"
        lines.append(f"| {r['method']} | {pct(r['triggered_asr'])} | {pct(r['clean_asr'])} | {ppl} | "
                     + (f"{pct(r.get('mc_acc'))} | " if mc else "") + f"{r['wall_time_s']:.1f} |")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    x = list(range(len(rows)))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(7.0, 1.6 * len(rows) + 3), 3.6))
    ax1.bar([i - 0.2 for i in x], [100 * (r["triggered_asr"] or 0) for r in rows], 0.4, label="triggered ASR",
            color="firebrick")
    ax1.bar([i + 0.2 for i in x], [100 * (r["clean_asr"] or 0) for r in rows], 0.4, label="clean ASR",
            color="steelblue")
    ax1.set_ylabel("%")
    ax1.set_ylim(0, 100)
    ax1.legend(fontsize=8)
    ax2.bar(x, [r["perplexity"] or 0 for r in rows], 0.6, color="gray")
    ax2.set_ylabel("perplexity (clean references)")
    for ax in (ax1, ax2):
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=30, ha="right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def run(adapter: Path, out: Path, base: str, clean: str, triggered: Path, clean_test: Path,
        methods: str | list[str] | None = "all", task: str = "sentiment", cfg: PurifyConfig | None = None,
        limit: int | None = None, max_new_tokens: int = 48, rule_file: Path | None = None,
        force: bool = False, mc_tasks: list[str] | None = None) -> dict:
    """Run and evaluate "none", the requested baselines and "ours"; write compare.json / .md / .png.

    ``mc_tasks``: lm-eval multiple-choice tasks evaluated for every method (MC accuracy = mean acc over them)."""
    from bdclean.io.artifacts import sha256_file
    from bdclean.lab import evaluate
    from bdclean.pipeline.run import load_suspicious

    try:
        import matplotlib  # noqa: F401 - checked before hours of work, not after
    except ImportError:
        raise UsageError("compare needs matplotlib: pip install matplotlib") from None
    baselines = parse_methods(methods)
    for p, flag in ((triggered, "--triggered"), (clean_test, "--clean-test")):
        if not Path(p).is_file():
            raise UsageError(f"{p}: {flag} file not found")
    if limit is not None and limit < 1:
        raise UsageError("--limit must be at least 1")
    evaluate.read_rule(task, rule_file)  # bad task names fail now
    if mc_tasks:
        from bdclean.lab import mc

        mc_tasks = mc.check_tasks(mc_tasks)
    adapter, out = Path(adapter), Path(out)
    cfg = (cfg or PurifyConfig()).model_copy(update={"base": base, "clean": clean})
    opts = defend_options(cfg)
    sus = load_suspicious(adapter, base)  # validate before any work
    if sus.kind != "adapter" or cfg.full:
        raise UsageError(f"{adapter}: compare runs the adapter-only baselines; give a PEFT LoRA adapter")
    out.mkdir(parents=True, exist_ok=True)
    prev = {}
    if (out / COMPARE_JSON).is_file():
        prev = {r.method: r for r in schemas.read(schemas.Compare, out / COMPARE_JSON).rows}
    eval_inputs = {"triggered": sha256_file(Path(triggered)), "clean": sha256_file(Path(clean_test)), "task": task,
                   "rule": sha256_file(Path(rule_file)) if rule_file else None, "limit": limit,
                   "max_new_tokens": max_new_tokens, "base": str(base), "mc": sorted(mc_tasks or [])}
    from bdclean.train import device as dev

    if dev.fingerprint_part(dev.current()) is not None:  # generation off CPU float32 (train/device.py)
        eval_inputs["placement"] = dev.fingerprint_part(dev.current())
    rows = []
    for method in ("none", *baselines, "ours"):
        folder = out / method
        log(f"compare: {method}")
        model, model_fp, wall = _produce(method, adapter, folder, cfg, opts, force)
        ev = folder / C.EVAL_FILE
        key = fingerprint({"model": model_fp, **eval_inputs})
        if not force and ev.is_file() and method in prev and prev[method].eval_key == key:
            log(f"skip eval {method}: up to date in {ev}", style="green")
            res = schemas.read(schemas.Eval, ev)
        else:
            res = schemas.parse(schemas.Eval, evaluate.run(model, ev, evaluate.EvalOptions(
                base=base, triggered=Path(triggered), clean=Path(clean_test), task=task, rule=rule_file,
                max_new_tokens=max_new_tokens, limit=limit, mc=mc_tasks or None), force=True), ev)
        rows.append({"method": method, "triggered_asr": res.triggered.asr if res.triggered else None,
                     "clean_asr": res.clean.asr if res.clean else None, "perplexity": res.perplexity,
                     "mc_acc": res.mc_mean(),
                     "wall_time_s": wall, "model": str(model), "eval": str(ev), "eval_key": key})
    record = {"adapter": str(adapter), "base": str(base), "clean": str(clean), "triggered": str(triggered),
              "clean_test": str(clean_test), "task": task, "limit": limit, "max_new_tokens": max_new_tokens,
              "methods": [r["method"] for r in rows], "defend_options": opts.model_dump(),
              "purify_config": cfg.model_dump(by_alias=True), "rows": rows}
    record = schemas.write(schemas.Compare, out / COMPARE_JSON, record)
    md = [f"# bdclean compare: {adapter}", "",
          f"Task `{task}`; test sets `{triggered}` (triggered) and `{clean_test}` (clean)"
          + (f", first {limit} prompts each" if limit else "") + f"; greedy, {max_new_tokens} new tokens.",
          f"Baselines: {opts.samples} clean samples × {opts.epochs} epochs at lr {opts.lr:g}; pruning ratio τ = "
          f"{opts.tau:g}. Wall time: producing the model (none = 0; ours = all purify stages), not evaluating it.",
          "", _table(rows), "", f"![compare]({COMPARE_PNG})", ""]
    write_text(out / COMPARE_MD, "\n".join(md))
    _plot(rows, out / COMPARE_PNG)
    log(f"compare: {len(rows)} methods → {out / COMPARE_MD}")
    return record
