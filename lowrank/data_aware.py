"""Data-aware weighting: which matrix Y to truncate instead of W, and how to map back.

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
    """The weighting for tensor ``name`` from :class:`~lowrank.calibrate.ActivationStats`, or
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
