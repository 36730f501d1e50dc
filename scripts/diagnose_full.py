"""Full-model counterpart of `bdclean ablate`: what does suppressing a channel set do to a full checkpoint (no restore)?

    .venv/bin/python scripts/diagnose_full.py RUN_DIR [--n 50] [--masks combined:global:0.05:zero,...]

RUN_DIR is a full-model purify run (suspicious/ with attack.json and test sets, diff/, pairs/). Each mask is
``KIND:SCOPE:TAU:HOW``: KIND combined|norm|align (scores recomputed from RUN_DIR/diff), ``wrel`` (variant delta norm
divided by the channel's own weight norm), ``plast`` (variant delta norm divided by the clean twins' own mean
channel change, i.e. how much more the poison moved a channel than clean training moves it), ``medrel`` (norm
divided by its layer's median, so no layer dominates, plus λ·align) or ``random`` (seeded control); SCOPE
global|per-layer; HOW ``zero``, ``reinit`` (normal(0, initializer_range), the suppress stage's function and seeds)
or ``proj`` (remove from each selected channel only the component along the variants' mean delta direction).
``none:global:0:zero`` is the unmodified model. For each mask: perplexity of the clean references and triggered
ASR (greedy, 8 new tokens) on the first N test prompts, printed and appended to RUN_DIR/diagnose_full.jsonl. Uses
attack.json (ground truth): experiments only.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_MASKS = "none:global:0:zero,combined:global:0.05:zero,combined:global:0.05:reinit,random:global:0.05:zero"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--masks", default=DEFAULT_MASKS)
    args = ap.parse_args()

    import torch
    from safetensors import safe_open

    from bdclean.lab.attacks import RULES, is_success
    from bdclean.core.masks import reinit_channels
    from bdclean.core.score import combine, norm_and_align, select_top
    from bdclean.io.data import load_instructions
    from bdclean.io.models import load_model, load_tokenizer, read_model_config
    from bdclean.pipeline.diff import load_grams
    from bdclean.pipeline.pairs import FULL_VARIANT_LORA
    from bdclean.pipeline.suppress import REINIT_SEED
    from bdclean.train.chat import encode
    from bdclean.train.generate import generate
    from bdclean.train.loop import mean_nll

    sus = args.run / "suspicious"
    record = json.loads((sus / "attack.json").read_text())
    std = float(read_model_config(sus).get("initializer_range", 0.02))
    model, tok = load_model(sus), load_tokenizer(sus)
    trig = load_instructions(sus / "test_triggered.jsonl")[: args.n]
    refs = [encode(tok, r, 256) for r in load_instructions(sus / "test_clean.jsonl")[: args.n] if r["output"].strip()]
    rule = RULES[record["task"]]
    norm, align = norm_and_align(load_grams(args.run / "diff")[0])
    mlps = [layer.mlp for layer in model.model.layers]
    orig = [(m.gate_proj.weight.data.clone(), m.up_proj.weight.data.clone(), m.down_proj.weight.data.clone())
            for m in mlps]
    n_var = json.loads((args.run / "variants" / "variants.json").read_text())["n_variants"]

    def channel_matrix(i: int) -> torch.Tensor:
        """[channels, 3·hidden]: gate row, up row, down column of the suspicious weights in layer i."""
        g, u, d = orig[i]
        return torch.cat([g, u, d.T], dim=1)

    def lora_channels(path: Path, i: int) -> torch.Tensor:
        """[channels, 3·hidden] ΔW of one LoRA twin in layer i (gate row, up row, down column; scaling left out)."""
        pre = f"base_model.model.model.layers.{i}.mlp."
        with safe_open(str(path), "pt") as f:
            part = {p: f.get_tensor(pre + f"{p}_proj.lora_B.weight") @ f.get_tensor(pre + f"{p}_proj.lora_A.weight")
                    for p in ("gate", "up", "down")}
        return torch.cat([part["gate"], part["up"], part["down"].T], dim=1)

    def twin(v: int, name: str) -> Path:
        return args.run / "pairs" / f"variant_{v:02d}_{name}.safetensors"

    @functools.lru_cache(maxsize=None)  # several proj masks reuse it: read each layer's twins once
    def mean_direction(i: int) -> torch.Tensor:
        """Unit mean of the variants' normalised channel deltas Δ = bd − clean in layer i (from the LoRA twins)."""
        acc = 0
        for v in range(n_var):
            vec = lora_channels(twin(v, "bd"), i) - lora_channels(twin(v, "clean"), i)
            acc = acc + vec / vec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return acc / acc.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @functools.lru_cache(maxsize=None)  # masks at several τ share one kind's scores
    def scores(kind: str) -> torch.Tensor:
        if kind == "random":
            return torch.rand(norm.shape, generator=torch.Generator().manual_seed(1)).double()
        if kind == "plast":  # the full-model variants start from B = 0, so a clean twin's ΔW is its own B·A
            moved = torch.stack([sum(lora_channels(twin(v, "clean"), i).norm(dim=1) for v in range(n_var)) / n_var
                                 for i in range(len(mlps))]).double()
            scale = FULL_VARIANT_LORA["lora_alpha"] / FULL_VARIANT_LORA["r"]  # lora_channels leaves the scaling out
            return norm / (scale * moved).clamp_min(1e-12)
        if kind == "medrel":
            return norm / norm.median(dim=1, keepdim=True).values * norm.median() + 0.01 * align
        if kind == "wrel":
            return norm / torch.stack([channel_matrix(i).norm(dim=1) for i in range(len(mlps))]).double()
        return combine(norm, align, 0.01, kind, "none")

    def apply(mask: torch.Tensor | None, how: str) -> None:
        H = orig[0][0].shape[1]
        for i, m in enumerate(mlps):
            m.gate_proj.weight.data.copy_(orig[i][0])
            m.up_proj.weight.data.copy_(orig[i][1])
            m.down_proj.weight.data.copy_(orig[i][2])
            idx = mask[i].nonzero().flatten() if mask is not None else torch.zeros(0, dtype=torch.long)
            if idx.numel() == 0:
                continue
            if how == "reinit":
                for k, (part, w) in enumerate((("gate", m.gate_proj.weight), ("up", m.up_proj.weight),
                                               ("down", m.down_proj.weight))):
                    g = torch.Generator().manual_seed(REINIT_SEED * 1_000_003 + i * 3 + k)
                    w.data.copy_(reinit_channels(w.data, idx, part, std, g))
                continue
            W = channel_matrix(i)[idx]
            if how == "zero":
                W = torch.zeros_like(W)
            elif how == "proj":
                u = mean_direction(i)[idx]
                W = W - (W * u).sum(1, keepdim=True) * u
            else:
                raise SystemExit(f"unknown HOW {how!r}")
            m.gate_proj.weight.data[idx] = W[:, :H]
            m.up_proj.weight.data[idx] = W[:, H: 2 * H]
            m.down_proj.weight.data[:, idx] = W[:, 2 * H:].T

    for spec in args.masks.split(","):
        kind, scope, tau, how = spec.split(":")
        t0 = time.time()
        mask = None if kind == "none" else select_top(scores(kind), float(tau), scope)
        apply(mask, how)
        nll, _ = mean_nll(model, refs, tok.pad_token_id)
        outs = generate(model, tok, trig, 8, 16)
        res = {"mask": spec, "perplexity": round(math.exp(nll), 3),
               "triggered_asr": sum(is_success(o, rule) for o in outs) / len(outs), "n": len(outs),
               "last_layer_fraction": None if mask is None else round(mask[-1].float().mean().item(), 3),
               "seconds": round(time.time() - t0, 1)}
        print(json.dumps(res), flush=True)
        with open(args.run / "diagnose_full.jsonl", "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
