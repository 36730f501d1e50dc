"""Round-to-nearest INT4 weight quantization (pure tensor functions, no I/O).

Each row of a weight matrix [out, in] is cut into groups of ``group_size`` consecutive input columns (the last
group of a row may be shorter when ``in`` is not a multiple of the group size). Per group, an asymmetric 4-bit
grid spans the group's min and max:

    scale = (max − min) / 15,   zero = round(−min / scale) ∈ [0, 15],   q = clamp(round(w / scale) + zero, 0, 15)
    ŵ = (q − zero) · scale

so every group of ŵ takes at most 16 distinct values. A constant group (max = min) is kept as it is.
"""

from __future__ import annotations

import torch

LEVELS = 16  # 4 bits


def _groups(w: torch.Tensor, group_size: int) -> list[tuple[int, int]]:
    """(start, stop) column ranges of the groups along the input dimension."""
    n_in = w.shape[1]
    return [(s, min(s + group_size, n_in)) for s in range(0, n_in, group_size)]


def _quantize_block(x: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize x [rows, groups, size] with one asymmetric 4-bit grid per (row, group)."""
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    scale = (hi - lo) / (LEVELS - 1)
    flat = scale == 0
    safe = torch.where(flat, torch.ones_like(scale), scale)
    zero = torch.round(-lo / safe).clamp(0, LEVELS - 1)
    q = torch.clamp(torch.round(x / safe) + zero, 0, LEVELS - 1)
    deq = (q - zero) * safe
    return torch.where(flat, x, deq)


def quantize_rtn_int4(w: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """4-bit round-to-nearest, group-wise along the input dim, dequantized back to ``w``'s dtype.

    ``w`` is [out, in] (a Linear weight). Computed in float64, so the result is deterministic and the grid exact.
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if group_size < 1:
        raise ValueError("group_size must be at least 1")
    x = w.detach().double()
    out = torch.empty_like(x)
    n_full = (x.shape[1] // group_size) * group_size
    if n_full:
        block = x[:, :n_full].reshape(x.shape[0], -1, group_size)
        out[:, :n_full] = _quantize_block(block).reshape(x.shape[0], n_full)
    if n_full < x.shape[1]:
        rest = x[:, n_full:].unsqueeze(1)
        out[:, n_full:] = _quantize_block(rest).squeeze(1)
    return out.to(w.dtype)


def max_distinct_per_group(w: torch.Tensor, group_size: int = 128) -> int:
    """The largest number of distinct values in any (row, group) of ``w`` (≤ 16 after ``quantize_rtn_int4``)."""
    best = 0
    for s, e in _groups(w, group_size):
        block = w[:, s:e]
        srt, _ = torch.sort(block, dim=1)
        distinct = 1 + (srt[:, 1:] != srt[:, :-1]).sum(dim=1)
        best = max(best, int(distinct.max()))
    return best


def quantize_decoder(model, group_size: int = 128) -> dict:
    """Quantize-dequantize, in place, every Linear of a causal LM's decoder layers and its lm_head unless tied to
    the input embeddings (INT4 round-to-nearest, ``quantize_rtn_int4``); returns what was done, for the manifest."""
    targets = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    if head is not None and not tied:
        targets.append(head)
    n_weights, n_changed, distinct = 0, 0, 0
    with torch.no_grad():
        for mod in targets:
            w = mod.weight
            q = quantize_rtn_int4(w, group_size)
            n_weights += w.numel()
            n_changed += int((q != w).sum())
            distinct = max(distinct, max_distinct_per_group(q, group_size))
            w.copy_(q)
    if distinct > LEVELS:
        from bdclean.errors import BdcleanError

        raise BdcleanError(f"internal error: {distinct} distinct values in a 4-bit group")
    return {"scheme": "int4 round-to-nearest, asymmetric min/max per group, dequantized to float32",
            "group_size": group_size, "modules_quantized": len(targets), "lm_head_quantized": not tied,
            "weights_quantized": n_weights, "fraction_changed": n_changed / n_weights if n_weights else 0.0,
            "max_distinct_per_group": distinct}

