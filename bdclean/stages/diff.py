"""diff: Δᵢ = θᵢᵇᵈ − θᵢᶜˡᵉᵃⁿ per MLP channel, stored as per-layer Gram matrices [channels, N, N] (float64).

The Gram matrices are sufficient statistics for every score variant (norm, alignment, combined, normalised), so
`score` reruns in seconds without touching weights."""

from __future__ import annotations

from pathlib import Path

import torch

from bdclean import constants as C
from bdclean.console import log
from bdclean.io.artifacts import Manifest, load_manifest, read_json, save_tensors, stage_fingerprint
from bdclean.stages.common import up_to_date


def run(out: Path, force: bool = False) -> Path:
    from safetensors.torch import load_file

    from bdclean.core.arch import attn_module_names, head_geometry, mlp_module_names, peft_key
    from bdclean.core.channels import LowRank, channel_gram, head_gram
    from bdclean.io.models import AdapterInfo, read_model_config

    out = Path(out)
    pfolder = out / C.STAGE_DIRS["train-pairs"]
    folder = out / C.STAGE_DIRS["diff"]
    man = Manifest("diff", {}, {"pairs": stage_fingerprint(pfolder, "train-pairs")})
    if up_to_date(folder, man.fingerprint, "diff", force):
        return folder
    pman = load_manifest(pfolder)
    n = pman["extra"]["n_variants"]
    base_cfg = read_model_config(Path(pman["config"]["base"]))
    acfg = read_json(pfolder / "suspicious_adapter_config.json")
    info = AdapterInfo(pfolder, acfg, {})
    L = int(base_cfg["num_hidden_layers"])
    modules = mlp_module_names(base_cfg["model_type"], L)
    twins = [(load_file(str(pfolder / C.PAIR_WEIGHTS.format(i=i, twin="bd"))),
              load_file(str(pfolder / C.PAIR_WEIGHTS.format(i=i, twin="clean")))) for i in range(n)]
    attn = attn_module_names(base_cfg["model_type"], L)
    n_q, n_kv, hd = head_geometry(base_cfg)
    has_attn = any(peft_key(attn[0][p]) + ".lora_A.weight" in twins[0][0] for p in ("q", "k", "v", "o"))
    grams = {}
    for layer, names in enumerate(modules):
        parts = {}
        for part in ("gate", "up", "down"):
            key = peft_key(names[part])
            ka, kb = key + ".lora_A.weight", key + ".lora_B.weight"
            if ka not in twins[0][0]:
                parts[part] = [None] * n
                continue
            rank = twins[0][0][ka].shape[0]
            s = info.scaling(key, rank)
            parts[part] = [LowRank.lora_difference(bd[ka], bd[kb], cl[ka], cl[kb], s) for bd, cl in twins]
        grams[f"layer.{layer}"] = channel_gram(parts["gate"], parts["up"], parts["down"])
        if has_attn:
            ap = {}
            for part, name in attn[layer].items():
                key = peft_key(name)
                ka, kb = key + ".lora_A.weight", key + ".lora_B.weight"
                if ka not in twins[0][0]:
                    ap[part] = [None] * n
                    continue
                s_ = info.scaling(key, twins[0][0][ka].shape[0])
                ap[part] = [LowRank.lora_difference(bd[ka], bd[kb], cl[ka], cl[kb], s_) for bd, cl in twins]
            grams[f"heads.{layer}"] = head_gram(ap["q"], ap["k"], ap["v"], ap["o"], n_q, n_kv, hd)
    save_tensors(folder / C.GRAM_FILE, grams, metadata={"n_variants": str(n), "layers": str(L)})
    man.extra = {"n_variants": n, "layers": L, "channels": int(grams["layer.0"].shape[0]),
                 "attention_units": n_kv if has_attn else 0, "query_heads_per_unit": n_q // n_kv}
    man.write(folder, [C.GRAM_FILE])
    log(f"diff: channel Gram matrices for {L} layers × {grams['layer.0'].shape[0]} channels × N={n} → {folder}")
    return folder


def load_grams(folder: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """MLP channel Grams [layers, channels, N, N] and attention-unit Grams [layers, kv heads, N, N] (or None)."""
    from safetensors.torch import load_file

    g = load_file(str(Path(folder) / C.GRAM_FILE))
    L = sum(1 for k in g if k.startswith("layer."))
    mlp = torch.stack([g[f"layer.{i}"] for i in range(L)])
    heads = torch.stack([g[f"heads.{i}"] for i in range(L)]) if "heads.0" in g else None
    return mlp, heads
