"""Direction-level suppression: remove from each LoRA module only the components of the suspicious update that lie
along the subspace the variants' backdoor deltas share, instead of zeroing whole channels.

For one module, variant i's backdoor delta is Δᵢ = Bᵢ Aᵢ (rank 2r, see core.channels.LowRank). Its output-side
projector weight is Mᵢ = Δᵢ Δᵢᵀ / ‖Δᵢ‖²_F (trace 1), and M = mean_i Mᵢ. An eigenvalue of M near 1 is a direction
every variant's delta writes to with all its energy; near 0, none does. The top eigenvectors U (those above
``min_share``, at most ``k``) are the shared output subspace, and the suspicious update S = s·B A is replaced by
(I − U Uᵀ) S, i.e. B ← (I − U Uᵀ) B: same rank, nothing outside U touched. The input side is the same with
ΔᵢᵀΔᵢ and A ← A (I − V Vᵀ). Everything is computed in the span of the stacked factors, never as dense [out, in].
"""

from __future__ import annotations

import torch

from bdclean.core.channels import LowRank


def _shared_basis(factors: list[torch.Tensor], grams: list[torch.Tensor], norms: list[float], k: int,
                  min_share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(orthonormal basis U [dim, m] of the shared subspace, its eigenvalues [m]) from Mᵢ = Fᵢ Gᵢ Fᵢᵀ / nᵢ."""
    live = [i for i, n in enumerate(norms) if n > 0]
    if not live:
        return torch.zeros(factors[0].shape[0], 0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.cat([factors[i] for i in live], dim=1))  # span of every variant's factor
    M = torch.zeros(Q.shape[1], Q.shape[1], dtype=torch.float64)
    for i in live:
        P = Q.T @ factors[i]
        M += P @ grams[i] @ P.T / norms[i]
    M /= len(live)
    evals, evecs = torch.linalg.eigh((M + M.T) / 2)
    order = torch.argsort(evals, descending=True)
    evals, evecs = evals[order], evecs[:, order]
    keep = int((evals >= min_share).nonzero().numel())
    keep = min(keep, k)
    return Q @ evecs[:, :keep], evals[:keep]


def shared_subspace(deltas: list[LowRank], side: str, k: int, min_share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The variants' shared output (``side='out'``) or input (``'in'``) subspace of one module."""
    if side == "out":
        factors = [d.B.double() for d in deltas]
        grams = [d.A.double() @ d.A.double().T for d in deltas]
    elif side == "in":
        factors = [d.A.double().T for d in deltas]
        grams = [d.B.double().T @ d.B.double() for d in deltas]
    else:
        raise ValueError(f"unknown side {side!r}")
    norms = [float(d.frobenius_sq()) for d in deltas]
    return _shared_basis(factors, grams, norms, k, min_share)


def project_out(a: torch.Tensor, b: torch.Tensor, U: torch.Tensor | None, V: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors (A [r, in], B [out, r]) with B ← (I − UUᵀ)B and A ← A(I − VVᵀ); dtypes kept."""
    a2, b2 = a.double(), b.double()
    if U is not None and U.shape[1]:
        b2 = b2 - U @ (U.T @ b2)
    if V is not None and V.shape[1]:
        a2 = a2 - (a2 @ V) @ V.T
    return a2.to(a.dtype), b2.to(b.dtype)


def project_dense(w: torch.Tensor, U: torch.Tensor | None, V: torch.Tensor | None) -> torch.Tensor:
    """A full weight [out, in] with W ← (I − UUᵀ) W (I − VVᵀ): its components along the output subspace U and the
    input subspace V removed, everything orthogonal to both unchanged; dtype kept, ``w`` itself returned when both
    subspaces are empty (bit-identical)."""
    if (U is None or not U.shape[1]) and (V is None or not V.shape[1]):
        return w
    w2 = w.double()
    if U is not None and U.shape[1]:
        w2 = w2 - U @ (U.T @ w2)
    if V is not None and V.shape[1]:
        w2 = w2 - (w2 @ V) @ V.T
    return w2.to(w.dtype)
