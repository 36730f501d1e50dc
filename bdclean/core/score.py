"""Channel scores and signature selection (paper Eq. 2).

    s_j = mean_i ‖Δ_{i,j}‖₂  +  λ · mean_{i<l} max(0, cos(Δ_{i,j}, Δ_{l,j}))

computed from per-channel Gram matrices G[j, i, l] = <Δ_{i,j}, Δ_{l,j}> (see ``channels.channel_gram``).
"""

from __future__ import annotations

import math

import torch

SCORE_KINDS = ("combined", "norm", "align", "projection")
NORM_SCALES = ("none", "median")
SCOPES = ("global", "per-layer")


def norm_and_align(G: torch.Tensor, eps: float = 1e-30) -> tuple[torch.Tensor, torch.Tensor]:
    """From Gram matrices [..., N, N]: mean norm over variants and mean positive pairwise cosine, each [...]."""
    n = G.shape[-1]
    if n < 2:
        raise ValueError("at least two variants are needed for the alignment term")
    diag = torch.diagonal(G, dim1=-2, dim2=-1).clamp_min(0).sqrt()  # [..., N]
    norm = diag.mean(dim=-1)
    denom = diag.unsqueeze(-1) * diag.unsqueeze(-2)
    cos = torch.where(denom > eps, G / denom.clamp_min(eps), torch.zeros_like(G))
    iu = torch.triu_indices(n, n, offset=1)
    pair_cos = cos[..., iu[0], iu[1]]  # [..., N(N-1)/2]
    align = pair_cos.clamp_min(0).mean(dim=-1)
    return norm, align


def projection(own: torch.Tensor, G: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    """How far the suspicious adapter's own update reaches along the variants' backdoor directions, per channel:

        p_j = mean_i max(0, <S_j, Δ_{i,j}>) / ‖Δ_{i,j}‖

    ``own`` [..., N] holds <S_j, Δ_{i,j}> (S = the suspicious adapter's update), ``G`` [..., N, N] the variants'
    Gram matrices. Unlike the paper's score, which ranks what the *variants* move, this ranks what the suspicious
    adapter itself changed in the direction the variants' backdoors agree on (not in the paper; RESULTS.md)."""
    if own.shape != G.shape[:-1]:
        raise ValueError(f"own {tuple(own.shape)} does not match Gram {tuple(G.shape)}")
    dn = torch.diagonal(G, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    reach = torch.where(dn > eps, own / dn.clamp_min(eps), torch.zeros_like(own))
    return reach.clamp_min(0).mean(dim=-1)


def combine(norm: torch.Tensor, align: torch.Tensor, lam: float, kind: str = "combined",
            norm_scale: str = "none") -> torch.Tensor:
    """Score per channel. ``norm_scale="median"`` divides the norm term by its median over all channels, so that
    λ weighs the alignment term the same way on every model (the paper's form is ``"none"``)."""
    if kind == "projection":
        raise ValueError("the projection score needs the suspicious adapter's update: use core.score.projection")
    if kind not in SCORE_KINDS:
        raise ValueError(f"unknown score kind {kind!r}")
    if norm_scale not in NORM_SCALES:
        raise ValueError(f"unknown norm scale {norm_scale!r}")
    if norm_scale == "median":
        med = norm.flatten().median()
        norm = norm / med if med > 0 else norm
    if kind == "norm":
        return norm.clone()
    if kind == "align":
        return align.clone()
    return norm + lam * align


def fraction_count(frac: float, total: int) -> int:
    """⌈frac·total⌉ without float noise: 0.07 × 100 is 7.000000000000001 in binary floating point, so 7, not 8."""
    return math.ceil(round(frac * total, 9))


def select_top(scores: torch.Tensor, tau: float, scope: str = "global") -> torch.Tensor:
    """Boolean mask [layers, channels] of the top ⌈τ·count⌉ channels, globally or per layer.

    Ties are broken by position (lower layer, lower channel first) so the choice is deterministic."""
    if not 0.0 < tau < 1.0:
        raise ValueError("tau must lie in (0, 1)")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")
    L, I = scores.shape
    mask = torch.zeros(L, I, dtype=torch.bool)
    if scope == "global":
        k = fraction_count(tau, L * I)
        order = torch.argsort(-scores.flatten(), stable=True)[:k]
        mask.view(-1)[order] = True
    else:
        k = fraction_count(tau, I)
        for layer in range(L):
            order = torch.argsort(-scores[layer], stable=True)[:k]
            mask[layer, order] = True
    return mask


def unit_count(heads: float | str, total: int) -> int:
    """``--heads``: ``"all"``, a count (≥ 1) or a fraction of ``total`` units (< 1; at least one unit when
    positive)."""
    if heads == "all":
        return total
    if heads <= 0:
        return 0
    return int(heads) if heads >= 1 else max(1, fraction_count(heads, total))


def select_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` highest scores over the whole tensor (ties broken by position)."""
    if not 0 <= k <= scores.numel():
        raise ValueError(f"k must lie in [0, {scores.numel()}]")
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[torch.argsort(-scores.flatten(), stable=True)[:k]] = True
    return mask.view(scores.shape)


def wanda_channel_scores(down: torch.Tensor, act_sq: torch.Tensor) -> torch.Tensor:
    """Structured Wanda (Sun et al., 2023, https://arxiv.org/abs/2306.11695) for MLP channels: the sum over the
    channel's down_proj column of the per-weight score |W_ij| · ‖X_j‖₂, where ``act_sq[j]`` is the sum of squares of
    down_proj's input j over the calibration tokens. ``down`` is [hidden, intermediate]; returns [intermediate]
    (small = dormant on those inputs)."""
    return down.abs().double().sum(0) * act_sq.double().clamp_min(0).sqrt()

