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


def reinit_channels(weight: torch.Tensor, idx: torch.Tensor, part: str, std: float,
                    generator: torch.Generator) -> torch.Tensor:
    """Full-model suppression: re-draw channel rows (gate/up: ``weight[j, :]``) or columns (down: ``weight[:, j]``)
    from normal(0, std), the Llama-family initialiser. Returns a new tensor; other entries are untouched."""
    out = weight.clone()
    if idx.numel() == 0:
        return out
    if part in ("gate", "up"):
        fresh = torch.randn(idx.numel(), weight.shape[1], generator=generator, dtype=torch.float32) * std
        out[idx, :] = fresh.to(weight.dtype)
    elif part == "down":
        fresh = torch.randn(weight.shape[0], idx.numel(), generator=generator, dtype=torch.float32) * std
        out[:, idx] = fresh.to(weight.dtype)
    else:
        raise ValueError(f"unknown MLP part {part!r}")
    return out


def zero_channels(weight: torch.Tensor, idx: torch.Tensor, part: str) -> torch.Tensor:
    """Pruning of a dense MLP weight: channel rows (gate/up: ``weight[j, :]``) or columns (down: ``weight[:, j]``)
    set to zero. Returns a new tensor; other entries are untouched."""
    out = weight.clone()
    if part in ("gate", "up"):
        out[idx, :] = 0
    elif part == "down":
        out[:, idx] = 0
    else:
        raise ValueError(f"unknown MLP part {part!r}")
    return out


def suppress_lora_heads(tensors: dict[str, torch.Tensor], units: list[tuple[int, int]], modules: list[dict[str, str]],
                        n_q: int, n_kv: int, head_dim: int) -> tuple[dict[str, torch.Tensor], int]:
    """Zero the LoRA entries of attention units (layer, kv group): lora_B rows of q/k/v, lora_A columns of o."""
    from bdclean.core.channels import head_slices

    out = dict(tensors)
    changed = 0
    for layer, g in units:
        sl = head_slices(g, n_q, n_kv, head_dim)
        for part in ("q", "k", "v", "o"):
            key = modules[layer][part] + (".lora_A.weight" if part == "o" else ".lora_B.weight")
            if key not in out:
                continue
            t = out[key].clone()
            if part == "o":
                t[:, sl[part]] = 0
            else:
                t[sl[part], :] = 0
            out[key] = t
            changed += 1
    return out, changed


def reinit_heads(weight: torch.Tensor, sl: slice, part: str, std: float, generator: torch.Generator) -> torch.Tensor:
    """Full-model: re-draw rows ``sl`` (q/k/v) or columns ``sl`` (o) from normal(0, std)."""
    out = weight.clone()
    if part == "o":
        out[:, sl] = (torch.randn(weight.shape[0], sl.stop - sl.start, generator=generator) * std).to(weight.dtype)
    else:
        out[sl, :] = (torch.randn(sl.stop - sl.start, weight.shape[1], generator=generator) * std).to(weight.dtype)
    return out
