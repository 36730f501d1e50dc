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
    from bdclean.lab.attacks import RULES, is_success
    from bdclean.core.masks import suppress_lora_channels, suppress_lora_heads
    from bdclean.core.score import combine, norm_and_align, projection, select_top, select_top_k, unit_count
    from bdclean.io.data import load_instructions
    from bdclean.io.models import load_adapter, load_model, load_tokenizer, read_model_config, resolve_base
    from bdclean.io.peft_io import attach, load_state
    from bdclean.pipeline import diff as diff_stage
    from bdclean.pipeline.diff import load_grams, load_own
    from bdclean.pipeline.suppress import kept_update
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

    grams: list = []  # (G, HG, own) from RUN_DIR/diff, read on the first ablation only

    def ablation(spec: str) -> tuple[dict, torch.Tensor, list]:
        """``sig:KIND:TAU:HEADS`` (KIND combined|norm|align|projection) or ``proj:TAU:HEADS`` (= sig:projection:…)
        → (masked tensors, channel mask, units), scores recomputed from the Gram files."""
        parts = spec.split(":")
        kind, tau, heads = ("projection", *parts[1:]) if parts[0] == "proj" else parts[1:]
        if not grams:
            diff_stage.run(args.run)  # a no-op when up to date; adds the projection terms to older runs
            grams.extend((*load_grams(args.run / "diff"), load_own(args.run / "diff")))
        G, HG, own = grams
        if kind == "projection" and own is None:
            raise SystemExit(f"{args.run}/diff has no projection terms (full-model run, or the adapter moved)")

        def rank(g: torch.Tensor, part: int) -> torch.Tensor:
            return projection(own[part], g) if kind == "projection" else combine(*norm_and_align(g), 0.01, kind,
                                                                                    "none")

        m = select_top(rank(G, 0), float(tau), "global")
        us: list = []
        if HG is not None:
            k = unit_count(heads if heads == "all" else float(heads), HG.shape[0] * HG.shape[1])
            us = [tuple(u) for u in select_top_k(rank(HG, 1), k).nonzero().tolist()]
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
        if name.startswith(("sig:", "proj:")):
            tensors, m_, u_ = ablation(name)
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
               "kept_update_share": kept_update(info, tensors, {k for names in mlp for k in names.values()}),
               "seconds": round(time.time() - t0, 1)}
        print(json.dumps(res), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
