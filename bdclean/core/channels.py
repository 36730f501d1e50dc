"""MLP channel deltas and their per-channel Gram matrices.

MLP channel j of a block is row j of gate_proj and up_proj and column j of down_proj. Its delta vector is the
concatenation of those three slices of ΔW. We never need ΔW itself: for variants i and l, the per-channel inner
products <Δ_{i,j}, Δ_{l,j}> follow from low-rank factors Δ = B @ A (B: [out, k], A: [k, in]) as

    rows (gate/up):  <row_j(B_i A_i), row_j(B_l A_l)> = B_i[j] (A_i A_lᵀ) B_l[j]ᵀ
    columns (down):  <col_j(B_i A_i), col_j(B_l A_l)> = A_i[:, j]ᵀ (B_iᵀ B_l) A_l[:, j]

so a layer costs O(N² · channels · k²) instead of materialising N dense [out, in] matrices. For a LoRA pair,
θ_bd − θ_clean = s·(B_bd A_bd − B_cl A_cl) = [s·B_bd, −s·B_cl] @ [A_bd; A_cl], a factorisation of rank 2r.
Dense deltas (full-model threat model) use the same code with B = Δ and A = I implicitly (see ``Dense``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRank:
    """Δ = B @ A with B [out, k] and A [k, in]."""

    B: torch.Tensor
    A: torch.Tensor

    @staticmethod
    def lora_difference(a_bd, b_bd, a_cl, b_cl, scale: float) -> "LowRank":
        """θ_bd − θ_clean for one LoRA module, as a rank-2r factorisation (float64 for exactness)."""
        B = torch.cat([b_bd.double() * scale, -b_cl.double() * scale], dim=1)
        A = torch.cat([a_bd.double(), a_cl.double()], dim=0)
        return LowRank(B, A)

    def dense(self) -> torch.Tensor:
        return self.B @ self.A

    def frobenius_sq(self) -> float:
        """‖B A‖²_F = tr((A Aᵀ)(Bᵀ B)), without forming the dense matrix (float64)."""
        A, B = self.A.double(), self.B.double()
        return float(((A @ A.T) * (B.T @ B)).sum())


@dataclass
class Dense:
    """An explicit delta matrix [out, in]."""

    W: torch.Tensor


Delta = LowRank | Dense


def row_dots(x: Delta, y: Delta) -> torch.Tensor:
    """<row_j(x), row_j(y)> for every row j."""
    if isinstance(x, LowRank) and isinstance(y, LowRank):
        return ((x.B @ (x.A @ y.A.T)) * y.B).sum(dim=1)
    xd = x.dense() if isinstance(x, LowRank) else x.W
    yd = y.dense() if isinstance(y, LowRank) else y.W
    return (xd.double() * yd.double()).sum(dim=1)


def col_dots(x: Delta, y: Delta) -> torch.Tensor:
    """<col_j(x), col_j(y)> for every column j."""
    if isinstance(x, LowRank) and isinstance(y, LowRank):
        return (((x.B.T @ y.B) @ y.A) * x.A).sum(dim=0)
    xd = x.dense() if isinstance(x, LowRank) else x.W
    yd = y.dense() if isinstance(y, LowRank) else y.W
    return (xd.double() * yd.double()).sum(dim=0)


def _out_dim(d: Delta) -> int:
    return d.B.shape[0] if isinstance(d, LowRank) else d.W.shape[0]


def _in_dim(d: Delta) -> int:
    return d.A.shape[1] if isinstance(d, LowRank) else d.W.shape[1]


def _channels(gate, up, down) -> int:
    for d in (*gate, *up):
        if d is not None:
            return _out_dim(d)
    for d in down:
        if d is not None:
            return _in_dim(d)
    raise ValueError("no MLP deltas given")


def channel_gram(gate: list[Delta | None], up: list[Delta | None], down: list[Delta | None]) -> torch.Tensor:
    """Per-channel Gram matrices of one layer's channel deltas across N variants.

    ``gate[i]``, ``up[i]``, ``down[i]`` are variant i's deltas of the three MLP projections (None where the adapter
    does not train that projection: it contributes zero). Returns G with shape [channels, N, N] (float64),
    G[j, i, l] = <Δ_{i,j}, Δ_{l,j}> over the concatenated (gate row j, up row j, down column j) vector.
    """
    n = len(gate)
    if not (len(up) == len(down) == n):
        raise ValueError("gate, up and down must list the same number of variants")
    size = _channels(gate, up, down)
    G = torch.zeros(size, n, n, dtype=torch.float64)
    for i in range(n):
        for l in range(i, n):
            acc = torch.zeros(size, dtype=torch.float64)
            for mods, fn in ((gate, row_dots), (up, row_dots), (down, col_dots)):
                if mods[i] is not None and mods[l] is not None:
                    acc += fn(mods[i], mods[l])
            G[:, i, l] = acc
            G[:, l, i] = acc
    return G


def channel_vectors(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Explicit channel vectors [channels, 2·hidden + hidden] from dense ΔW of gate, up [I, H] and down [H, I]."""
    return torch.cat([gate, up, down.T], dim=1)


def _block_sum(v: torch.Tensor, size: int) -> torch.Tensor:
    return v.reshape(-1, size).sum(dim=1)


def head_gram(q: list[Delta | None], k: list[Delta | None], v: list[Delta | None], o: list[Delta | None],
              n_q: int, n_kv: int, head_dim: int) -> torch.Tensor:
    """Per-unit Gram matrices [n_kv, N, N] for attention units under grouped-query attention.

    Unit g (one per kv head) is: the q_proj rows of its n_q/n_kv query heads, the k_proj and v_proj rows of kv head
    g, and the o_proj columns of those query heads — everything that only that kv group reads or writes. Without
    GQA (n_q == n_kv) a unit is one ordinary head.
    """
    n = len(q)
    group = n_q // n_kv
    G = torch.zeros(n_kv, n, n, dtype=torch.float64)
    for i in range(n):
        for l in range(i, n):
            acc = torch.zeros(n_kv, dtype=torch.float64)
            for mods, fn, size in ((q, row_dots, group * head_dim), (k, row_dots, head_dim),
                                   (v, row_dots, head_dim), (o, col_dots, group * head_dim)):
                if mods[i] is not None and mods[l] is not None:
                    acc += _block_sum(fn(mods[i], mods[l]), size)
            G[:, i, l] = acc
            G[:, l, i] = acc
    return G


def head_slices(g: int, n_q: int, n_kv: int, head_dim: int) -> dict[str, slice]:
    """Row ranges (q, k, v) and column range (o) of attention unit g."""
    group = n_q // n_kv
    qs = slice(g * group * head_dim, (g + 1) * group * head_dim)
    kv = slice(g * head_dim, (g + 1) * head_dim)
    return {"q": qs, "k": kv, "v": kv, "o": qs}
