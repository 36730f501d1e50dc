"""A checkpoint's own update as a LoRA: truncated SVD of θ_sus − θ_base per projection.

For a fine-tune of a known base, ΔW = W_sus − W_base of each attention/MLP projection is split as
ΔW ≈ U_r diag(S_r) V_rᵀ = B @ A with B = U_r diag(√S_r) [out, r] and A = diag(√S_r) V_rᵀ [r, in] (LoRA scale 1:
lora_alpha = r). By Eckart–Young this is the best rank-r approximation in Frobenius norm; the share of ‖ΔW‖²_F it
keeps is reported so a user sees what the adapter view leaves out.
"""

from __future__ import annotations

import torch


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A [r, in], B [out, r], kept share of ‖Δ‖²_F) with r = min(rank, out, in); a zero Δ gives zero factors and
    share 1.0. Computed in float64 and returned in float32."""
    if delta.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(delta.shape)}")
    if rank < 1:
        raise ValueError("rank must be ≥ 1")
    d = delta.double()
    r = min(rank, *d.shape)
    total = float((d * d).sum())
    if total == 0.0:
        return torch.zeros(r, d.shape[1]), torch.zeros(d.shape[0], r), 1.0
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    root = S[:r].sqrt()
    B = U[:, :r] * root
    A = root[:, None] * Vh[:r]
    kept = float((S[:r] ** 2).sum()) / total
    return A.float(), B.float(), min(kept, 1.0)


def relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    """‖new − old‖ / ‖old‖ (‖new − old‖ when old is zero)."""
    diff = float((new.double() - old.double()).norm())
    ref = float(old.double().norm())
    return diff / ref if ref > 0 else diff
