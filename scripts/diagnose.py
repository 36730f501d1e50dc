"""Where does a planted backdoor live? Quick ASR of masked copies of a suspicious adapter (no restore).

    .venv/bin/python scripts/diagnose.py RUN_DIR [--n 50]

RUN_DIR is a demo/purify run folder with suspicious/ (an implant, with its test sets) and score/scores.safetensors.
For each mask — the signature, all MLP LoRA, all attention LoRA, an "oracle" top-τ by the suspicious adapter's own
channel norms, signature + attention, or an ablation ``sig:KIND:TAU:HEADS`` (score KIND combined|norm|align
recomputed from RUN_DIR/diff at ratio TAU plus a HEADS fraction of attention units), or a layer band
``zero:PART:A-B`` (every PART = all|mlp|attn LoRA of layers A..B-1), or ``proj:TAU:HEADS`` (experimental: channels and
units ranked by how far the suspicious adapter's own update reaches along the variants' backdoor directions) — it
zeroes the LoRA entries in memory and measures triggered and clean ASR on the first N test prompts (greedy,
--tokens new tokens, default 8: enough for the BackdoorLLM targets), and the share of the adapter's update ‖ΔW‖²
each mask keeps. Prints one JSON line per mask and appends them to RUN_DIR/diagnose.jsonl. Uses attack.json (ground
truth) and is for experiments only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--tokens", type=int, default=8, help="new tokens per answer")
    ap.add_argument("--masks", default="none,signature,mlp,attn,oracle,signature+attn")
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file

    from bdclean.core.arch import attn_module_names, head_geometry, mlp_module_names, peft_key
    from bdclean.core.attacks import RULES, is_success
    from bdclean.core.masks import suppress_lora_channels, suppress_lora_heads
    from bdclean.core.score import combine, norm_and_align, select_top, select_top_k, unit_count
    from bdclean.io.data import load_instructions
    from bdclean.io.models import load_adapter, load_model, load_tokenizer, read_model_config, resolve_base
    from bdclean.io.peft_io import attach, load_state
    from bdclean.stages.diff import load_grams
    from bdclean.stages.suppress import kept_update
    from bdclean.train.generate import generate

    sus_dir = args.run / "suspicious"
    record = json.loads((sus_dir / "attack.json").read_text())
    info = load_adapter(sus_dir)
    base = resolve_base("smollm2")
    cfg = read_model_config(base)
    L = cfg["num_hidden_layers"]
    tok = load_tokenizer(base)
    model = attach(load_model(base), info)
    trig = load_instructions(sus_dir / "test_triggered.jsonl")[: args.n]
    clean = load_instructions(sus_dir / "test_clean.jsonl")[: args.n]
    rule = RULES[record["task"]]
    mlp = [{k: peft_key(v) for k, v in d.items()} for d in mlp_module_names(cfg["model_type"], L)]
    attn = [{k: peft_key(v) for k, v in d.items()} for d in attn_module_names(cfg["model_type"], L)]
    scores = load_file(str(args.run / "score" / "scores.safetensors"))
    sig = scores["mask"].bool()
    units = [tuple(u) for u in scores["head_mask"].bool().nonzero().tolist()] if "head_mask" in scores else []
    T = info.tensors

    def own_norms() -> torch.Tensor:
        """Per-channel norm of the suspicious adapter's own ΔW (gate row, up row, down column)."""
        rows = []
        for names in mlp:
            n = 0
            for part in ("gate", "up"):
                d = T[names[part] + ".lora_B.weight"].double() @ T[names[part] + ".lora_A.weight"].double()
                n = n + (d ** 2).sum(1)
            d = T[names["down"] + ".lora_B.weight"].double() @ T[names["down"] + ".lora_A.weight"].double()
            rows.append((n + (d ** 2).sum(0)).sqrt())
        return torch.stack(rows)

    def top_mask(s: torch.Tensor, k: int) -> torch.Tensor:
        m = torch.zeros(s.numel(), dtype=torch.bool)
        m[s.flatten().topk(k).indices] = True
        return m.view_as(s)

    grams: list = []  # (G, HG) from RUN_DIR/diff, read on the first ablation only

    def ablation(spec: str) -> tuple[dict, torch.Tensor, list]:
        """``sig:KIND:TAU:HEADS`` → (masked tensors, channel mask, units), scores recomputed from the Gram files."""
        _, kind, tau, heads = spec.split(":")
        if not grams:
            grams.extend(load_grams(args.run / "diff"))
        G, HG = grams
        m = select_top(combine(*norm_and_align(G), 0.01, kind, "none"), float(tau), "global")
        us: list = []
        if HG is not None:
            k = unit_count(heads if heads == "all" else float(heads), HG.shape[0] * HG.shape[1])
            hmask = select_top_k(combine(*norm_and_align(HG), 0.01, kind, "none"), k)
            us = [tuple(u) for u in hmask.nonzero().tolist()]
        t = suppress_lora_heads(suppress_lora_channels(T, m, mlp)[0], us, attn, *head_geometry(cfg))[0]
        return t, m, us

    def cross_grams() -> tuple[torch.Tensor, torch.Tensor]:
        """Grams [layers, units, N+1, N+1] of the N variants' deltas plus the suspicious adapter's own update (last)."""
        from bdclean.core.channels import LowRank, channel_gram, head_gram

        from bdclean import constants as C

        pf = args.run / C.STAGE_DIRS["train-pairs"]
        n = json.loads((pf / C.MANIFEST).read_text())["extra"]["n_variants"]
        twins = [tuple(load_file(str(pf / C.PAIR_WEIGHTS.format(i=i, twin=w))) for w in ("bd", "clean"))
                 for i in range(n)]

        def deltas(key: str) -> list:
            ka, kb = key + ".lora_A.weight", key + ".lora_B.weight"
            if ka not in twins[0][0]:
                return [None] * (n + 1)
            s = info.scaling(key, T[ka].shape[0])
            own = LowRank(T[kb].double() * s, T[ka].double())
            return [LowRank.lora_difference(bd[ka], bd[kb], cl[ka], cl[kb], s) for bd, cl in twins] + [own]

        G = torch.stack([channel_gram(*(deltas(names[p]) for p in ("gate", "up", "down"))) for names in mlp])
        HG = torch.stack([head_gram(*(deltas(names[p]) for p in ("q", "k", "v", "o")), *head_geometry(cfg))
                          for names in attn])
        return G, HG

    def projection_score(G: torch.Tensor) -> torch.Tensor:
        """mean over variants of max(0, <S_j, Δ_ij>) / ‖Δ_ij‖: the suspicious update's reach along the variants'
        backdoor directions (S = the adapter's own update, last index)."""
        own_dot = G[..., -1, :-1]  # <S_j, Δ_ij>
        dn = torch.diagonal(G, dim1=-2, dim2=-1)[..., :-1].clamp_min(1e-30).sqrt()
        return (own_dot / dn).clamp_min(0).mean(-1)

    xgrams: list = []

    def projection(spec: str) -> tuple[dict, torch.Tensor, list]:
        """``proj:TAU:HEADS`` → channels and units ranked by ``projection_score`` (experimental)."""
        _, tau, heads = spec.split(":")
        if not xgrams:
            xgrams.extend(cross_grams())
        G, HG = xgrams
        m = select_top(projection_score(G), float(tau), "global")
        hs = projection_score(HG)
        k = unit_count(heads if heads == "all" else float(heads), hs.numel())
        us = [tuple(u) for u in select_top_k(hs, k).nonzero().tolist()]
        t = suppress_lora_heads(suppress_lora_channels(T, m, mlp)[0], us, attn, *head_geometry(cfg))[0]
        return t, m, us

    def zero_b(t: dict, modules: list[dict]) -> dict:
        """``t`` with lora_B of every module in ``modules`` (name dicts, one per layer) zeroed."""
        t = dict(t)
        for key in (n + ".lora_B.weight" for names in modules for n in names.values()):
            if key in t:
                t[key] = torch.zeros_like(t[key])
        return t

    def zero_attn(t: dict) -> dict:
        return zero_b(t, attn)

    def zero_layers(spec: str) -> dict:
        """``zero:PART:A-B``: every LoRA of PART (all|mlp|attn) in layers A..B-1 zeroed (lora_B := 0)."""
        _, part, span = spec.split(":")
        lo, hi = (int(x) for x in span.split("-"))
        groups = {"mlp": [mlp], "attn": [attn], "all": [mlp, attn]}[part]
        return zero_b(T, [g[layer] for g in groups for layer in range(lo, hi)])

    oracle = top_mask(own_norms(), int(sig.sum()))  # what bdclean cannot know: the suspicious adapter's own norms
    masks = {
        "none": lambda: T,
        "signature": lambda: suppress_lora_heads(suppress_lora_channels(T, sig, mlp)[0], units, attn,
                                                 *head_geometry(cfg))[0],
        "mlp": lambda: suppress_lora_channels(T, torch.ones_like(sig), mlp)[0],
        "attn": lambda: zero_attn(T),
        "oracle": lambda: suppress_lora_channels(T, oracle, mlp)[0],
        "random": lambda: suppress_lora_channels(
            T, (torch.rand(sig.shape, generator=torch.Generator().manual_seed(0)) < sig.float().mean()), mlp)[0],
        "signature+attn": lambda: zero_attn(suppress_lora_channels(T, sig, mlp)[0]),
    }
    out = args.run / "diagnose.jsonl"
    for name in args.masks.split(","):
        t0 = time.time()
        m_, u_ = sig, units
        if name.startswith("sig:"):
            tensors, m_, u_ = ablation(name)
        elif name.startswith("proj:"):
            tensors, m_, u_ = projection(name)
        elif name.startswith("zero:"):
            tensors = zero_layers(name)
        else:
            tensors = masks[name]()
        load_state(model, tensors)
        overlap = (oracle & sig).sum().item() / sig.sum().item() if name == "oracle" else None
        to = generate(model, tok, trig, max_new_tokens=args.tokens)
        co = generate(model, tok, clean, max_new_tokens=args.tokens)
        res = {"mask": name, "run": str(args.run),
               "triggered_asr": sum(is_success(o, rule) for o in to) / len(to),
               "clean_asr": sum(is_success(o, rule) for o in co) / len(co), "n": args.n,
               "signature_overlap": overlap, "tau": round(float(m_.float().mean()), 4), "heads": len(u_),
               "kept_update_share": kept_update(info, T, tensors, {k for names in mlp for k in names.values()}),
               "seconds": round(time.time() - t0, 1)}
        print(json.dumps(res), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
