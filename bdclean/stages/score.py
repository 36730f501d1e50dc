"""score: s_j = mean‖Δ_{i,j}‖ + λ·mean positive cosine; the signature is the top τ of channels."""

from __future__ import annotations

from pathlib import Path

from bdclean import constants as C
from bdclean.config import ScoreOptions
from bdclean.console import log
from bdclean.io.artifacts import Manifest, save_tensors, stage_fingerprint, write_json
from bdclean.stages.common import up_to_date


def run(out: Path, opts: ScoreOptions, force: bool = False) -> Path:
    from bdclean.core.score import combine, norm_and_align, select_top
    from bdclean.stages.diff import load_grams

    out = Path(out)
    dfolder = out / C.STAGE_DIRS["diff"]
    folder = out / C.STAGE_DIRS["score"]
    man = Manifest("score", opts.model_dump(by_alias=True), {"diff": stage_fingerprint(dfolder, "diff")})
    if up_to_date(folder, man.fingerprint, "score", force):
        return folder
    G = load_grams(dfolder)
    norm, align = norm_and_align(G)
    scores = combine(norm, align, opts.lam, opts.score, opts.norm_scale)
    mask = select_top(scores, opts.tau, opts.scope)
    L, I = scores.shape
    sel = mask.nonzero().tolist()
    sel.sort(key=lambda li: (-float(scores[li[0], li[1]]), li[0], li[1]))
    signature = {
        "tau": opts.tau,  # fraction of MLP channels suppressed
        "lambda": opts.lam,  # weight of the alignment term
        "n_variants": int(G.shape[-1]),
        "scope": opts.scope,  # "global" (top τ of all channels) or "per-layer"
        "score": opts.score,  # combined | norm | align
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
    write_json(folder / C.SIGNATURE, signature)
    save_tensors(folder / C.SCORES, {"score": scores.float(), "norm": norm.float(), "align": align.float(),
                                     "mask": mask.to(dtype=__import__("torch").uint8)})
    man.extra = {"n_selected": len(sel)}
    man.write(folder, [C.SIGNATURE, C.SCORES])
    log(f"score: signature of {len(sel)} / {L * I} channels (τ={opts.tau}, {opts.scope}, {opts.score}) → {folder}")
    return folder
