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

    from bdclean.core.arch import mlp_module_names, peft_key
    from bdclean.core.channels import LowRank, channel_gram
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
    save_tensors(folder / C.GRAM_FILE, grams, metadata={"n_variants": str(n), "layers": str(L)})
    man.extra = {"n_variants": n, "layers": L, "channels": int(grams["layer.0"].shape[0])}
    man.write(folder, [C.GRAM_FILE])
    log(f"diff: channel Gram matrices for {L} layers × {grams['layer.0'].shape[0]} channels × N={n} → {folder}")
    return folder


def load_grams(folder: Path) -> torch.Tensor:
    """[layers, channels, N, N]"""
    from safetensors.torch import load_file

    g = load_file(str(Path(folder) / C.GRAM_FILE))
    return torch.stack([g[f"layer.{i}"] for i in range(len(g))])
