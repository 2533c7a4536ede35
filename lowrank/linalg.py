"""The numerical core shared by analysis, sensitivity probing and factorization: matrix views,
norms, seeded SVDs, rank-r factors, and data-aware weighting.

Data-aware weighting: which matrix Y to truncate instead of W, and how to map back.

- ``whiten`` (Linear): Y = W·G^½ with G = Σ x xᵀ. The top-r left singular vectors U_r of Y are
  the top eigenvectors of W G Wᵀ, and A = U_r, B = U_rᵀ·W minimizes the output error
  Σ‖(W − AB)x‖² over the calibration tokens (equal to SVD-LLM's Cholesky whitening, with no
  inverse, so a rank-deficient G is fine).
- ``scale`` (Linear, ASVD-style): Y = W·diag(s), s = mean|x|^α per input channel; A = U√Σ,
  B = √Σ·Vh·diag(1/s).
- ``rows`` (Embedding): Y = diag(d)·W, d = √(token count + smoothing), so frequent rows are
  approximated best and unseen rows still count; A = diag(1/d)·U√Σ, B = √Σ·Vh.

Spectra of Y measure *output* energy on calibration data: ``--energy 0.95`` then means "keep
95% of this layer's output energy".
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

METHODS = ("whiten", "scale")


@dataclass(frozen=True)
class Weighting:
    kind: str  # "whiten" | "scale" | "rows"
    factor: torch.Tensor  # G^½ (in × in) | s (in,) | d (rows,), float64


def psd_sqrt(g: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a positive semi-definite matrix (negative noise clipped)."""
    vals, vecs = torch.linalg.eigh(g)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def make_weighting(name: str, stats, method: str = "whiten", alpha: float = 0.5,
                   smoothing: float = 1.0, cols: int | None = None) -> Weighting | None:
    """The weighting for tensor ``name`` from :class:`~lowrank.stages.calibrate.ActivationStats`, or
    None when the calibration saw no data for it (plain SVD then)."""
    if name in stats.token_counts:
        counts = stats.token_counts[name]
        return Weighting("rows", (counts + smoothing).sqrt())
    if name in stats.grams and (cols is None or stats.grams[name].shape[0] == cols):
        if method == "whiten":
            return Weighting("whiten", psd_sqrt(stats.grams[name]))
        if method == "scale":
            mean_abs = stats.abs_sums[name] / max(stats.tokens, 1)
            return Weighting("scale", mean_abs.clamp(min=1e-8) ** alpha)
        raise ValueError(f"unknown data-aware method {method!r} (choose from {METHODS})")
    return None


def weighted(w: torch.Tensor, wt: Weighting) -> torch.Tensor:
    f = wt.factor.to(w.dtype)
    if wt.kind == "whiten":
        return w @ f
    if wt.kind == "scale":
        return w * f
    return f[:, None] * w


def factors_from_svd(w, wt: Weighting, U, S, Vh):
    """A, B with A·B ≈ W from the truncated SVD (U, S, Vh) of ``weighted(w, wt)``."""
    root = S.sqrt()
    if wt.kind == "whiten":
        return U.contiguous(), (U.T @ w).contiguous()
    f = wt.factor.to(w.dtype)
    if wt.kind == "scale":
        return (U * root).contiguous(), ((root[:, None] * Vh) / f).contiguous()
    return ((U * root) / f[:, None]).contiguous(), (root[:, None] * Vh).contiguous()


def matrix_view(tensor: torch.Tensor) -> torch.Tensor:
    """(out, in, *kernel) -> out × (in·prod(kernel)), float32 or float64 for the maths."""
    w = tensor.reshape(tensor.shape[0], -1)
    return w if w.dtype in (torch.float32, torch.float64) else w.float()


def squared_norm(w: torch.Tensor, rows_per_chunk: int = 256) -> float:
    """‖W‖_F² in float64, a block of rows at a time: a float64 copy of a big matrix would double
    the memory the whole run needs."""
    return sum(float(c.double().pow(2).sum()) for c in w.split(rows_per_chunk))


def layer_seed(seed: int, name: str) -> int:
    """A per-tensor seed, so results don't depend on the order (or process) tensors run in."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def randomized_svd(w: torch.Tensor, k: int, oversample: int, niter: int, seed: int):
    """Seeded top-k SVD via ``torch.svd_lowrank``; returns (U, S, Vh) truncated to k."""
    q = min(k + oversample, min(w.shape))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(w, q=q, niter=niter)
    return U[:, :k], S[:k], V[:, :k].T


def factorize_matrix(w: torch.Tensor, rank: int, method: str = "exact", seed: int = 0,
                     oversample: int = 10, niter: int = 4, weighting: Weighting | None = None):
    """Rank-``rank`` factors of a 2-D ``w``: A = U_r√S_r, B = √S_r·Vh_r (Eckart–Young), or the
    data-aware factors above when a ``weighting`` is given.

    Returns:
        ``(A, B, energy_kept, rel_error)``: A is (m, r), B is (r, n), in ``w``'s float dtype;
        energy is that of the truncated matrix (output energy on calibration data when
        weighted); rel_error is ‖W − A·B‖_F / ‖W‖_F.
    """
    work = w if w.dtype in (torch.float32, torch.float64) else w.float()
    if weighting is not None:  # the weighted products need double precision (G spans decades)
        work = work.double()
    target = weighted(work, weighting) if weighting is not None else work
    if method == "exact":
        U, S, Vh = torch.linalg.svd(target, full_matrices=False)
        U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    elif method == "randomized":
        U, S, Vh = randomized_svd(target, rank, oversample, niter, seed)
    else:
        raise ValueError(f"unknown factorization method {method!r} (exact, randomized, auto)")
    if weighting is not None:
        A, B = factors_from_svd(work, weighting, U, S, Vh)
    else:
        root = S.sqrt()
        A, B = (U * root).contiguous(), (root[:, None] * Vh).contiguous()
    kept = float(S.double().pow(2).sum())
    del U, S, Vh  # the full SVD outputs: free them before the error pass (peak memory)
    out_dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
    A, B = A.to(out_dtype), B.to(out_dtype)
    total, w_sq = squared_norm(target), squared_norm(work)
    if total == 0 or w_sq == 0:
        return A, B, 1.0, 0.0
    return A, B, min(kept / total, 1.0), math.sqrt(residual_norm2(work, A, B) / w_sq)


def residual_norm2(w: torch.Tensor, A: torch.Tensor, B: torch.Tensor, block: int = 1024) -> float:
    """‖W − A·B‖_F² in float64, one block of W at a time: float64 copies of whole matrices would
    need several times the memory of W itself."""
    total = 0.0
    for j in range(0, w.shape[1], block):
        B64 = B[:, j:j + block].double()
        for i in range(0, w.shape[0], block):
            diff = w[i:i + block, j:j + block].double() - A[i:i + block].double() @ B64
            total += float(diff.pow(2).sum())
    return total
