"""report: report.md + PNG figures for a run folder (signature heatmap, score distribution, before/after bars)."""

from __future__ import annotations

from pathlib import Path

from bdclean import constants as C
from bdclean import schemas
from bdclean.console import log
from bdclean.errors import InputError, UsageError
from bdclean.io.artifacts import atomic_path, write_text


def _savefig(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def run(run_dir: Path, before: Path | None = None, after: Path | None = None, force: bool = False) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise UsageError("report needs matplotlib: pip install matplotlib") from None
    import torch
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    out = run_dir / C.REPORT_FILE
    if out.exists() and not force:
        raise UsageError(f"{out}: already exists; pass --force to overwrite")
    sfolder = run_dir / C.STAGE_DIRS["score"]
    if not (sfolder / C.SCORES).is_file():
        raise UsageError(f"{run_dir}: no score/{C.SCORES}; run `bdclean score` (or purify) first")
    sc = load_file(str(sfolder / C.SCORES))
    sig = schemas.read(schemas.Signature, sfolder / C.SIGNATURE)
    score, mask = sc["score"].float(), sc["mask"].bool()
    lines = [f"# bdclean report: {run_dir}", ""]

    # 1. heatmap layer × channel, and below it the signature itself: thousands of channels share a few hundred
    # pixels, so marks drawn over the scores would vanish (or, at a large τ, hide them)
    fig, (ax, axm) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True, layout="constrained")
    logs = torch.log10(score.clamp_min(1e-12))
    lo = float(torch.quantile(logs.flatten()[:2**24], 0.01))  # a few near-zero channels must not flatten the colours
    im = ax.imshow(logs.numpy(), aspect="auto", cmap="viridis", interpolation="nearest", vmin=lo)
    ax.set_ylabel("layer")
    ax.set_title("channel score (log10)")
    axm.imshow(mask.float().numpy(), aspect="auto", cmap=ListedColormap(["white", "red"]), vmin=0, vmax=1,
               interpolation="antialiased")
    axm.set_xlabel("MLP channel")
    axm.set_ylabel("layer")
    axm.set_title(f"signature: red = suppressed ({sig.n_selected} of {mask.numel()} channels, τ={sig.tau:g})")
    for a in (ax, axm):
        a.yaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
    fig.colorbar(im, ax=[ax, axm], label="log10 score", shrink=0.6)  # beside both panels: their x axes line up
    _savefig(fig, run_dir / "signature_heatmap.png")
    plt.close(fig)

    # 2. score distribution with τ cut
    fig, ax = plt.subplots(figsize=(7, 3.5))
    flat = score.flatten()
    cut = float(flat[mask.flatten()].min()) if mask.any() else float(flat.max())
    ax.hist(flat.numpy(), bins=100, color="steelblue")
    ax.axvline(cut, color="red", linestyle="--", label=f"τ cut ({sig.tau:.0%} of channels above)")
    ax.set_xlabel(f"score ({sig.score}, λ={sig.lam})")
    ax.set_ylabel("channels")
    ax.legend()
    _savefig(fig, run_dir / "score_distribution.png")
    plt.close(fig)

    per_layer = mask.sum(dim=1).tolist()
    top_layers = sorted(range(len(per_layer)), key=lambda l: -per_layer[l])[:5]
    lines += [
        "## Signature",
        f"- {sig.n_selected} of {sig.layers * sig.channels_per_layer} MLP channels (τ = {sig.tau}, "
        f"{sig.scope}, score = {sig.score}, λ = {sig.lam}, N = {sig.n_variants} variants)",
        "- layers holding most of it: " + ", ".join(f"{l} ({per_layer[l]})" for l in top_layers),
        f"- attention units (kv head + its query heads): {len(sig.heads)}"
        + (" — " + ", ".join(f"L{h.layer}/kv{h.kv_head}" for h in sig.heads[:8])
           + (" …" if len(sig.heads) > 8 else "") if sig.heads else ""),
        "",
        "![signature heatmap](signature_heatmap.png)",
        "",
        "![score distribution](score_distribution.png)",
        "",
    ]

    # 3. --tau auto: held-out synthetic ASR and perplexity vs τ
    tsel = sfolder / C.TAU_SELECTION
    if tsel.is_file() and sig.tau_selection == "auto":  # a fixed-τ rerun leaves no selection to show
        rec = schemas.read(schemas.TauSelection, tsel).model_dump()
        tab = rec["table"]
        fig, ax = plt.subplots(figsize=(6, 3.4))
        ax.plot([t["tau"] for t in tab], [100 * t["asr"] for t in tab], "o-", color="firebrick",
                label="held-out synthetic ASR %")
        if all(t.get("removal") is not None for t in tab):  # absent in older selections; None if unmeasurable
            ax.plot([t["tau"] for t in tab], [100 * t["removal"] for t in tab], "^-", color="navy",
                    label="held-out backdoor removed %")
        ax2 = ax.twinx()
        ax2.plot([t["tau"] for t in tab], [t["ppl_ratio"] for t in tab], "s--", color="gray", label="perplexity ratio")
        ax.axvline(rec["tau"], color="green", label=f"chosen τ = {rec['tau']:g}")
        ax.set_xlabel("τ")
        ax.set_ylabel("%")
        ax.set_ylim(-3, 103)  # a share: all-zero ASR must read as 0 %, not as a range around it
        ax2.set_ylabel("perplexity / unsuppressed")
        handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize=8,
                  frameon=False)  # below the plot: inside it would cover the curves
        _savefig(fig, run_dir / "tau_selection.png")
        plt.close(fig)
        def pct(x):
            return "—" if x is None else f"{100 * x:.1f}"

        lines += ["## τ selection (--tau auto)", f"- chosen τ = {rec['tau']:g}: {rec['reason']}", "",
                  "| τ | held-out backdoor removed % | held-out ASR % | perplexity ratio |", "|---|---|---|---|"]
        lines += [f"| {t['tau']:g} | {pct(t.get('removal'))} | {pct(t['asr'])} | {t['ppl_ratio']:.3f} |" for t in tab]
        lines += ["", "![tau selection](tau_selection.png)", ""]

    # 4. before / after
    for given in (before, after):
        if given is not None and not Path(given).is_file():
            raise InputError(f"{given}: eval file not found")
    before = before or run_dir / "eval_before.json"
    after = after or run_dir / "eval_after.json"
    rows = []
    if Path(before).is_file() and Path(after).is_file():
        b, a = schemas.read(schemas.Eval, Path(before)), schemas.read(schemas.Eval, Path(after))
        for name, key in (("triggered ASR %", "triggered"), ("clean ASR %", "clean")):
            x, y = getattr(b, key), getattr(a, key)
            if x is not None and y is not None:  # an eval may hold one set only
                rows.append((name, 100 * x.asr, 100 * y.asr))
        if b.perplexity is not None and a.perplexity is not None:
            rows.append(("perplexity", b.perplexity, a.perplexity))
    if rows:
        fig, axes = plt.subplots(1, len(rows), figsize=(3.4 * len(rows), 3.4), squeeze=False, layout="constrained")
        for ax, (name, x, y) in zip(axes[0], rows):
            ax.bar(["before", "after"], [x, y], color=["#c0392b", "#27ae60"])
            ax.set_ylim(0, 1.15 * max(x, y, 1e-9))  # room for the value above the taller bar
            ax.set_title(name)
            for k, v in enumerate([x, y]):
                ax.text(k, v, f"{v:.1f}", ha="center", va="bottom")
        fig.suptitle("purification: before vs after")
        _savefig(fig, run_dir / "before_after.png")
        plt.close(fig)
        lines += ["## Before / after", "", "| metric | before | after |", "|---|---|---|"]
        lines += [f"| {n} | {x:.2f} | {y:.2f} |" for n, x, y in rows]
        lines += ["", "![before/after](before_after.png)", ""]
    else:
        lines += ["(no eval_before.json / eval_after.json found: run `bdclean eval` to add before/after figures)", ""]
    write_text(out, "\n".join(lines) + "\n")
    log(f"report → {out}")
    return out
