"""Suppressing signature channels in a LoRA adapter's tensors (pure; operates on a state dict)."""

from __future__ import annotations

import torch


def suppress_lora_channels(tensors: dict[str, torch.Tensor], mask: torch.Tensor,
                           modules: list[dict[str, str]]) -> tuple[dict[str, torch.Tensor], int]:
    """Zero the LoRA entries of every masked channel so the adapter's change to it is exactly zero.

    ``mask`` is [layers, channels]; ``modules[layer]`` maps "gate"/"up"/"down" to the adapter key prefix
    (e.g. ``base_model.model.model.layers.0.mlp.gate_proj``). gate/up: ``lora_B[j, :] = 0``; down:
    ``lora_A[:, j] = 0``. Returns the new tensors (inputs untouched) and the number of tensors changed.
    """
    out = {k: v.clone() for k, v in tensors.items()}
    changed = 0
    for layer, names in enumerate(modules):
        idx = mask[layer].nonzero().flatten()
        if idx.numel() == 0:
            continue
        for part in ("gate", "up"):
            key = names[part] + ".lora_B.weight"
            if key in out:
                out[key][idx, :] = 0
                changed += 1
        key = names["down"] + ".lora_A.weight"
        if key in out:
            out[key][:, idx] = 0
            changed += 1
    return out, changed
