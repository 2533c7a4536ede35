"""Data-aware weighting: which matrix Y to truncate instead of W, and how to map back.

- ``whiten`` (Linear): Y = W·G^½ with G = Σ x xᵀ. The top-r left singular vectors U_r of Y are
  the top eigenvectors of W G Wᵀ, and A = U_r, B = U_rᵀ·W minimizes the output error
  Σ‖(W − AB)x‖² over the calibration tokens (equal to SVD-LLM's Cholesky whitening, with no
  inverse, so a rank-deficient G is fine).
- ``whiten-output`` (Linear with fewer outputs than inputs: an FFN's down projection): the
  same factors as ``whiten`` from the Gram of the outputs, Σ (Wx)(Wx)ᵀ = W G Wᵀ, recorded instead of
  G: Y = R for a root R of it (R·Rᵀ = W G Wᵀ, so Y has W·G^½'s left singular vectors and
  values), A = U_r, B = U_rᵀ·W. out² instead of in² numbers to collect and keep (384² against
  1536² for MiniLM's, 576² against 1536² for SmolLM2's).
- ``kfac`` (Linear, two-sided): Y = G_g^½·W·G_x^½ with G_x = Σ x xᵀ and G_g = Σ g gᵀ the
  Gram of the gradients g = ∂loss/∂y of the layer's outputs (shrunk toward a multiple of I:
  :func:`shrink`). ‖G_g^½(W − AB)G_x^½‖_F² is the Kronecker-factored (KFAC) Fisher estimate
  of the loss a weight change causes; with U_r the top-r left singular vectors of Y, A =
  G_g^{-½}U_r, B = U_rᵀG_g^½W minimizes it. Only the output side is inverted (the shrinkage
  keeps it well conditioned); without a G_g (no gradient seen) it is ``whiten``.
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

METHODS = ("whiten", "kfac", "scale")


@dataclass(frozen=True)
class Weighting:
    kind: str  # "whiten" | "whiten-output" | "kfac" | "scale" | "rows"
    # whiten/kfac: a root L of G (L·Lᵀ = G, see psd_root) | whiten-output: a root R of W·G·Wᵀ
    # (out × out; it stands for W·L of this W only) | scale: s (in,) | rows: d (rows,)
    factor: torch.Tensor
    left: torch.Tensor | None = None  # kfac: Lᵀ for a root L of G_g (out × out)

    def one_sided(self) -> Weighting:
        """This weighting without its output side (kfac → whiten): for row blocks of W."""
        return Weighting("whiten", self.factor) if self.kind == "kfac" else self

    def rows(self, lo: int, hi: int) -> Weighting:
        """This weighting for rows lo:hi of W (a fused projection's part): an output root's
        rows R_i have R_i·R_iᵀ = W_i·G·W_iᵀ; the other kinds weight the columns."""
        return Weighting(self.kind, self.factor[lo:hi]) if self.kind == "whiten-output" else self


def psd_root(g: torch.Tensor, device: str | None = None) -> torch.Tensor:
    """A root L of a positive semi-definite G (L·Lᵀ = G): its Cholesky factor, or G^½ when G is
    singular. Whitening needs any root, not the symmetric one: ‖E·L‖²_F = tr(E·G·Eᵀ), and the
    left singular vectors of W·L, the factors' A, are the eigenvectors of W·G·Wᵀ whichever L.
    Cholesky costs a twelfth of the eigendecomposition G^½ needs (0.06 vs 0.73 s at 1536,
    float64, one thread). Computed on ``device``, returned where ``g`` lives."""
    root, info = torch.linalg.cholesky_ex(g.to(device) if device else g)
    if int(info) != 0:
        return psd_sqrt(g, device)
    return root.to(g.device)


def psd_sqrt(g: torch.Tensor, device: str | None = None) -> torch.Tensor:
    """Symmetric square root of a positive semi-definite matrix (negative noise clipped),
    computed on ``device`` (float64-capable: see :func:`lowrank.device.float64_device`) and
    returned where ``g`` lives."""
    vals, vecs = torch.linalg.eigh(g.to(device) if device else g)
    return ((vecs * vals.clamp(min=0).sqrt()) @ vecs.T).to(g.device)


def shrink(g: torch.Tensor, amount: float) -> torch.Tensor:
    """(1 − amount)·G + amount·(tr G / n)·I: positive definite unless G = 0, scale kept."""
    n = g.shape[0]
    out = g * (1 - amount)
    out.diagonal().add_(amount * float(g.diagonal().sum()) / n)
    return out


def make_weighting(name: str, stats, method: str = "whiten", alpha: float = 0.5,
                   smoothing: float = 0.1, cols: int | None = None,
                   root=psd_root, shrinkage: float = 0.05) -> Weighting | None:
    """The weighting for tensor ``name`` from :class:`~lowrank.stages.calibrate.ActivationStats`, or
    None when the calibration saw no data for it (plain SVD then). ``root`` computes a root of G
    (:meth:`~lowrank.stages.calibrate.ActivationStats.weighting` passes a memoized one)."""
    if name in stats.token_counts:
        counts = stats.token_counts[name]
        return Weighting("rows", (counts + smoothing).sqrt())
    output_gram = getattr(stats, "output_grams", {}).get(name)
    if output_gram is not None and method == "whiten":
        return Weighting("whiten-output", root(output_gram))
    if name in stats.grams and (cols is None or stats.grams[name].shape[0] == cols):
        if method in ("whiten", "kfac"):
            right = root(stats.grams[name])
            out_gram = getattr(stats, "out_grams", {}).get(name)
            if method == "whiten" or out_gram is None or not float(out_gram.diagonal().sum()) > 0:
                return Weighting("whiten", right)
            # ‖Lᵀ·E·R‖² = tr(Eᵀ·G_g·E·G) for L·Lᵀ = G_g: the left side takes the transpose
            return Weighting("kfac", right, root(shrink(out_gram, shrinkage)).T)
        if method == "scale":
            mean_abs = stats.abs_sums[name] / max(stats.tokens, 1)
            return Weighting("scale", mean_abs.clamp(min=1e-8) ** alpha)
        raise ValueError(f"unknown data-aware method {method!r} (choose from {METHODS})")
    return None


def weighted(w: torch.Tensor, wt: Weighting) -> torch.Tensor:
    f = wt.factor.to(w.device, w.dtype)
    if wt.kind == "whiten":
        return w @ f
    if wt.kind == "whiten-output":
        return f
    if wt.kind == "kfac":
        return wt.left.to(w.device, w.dtype) @ w @ f
    if wt.kind == "scale":
        return w * f
    return f[:, None] * w


def factors_from_svd(w, wt: Weighting, U, S, Vh):
    """A, B with A·B ≈ W from the truncated SVD (U, S, Vh) of ``weighted(w, wt)``."""
    root = S.sqrt()
    if wt.kind in ("whiten", "whiten-output"):
        return U.contiguous(), (U.T @ w).contiguous()
    if wt.kind == "kfac":  # A = G_g^{-½}U: a solve (G_g^½ is positive definite once shrunk)
        left = wt.left.to(w.device, w.dtype)
        return torch.linalg.solve(left, U).contiguous(), (U.T @ (left @ w)).contiguous()
    f = wt.factor.to(w.device, w.dtype)
    if wt.kind == "scale":
        return (U * root).contiguous(), ((root[:, None] * Vh) / f).contiguous()
    return ((U * root) / f[:, None]).contiguous(), (root[:, None] * Vh).contiguous()
