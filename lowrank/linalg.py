"""The numerical core shared by analysis, sensitivity probing and factorization: matrix views,
norms, seeded SVDs and rank-r factors, data-aware ones through :mod:`lowrank.weighting`.

Solvers (``SVD_METHODS``): ``exact`` is LAPACK's SVD of the matrix itself; ``gram`` is a
symmetric eigensolver on the smaller Gram matrix (W·Wᵀ or Wᵀ·W) in float64, GEMM-speed
(measured 7.7× faster than ``svdvals`` on a 2048×8192 fp32 matrix, reports/spectra-speed.md);
``randomized`` is a seeded range finder (:func:`randomized_svd`) for the top k only. The Gram
squares the condition number: σ_i comes out with absolute error ≈ ε₆₄·σ₁²/σ_i (at most
≈ √ε₆₄·σ₁), i.e. relative ε₆₄·(σ₁/σ_i)², below 1e-9 while σ_i ≥ 1e-3·σ₁. For fp32 weights that
is *more* accurate than an fp32 SVD (relative ε₃₂·σ₁/σ_i) down to σ_i ≈ 1e-9·σ₁; only values
carrying no energy lose digits.
"""

from __future__ import annotations

import itertools
import math
import zlib

import torch

from .weighting import Weighting, factors_from_svd, weighted

SVD_METHODS = ("auto", "gram", "exact", "randomized")
# Float64 blocks of the Gram and projection passes hold at most this many elements (32 MB): a
# float64 copy of a whole big matrix would double the memory the run needs.
BLOCK_ELEMENTS = 1 << 22


def matrix_view(tensor: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """(out, in, *kernel) -> out × (in·prod(kernel)), float32 or float64 for the maths; a
    ``transposed`` (in, out) weight (GPT-2's Conv1D, see :mod:`lowrank.naming`) -> its (out, in)
    view."""
    w = tensor.T if transposed else tensor.reshape(tensor.shape[0], -1)
    return w if w.dtype in (torch.float32, torch.float64) else w.float()


def squared_norm(w: torch.Tensor, rows_per_chunk: int = 256) -> float:
    """‖W‖_F² in float64, a block of rows at a time: a float64 copy of a big matrix would double
    the memory the whole run needs."""
    return sum(float(c.double().pow(2).sum()) for c in w.split(rows_per_chunk))


def layer_seed(seed: int, name: str) -> int:
    """A per-tensor seed, so results don't depend on the order (or process) tensors run in."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def randomized_svd(w: torch.Tensor, k: int, oversample: int, niter: int, seed: int):
    """Seeded top-k SVD by a randomized range finder with ``niter`` power iterations
    (Halko, Martinsson & Tropp 2011, Alg. 4.4; the algorithm of ``torch.svd_lowrank``); returns
    (U, S, Vh) truncated to k. The test matrix comes from a generator of its own:
    ``torch.svd_lowrank`` draws from the process-wide one, which threads running tasks at once
    would race on (same seed, different bytes)."""
    if w.shape[0] < w.shape[1]:  # work on the tall side: the last SVD is then q × min(m, n)
        V, S, Uh = randomized_svd(w.T, k, oversample, niter, seed)
        return Uh.T, S, V.T
    q = min(k + oversample, min(w.shape))
    generator = torch.Generator(device=w.device).manual_seed(seed)
    omega = torch.randn(w.shape[1], q, dtype=w.dtype, device=w.device, generator=generator)
    basis = torch.linalg.qr(w @ omega).Q
    for _ in range(niter):
        basis = torch.linalg.qr(w @ torch.linalg.qr(w.T @ basis).Q).Q
    Ub, S, Vh = torch.linalg.svd(basis.T @ w, full_matrices=False)
    return (basis @ Ub[:, :k]), S[:k], Vh[:k]


def choose_svd_method(method: str, rows: int, cols: int, full_max_dim: int) -> str:
    """The solver for a rows × cols matrix: an explicit ``method`` as given; ``auto`` is
    ``gram`` while min(rows, cols) <= ``full_max_dim`` (the float64 Gram and its eigensolver grow
    as the square and cube of that side), ``randomized`` above."""
    if method not in SVD_METHODS:
        raise ValueError(f"unknown SVD method {method!r} (choose from {', '.join(SVD_METHODS)})")
    if method != "auto":
        return method
    return "gram" if min(rows, cols) <= full_max_dim else "randomized"


def _blocks(x: torch.Tensor):
    """Float64 copies of consecutive column blocks of ``x`` (k × N), each at most BLOCK_ELEMENTS."""
    step = max(64, BLOCK_ELEMENTS // max(x.shape[0], 1))
    for j in range(0, x.shape[1], step):
        yield j, x[:, j:j + step].double()


def _short_side(w: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``w`` as k × N with k = min(m, n) (transposed when m > n), and whether it was."""
    return (w.T, True) if w.shape[0] > w.shape[1] else (w, False)


def gram_matrix(w: torch.Tensor) -> torch.Tensor:
    """The smaller Gram matrix of ``w`` (W·Wᵀ when m <= n, else Wᵀ·W) in float64, accumulated
    from float64 blocks in a fixed order (deterministic; no whole float64 copy of ``w``)."""
    x, _ = _short_side(w)
    g = torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64, device=x.device)
    for _, block in _blocks(x):
        g.addmm_(block, block.T)
    return g


GRAM_BLOCKS = 4  # column blocks of lower_gram: only those on and below the diagonal are multiplied


def lower_gram(rows: torch.Tensor, out: torch.Tensor | None = None,
               accumulate: bool = False) -> torch.Tensor:
    """Σ x xᵀ over the rows x of ``rows`` (k × n), in the lower block triangle of an n × n
    matrix (read it through :func:`symmetric`): the panels of 4 column blocks are 5/8 of a
    full product's work (n = 1536, k = 200, float32, 2 threads: 3.0 vs 5.2 ms). Written into
    ``out`` when given (added to it with ``accumulate``), whose blocks above the diagonal are
    left as they are (zero in a fresh one)."""
    n = rows.shape[1]
    if out is None:
        out = rows.new_zeros(n, n)
    edges = sorted({0, *(n * i // GRAM_BLOCKS for i in range(1, GRAM_BLOCKS)), n})
    for lo, hi in itertools.pairwise(edges):
        out[lo:, lo:hi].addmm_(rows[:, lo:].T, rows[:, lo:hi], beta=1 if accumulate else 0)
    return out


def symmetric(lower: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose lower triangle (diagonal included) is ``lower``'s."""
    below = torch.ones(lower.shape, dtype=torch.bool, device=lower.device).tril_()
    return torch.where(below, lower, lower.T)


def gram_svdvals(w: torch.Tensor, eigh=None) -> torch.Tensor:
    """All min(m, n) singular values of ``w``, descending, float64: square roots of the Gram's
    eigenvalues (rounding can make the smallest slightly negative: clipped to 0). ``eigh``: a
    memoized :func:`gram_eigh` (the eigenvectors then serve the factors later) instead of
    eigenvalues alone."""
    values = eigh(_short_side(w)[0])[0] if eigh else torch.linalg.eigvalsh(gram_matrix(w))
    return values.clamp(min=0).sqrt().flip(0)


def gram_eigh(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues ascending, eigenvectors) of ``x``'s float64 Gram X·Xᵀ (``x``: k × N, k the
    short side): the eigenvectors are everything :func:`gram_svd` needs for any rank."""
    return tuple(torch.linalg.eigh(gram_matrix(x)))


def gram_eigenvectors(x: torch.Tensor) -> torch.Tensor:
    return gram_eigh(x)[1]


def _reciprocal_or_zero(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1/s, and 0 where s is below ``dtype``'s smallest normal number: a direction with σ ≈ 0
    carries no energy, and its vector is ≈ 0 too."""
    return torch.where(s > torch.finfo(dtype).tiny, 1 / s, torch.zeros_like(s))


def gram_svd(w: torch.Tensor, rank: int, eigh=gram_eigenvectors):
    """Top-``rank`` (U, S, Vh) of ``w`` from the eigenvectors of its smaller float64 Gram, in
    ``w``'s dtype.

    With Q the top eigenvectors (k × r, k = the short side), P = Qᵀ·X is the other side's
    singular vectors scaled by S, so S is taken as P's row norms rather than √eigenvalue: then
    U·S·Vh = Q·Qᵀ·X exactly, the projection onto Q, however inaccurate the small values are
    (the reconstruction needs only Q's span), and the energy kept, ΣS² = ‖QᵀX‖², is consistent
    with the residual. Dividing P by S needs no care except S ≈ 0, where the row of P is ≈ 0
    too: it is zeroed (σ below the dtype's smallest normal number carries no energy).
    ``eigh``: computes the eigenvectors (a memoized :func:`gram_eigenvectors`, e.g.
    :meth:`~lowrank.stages.calibrate.ActivationStats.gram_eigenvectors`, shares one eigensolve
    between the scores stage and factorization).
    """
    x, transposed = _short_side(w)
    r = min(rank, x.shape[0])
    vecs = eigh(x)  # ascending eigenvalues
    q = vecs[:, vecs.shape[1] - r:].flip(1).contiguous()  # top r, descending
    del vecs
    p = torch.empty(r, x.shape[1], dtype=w.dtype, device=w.device)
    s2 = torch.zeros(r, dtype=torch.float64, device=w.device)
    for j, block in _blocks(x):
        pj = q.T @ block
        s2 += pj.pow(2).sum(1)
        p[:, j:j + pj.shape[1]] = pj
    s = s2.sqrt()
    # orthonormal rows: Vh (Uᵀ when transposed)
    p.mul_(_reciprocal_or_zero(s, w.dtype).to(w.dtype)[:, None])
    q, s = q.to(w.dtype), s.to(w.dtype)
    return (p.T, s, q.T) if transposed else (q, s, p)


def whitened_factors_from_eigh(w: torch.Tensor, wt: Weighting, vectors: torch.Tensor,
                               rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Whitened factors A = U_r, B = U_rᵀ·W (float64) from ``vectors``, the eigenvectors
    (ascending) of the short-side Gram of W·L, without forming W·L: when m <= n they are U;
    else U = W·(L·V_r)/σ, σ its column norms (a column with σ ≈ 0 carries no energy: zeroed).
    The factors :func:`factors_from_svd` gives, up to rounding."""
    work = w.double()
    k = vectors.shape[1]
    top = vectors[:, k - min(rank, k):].flip(1).to(work)
    if w.shape[0] <= w.shape[1] or wt.kind == "whiten-output":
        U = top
    else:
        U = work @ (wt.factor.to(work) @ top)
        U = U * _reciprocal_or_zero(U.norm(dim=0), w.dtype)
    return U.contiguous(), (U.T @ work).contiguous()


def row_weighted_factors_from_eigh(w: torch.Tensor, values: torch.Tensor, vectors: torch.Tensor,
                                   rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-weighted factors (an embedding's ``rows`` weighting, Y = diag(d)·W, rows >= columns)
    from the eigenpairs (ascending) of YᵀY, without forming Y: A = W·V_r·Λ_r^(-1/4), B =
    Λ_r^(1/4)·V_rᵀ (float64). :func:`factors_from_svd`'s up to rounding: it takes Λ^(1/2) as
    the column norms of Y·V_r, which scales A against B alike; A·B is W projected on V_r."""
    work = w.double()
    k = vectors.shape[1]
    r = min(rank, k)
    top = vectors[:, k - r:].flip(1).to(work)
    root = values[k - r:].flip(0).to(work).clamp(min=0).pow(0.25)
    return ((work @ top) * _reciprocal_or_zero(root, w.dtype)).contiguous(), \
        (root[:, None] * top.T).contiguous()


def truncated_svd(w: torch.Tensor, rank: int, method: str, seed: int = 0, oversample: int = 10,
                  niter: int = 4, eigh=None):
    """Top-``rank`` (U, S, Vh) of ``w`` by ``exact``, ``gram`` (``eigh``: see :func:`gram_svd`)
    or ``randomized``."""
    if method == "exact":
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        return U[:, :rank], S[:rank], Vh[:rank]
    if method == "gram":
        return gram_svd(w, rank, eigh or gram_eigenvectors)
    if method == "randomized":
        return randomized_svd(w, rank, oversample, niter, seed)
    raise ValueError(f"unknown factorization method {method!r} (exact, gram, randomized)")


def weighted_factors(w: torch.Tensor, rank: int, method: str = "exact", seed: int = 0,
                     oversample: int = 10, niter: int = 4, weighting: Weighting | None = None,
                     eigh=None):
    """The factors of :func:`factorize_matrix` without its error pass: ``(A, B, S, target,
    work)``, A and B in ``work``'s dtype (float64 when weighted), S the singular values of
    ``target`` (the weighted matrix), ``work`` the float matrix the factors approximate."""
    work = w if w.dtype in (torch.float32, torch.float64) else w.float()
    if weighting is not None:  # the weighted products need double precision (G spans decades)
        work = work.double()
    target = weighted(work, weighting) if weighting is not None else work
    U, S, Vh = truncated_svd(target, rank, method, seed, oversample, niter, eigh)
    if weighting is not None:
        A, B = factors_from_svd(work, weighting, U, S, Vh)
    else:
        root = S.sqrt()
        A, B = (U * root).contiguous(), (root[:, None] * Vh).contiguous()
    return A, B, S, target, work


def factorize_matrix(w: torch.Tensor, rank: int, method: str = "exact", seed: int = 0,
                     oversample: int = 10, niter: int = 4, weighting: Weighting | None = None,
                     eigh=None):
    """Rank-``rank`` factors of a 2-D ``w``: A = U_r√S_r, B = √S_r·Vh_r (Eckart–Young), or the
    data-aware factors above when a ``weighting`` is given; ``eigh``: see :func:`gram_svd`.

    Returns:
        ``(A, B, energy_kept, rel_error)``: A is (m, r), B is (r, n), in ``w``'s float dtype;
        energy is that of the truncated matrix (output energy on calibration data when
        weighted); rel_error is ‖W − A·B‖_F / ‖W‖_F.
    """
    A, B, S, target, work = weighted_factors(w, rank, method, seed, oversample, niter,
                                             weighting, eigh)
    kept = float(S.double().pow(2).sum())
    del S  # free the SVD outputs before the error pass (peak memory)
    out_dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
    A, B = A.to(out_dtype), B.to(out_dtype)
    total, w_sq = squared_norm(target), squared_norm(work)
    if total == 0 or w_sq == 0:
        return A, B, 1.0, 0.0
    return A, B, min(kept / total, 1.0), math.sqrt(residual_norm2(work, A, B) / w_sq)


def factorize_split(w: torch.Tensor, sizes: list[int], rank: int, method: str = "exact",
                    seed: int = 0, oversample: int = 10, niter: int = 4,
                    weighting: Weighting | None = None, eigh=None):
    """:func:`factorize_matrix` of each block of rows of ``w`` (``sizes``: a fused projection's
    q, k, v or gate, up) at ``rank`` each: A (m × r) stacks the blocks' A_i, B (k·r × n)
    their B_i, and row block i of W is A_i·B_i (a block-diagonal A, stored without its zeros).
    Energy and error are those of the whole matrix. A kfac weighting is used one-sided here
    (its output Gram spans all the blocks' rows), an output one by rows (:meth:`Weighting.rows`)."""
    weighting = weighting.one_sided() if weighting is not None else None
    edges = list(itertools.accumulate(sizes, initial=0))
    parts_weighting = [weighting.rows(lo, hi) if weighting is not None else None
                       for lo, hi in itertools.pairwise(edges)]
    blocks = w.split(sizes)
    parts = [factorize_matrix(block, rank, method, seed + i, oversample, niter, wt, eigh)
             for i, (block, wt) in enumerate(zip(blocks, parts_weighting))]
    A, B = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    work = [b.double() if weighting is not None else b for b in blocks]
    target = [squared_norm(weighted(b, wt) if wt is not None else b)
              for b, wt in zip(work, parts_weighting)]
    plain = [squared_norm(b) for b in blocks]
    energy = sum(p[2] * t for p, t in zip(parts, target)) / max(sum(target), 1e-300)
    error = math.sqrt(sum(p[3] ** 2 * n for p, n in zip(parts, plain)) / max(sum(plain), 1e-300))
    return A, B, energy, error


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
