"""score: s_j = mean‖Δ_{i,j}‖ + λ·mean positive cosine (or the projection score); the signature is the top τ of
channels."""

from __future__ import annotations

from pathlib import Path

import torch

from bdclean import constants as C
from bdclean import schemas
from bdclean.config import ScoreOptions
from bdclean.console import log
from bdclean.errors import UsageError
from bdclean.io.artifacts import Manifest, save_tensors, stage_fingerprint
from bdclean.pipeline.folders import up_to_date
from bdclean.pipeline.run import Run


def run(run: Run, opts: ScoreOptions, force: bool = False) -> Path:
    from bdclean.core.score import combine, norm_and_align, projection, select_top, select_top_k, unit_count
    from bdclean.pipeline.diff import load_grams, load_own

    dfolder, folder = run.folder("diff"), run.folder("score")
    opts = resolve_defaults(run, opts)
    man = Manifest("score", opts.model_dump(by_alias=True), {"diff": stage_fingerprint(dfolder, "diff")})
    if up_to_date(folder, man.fingerprint, "score", force):
        return folder
    G, HG = load_grams(dfolder)
    k = 0
    if opts.heads:  # 'all', a count or a fraction (0 = none); checked before a --tau auto selection spends minutes
        if HG is None:
            raise UsageError("--heads needs attention LoRA modules (q/k/v/o_proj) in the adapter")
        total = HG.shape[0] * HG.shape[1]
        k = unit_count(opts.heads, total)
        if k > total:
            raise UsageError(f"--heads {opts.heads}: the model has only {total} attention units "
                             f"({HG.shape[0]} layers × {HG.shape[1]} kv heads)")
    own = load_own(dfolder) if opts.score == "projection" else None
    if opts.score == "projection" and own is None:
        raise UsageError("--score projection needs the suspicious adapter's update, which diff did not have "
                         "(full-model run, or the adapter moved or changed since train-pairs)")

    def rank(g: torch.Tensor, part: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scores, norm, align) of channels (part 0) or attention units (part 1) under opts.score."""
        nrm, aln = norm_and_align(g)
        if own is not None:
            return projection(own[part], g), nrm, aln
        return combine(nrm, aln, opts.lam, opts.score, opts.norm_scale), nrm, aln

    scores, norm, align = rank(G, 0)
    outputs = [C.SIGNATURE, C.SCORES]
    tau = opts.tau
    if tau == "auto":
        from bdclean.pipeline import tau_auto

        selection = tau_auto.select(run, opts, G, HG)
        tau = selection["tau"]
        schemas.write(schemas.TauSelection, folder / C.TAU_SELECTION, selection)
        outputs.append(C.TAU_SELECTION)
    mask = select_top(scores, tau, opts.scope)
    L, I = scores.shape
    sel = mask.nonzero().tolist()
    sel.sort(key=lambda li: (-float(scores[li[0], li[1]]), li[0], li[1]))
    signature = {
        "tau": tau,  # fraction of MLP channels suppressed
        "tau_selection": "auto" if opts.tau == "auto" else "fixed",  # auto: see tau_selection.json
        "lambda": opts.lam,  # weight of the alignment term
        "n_variants": int(G.shape[-1]),
        "scope": opts.scope,  # "global" (top τ of all channels) or "per-layer"
        "score": opts.score,  # combined | norm | align | projection
        "norm_scale": opts.norm_scale,  # "none" = paper's raw norm; "median" = norm / median norm
        "layers": L,
        "channels_per_layer": I,
        "n_selected": len(sel),
        "per_layer_counts": mask.sum(dim=1).tolist(),
        "channels": [
            {"layer": l, "channel": j, "score": float(scores[l, j]), "norm": float(norm[l, j]),
             "align": float(align[l, j])}
            for l, j in sel
        ],
    }
    tensors = {"score": scores.float(), "norm": norm.float(), "align": align.float(), "mask": mask.to(torch.uint8)}
    signature["heads"] = []
    if k > 0:
        hs, hn, ha = rank(HG, 1)
        hmask = select_top_k(hs, k)
        hsel = sorted(hmask.nonzero().tolist(), key=lambda u: (-float(hs[u[0], u[1]]), u[0], u[1]))
        group = pman_group(dfolder)
        signature["heads"] = [
            {"layer": l, "kv_head": g, "query_heads": list(range(g * group, (g + 1) * group)),
             "score": float(hs[l, g]), "norm": float(hn[l, g]), "align": float(ha[l, g])} for l, g in hsel]
        tensors.update({"head_score": hs.float(), "head_mask": hmask.to(torch.uint8)})
    schemas.write(schemas.Signature, folder / C.SIGNATURE, signature)
    save_tensors(folder / C.SCORES, tensors)
    man.extra = {"n_selected": len(sel), "n_heads": len(signature["heads"])}
    man.write(folder, outputs)
    if opts.tau != "auto":  # a selection left by an earlier --tau auto run no longer describes this signature
        (folder / C.TAU_SELECTION).unlink(missing_ok=True)
    log(f"score: signature of {len(sel)} / {L * I} channels (τ={tau}, {opts.scope}, {opts.score}) → {folder}")
    return folder


def resolve_defaults(run: Run, opts: ScoreOptions) -> ScoreOptions:
    """Fill τ and heads defaults from the threat model (train-pairs manifest) and whether the adapter's LoRA
    covers attention (diff manifest)."""
    from bdclean.io.artifacts import load_manifest

    dman = load_manifest(run.folder("diff")) or {}
    has_attention = bool(dman.get("extra", {}).get("attention_units"))
    return opts.resolved("full" if run.mode == "full" else "adapter", has_attention)


def pman_group(dfolder: Path) -> int:
    from bdclean.io.artifacts import load_manifest

    return int((load_manifest(dfolder) or {}).get("extra", {}).get("query_heads_per_unit", 1))
