"""The float64 Gram solvers (lowrank.linalg.gram_svdvals / gram_svd) against exact SVD.

Tolerances, and why. The Gram squares the condition number: its eigenvalues carry an absolute
error of about ε₆₄·σ₁², so σ_i comes out with absolute error ≈ ε₆₄·σ₁²/σ_i (and never worse
than √ε₆₄·σ₁ ≈ 1.5e-8·σ₁, the square root of the eigenvalue error). The values that matter —
those carrying energy, σ_i ≥ 1e-3·σ₁ — are therefore good to ~1e-10 relative, and energy
fractions to ~1e-13. The reference is exact SVD in float64 of the (fp32) matrix: an fp32 SVD
is itself off by ε₃₂·σ₁/σ_i relative, more than the Gram down to σ_i ≈ 1e-9·σ₁.
"""

import itertools
import math

import pytest
import torch

from lowrank.errors import InputError
from lowrank.linalg import factorize_matrix, gram_svd, gram_svdvals
from lowrank.stages.analyze import AnalyzeSettings, analyze_matrix
from lowrank.stages.factorize import FactorizeSettings, choose_method
from lowrank.weighting import make_weighting

from .conftest import low_rank_matrix
from .test_data_aware import correlated_inputs, stats_for

EPS = torch.finfo(torch.float64).eps


def ill_conditioned(m, n, decades=8, seed=0):
    """fp32 m × n matrix with singular values spread log-uniformly over ``decades`` decades."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return ((u * torch.logspace(0, -decades, k, dtype=torch.float64)) @ v.T).float()


def energy_curve(values: torch.Tensor) -> torch.Tensor:
    return values.pow(2).cumsum(0) / values.pow(2).sum()


MATRICES = {
    "gaussian": lambda: torch.randn(120, 300, generator=torch.Generator().manual_seed(1)),
    "low-rank+noise (tall)": lambda: low_rank_matrix(300, 200, rank=10, noise=1e-3),
    "ill-conditioned": lambda: ill_conditioned(200, 300),
}


@pytest.mark.parametrize("kind", MATRICES)
def test_gram_singular_values_match_exact_svd(kind):
    w = MATRICES[kind]()
    exact = torch.linalg.svdvals(w.double())
    gram = gram_svdvals(w)
    assert gram.dtype == torch.float64 and gram.shape == exact.shape
    err = (gram - exact).abs()
    s1 = float(exact[0])
    # Every value within the Gram's error bound and the √ε floor. The constant grows slowly with
    # the dimensions (sums of N products, Householder steps): measured up to 7 here, 32 allowed.
    assert (err <= 32 * EPS * s1**2 / exact).all()
    assert float(err.max()) <= 2 * math.sqrt(EPS) * s1
    # The values that matter: the top break-even-rank ones carrying energy, ~1e-10 relative.
    k = math.floor(w.shape[0] * w.shape[1] / sum(w.shape))
    top = exact[:k] >= 1e-3 * s1
    assert float((err[:k][top] / exact[:k][top]).max()) <= 1e-9
    # Energy curve: what plans and reports use.
    assert float((energy_curve(gram) - energy_curve(exact)).abs().max()) <= 1e-12


def test_analyze_gram_gives_the_exact_ranks_and_energies():
    w = ill_conditioned(200, 300, decades=3)
    gram = analyze_matrix("w", w, AnalyzeSettings(method="gram"))
    exact = analyze_matrix("w", w, AnalyzeSettings(method="exact"))
    assert gram.exact and exact.exact and len(gram.singular_values) == 200
    for e in (0.5, 0.9, 0.95, 0.99, 0.999):
        assert gram.rank_for_energy(e) == exact.rank_for_energy(e)
    torch.testing.assert_close(torch.tensor(gram.energy_curve()),
                               torch.tensor(exact.energy_curve()), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", MATRICES)
def test_gram_factors_reconstruct_as_well_as_exact_svd(kind):
    w = MATRICES[kind]()
    optimum = torch.linalg.svdvals(w.double()).pow(2)
    errors = []
    for rank in (2, 5, 10, 20, 50):
        A, B, energy, err = factorize_matrix(w, rank, "gram")
        _, _, energy_exact, err_exact = factorize_matrix(w, rank, "exact")
        assert A.shape == (w.shape[0], rank) and B.shape == (rank, w.shape[1])
        assert A.dtype == B.dtype == torch.float32
        best = math.sqrt(float(optimum[rank:].sum() / optimum.sum()))  # Eckart–Young
        # Within 1e-5 of the optimum, and no worse than fp32 exact SVD (which can be worse: its
        # rounding, ε₃₂·σ₁, shows in errors near the noise floor; float64 Gram's does not).
        assert err == pytest.approx(best, rel=1e-5)
        assert err <= err_exact * (1 + 1e-5)
        assert energy == pytest.approx(energy_exact, rel=1e-6)
        errors.append(err)
    assert all(a > b for a, b in itertools.pairwise(errors))  # error falls as rank grows


def test_whitened_gram_factors_and_spectrum_match_exact():
    x = correlated_inputs()
    w = torch.randn(48, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    wt = make_weighting("fc.weight", stats_for("fc.weight", x))
    assert wt.kind == "whiten"
    for rank in (4, 8, 16, 32):
        A, B, energy, err = factorize_matrix(w, rank, "gram", weighting=wt)
        Ae, Be, energy_e, err_e = factorize_matrix(w, rank, "exact", weighting=wt)
        assert err == pytest.approx(err_e, rel=1e-6) and energy == pytest.approx(energy_e, rel=1e-9)
        out, out_e = (torch.linalg.matrix_norm(x @ (w - a @ b).T) for a, b in ((A, B), (Ae, Be)))
        assert float(out) == pytest.approx(float(out_e), rel=1e-6)  # output error, what counts
    gram = analyze_matrix("fc.weight", w, AnalyzeSettings(method="gram"), wt)
    exact = analyze_matrix("fc.weight", w, AnalyzeSettings(method="exact"), wt)
    top = torch.tensor(exact.singular_values[:24])
    torch.testing.assert_close(torch.tensor(gram.singular_values[:24]), top, rtol=1e-9, atol=0)


def test_gram_is_deterministic_and_guards_zero_singular_values():
    w = low_rank_matrix(90, 70, rank=3)  # exactly rank 3: asking rank 10 meets σ = 0
    first, second = gram_svd(w, 10), gram_svd(w, 10)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert all(torch.isfinite(t).all() for t in first)
    A, B, energy, err = factorize_matrix(w, 10, "gram")
    assert torch.isfinite(A).all() and torch.isfinite(B).all() and err < 1e-6
    A, B, energy, err = factorize_matrix(torch.zeros(20, 30), 5, "gram")
    assert not A.any() and not B.any() and (energy, err) == (1.0, 0.0)
    U, _, Vh = gram_svd(torch.randn(60, 40, dtype=torch.float64), 40)  # tall: Wᵀ·W side
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(40, dtype=torch.float64))
    torch.testing.assert_close(U.T @ U, torch.eye(40, dtype=torch.float64))


def test_auto_picks_gram_up_to_the_cut_over_and_randomized_above():
    settings = FactorizeSettings(exact_max_dim=100)
    assert choose_method(100, 500, settings) == "gram"
    assert choose_method(101, 500, settings) == "randomized"
    assert choose_method(5000, 5000, FactorizeSettings(method="exact")) == "exact"
    w = low_rank_matrix(150, 120, rank=8, noise=1e-3)
    assert analyze_matrix("w", w, AnalyzeSettings(exact_max_dim=100)).exact is False
    auto = analyze_matrix("w", w, AnalyzeSettings())
    gram = analyze_matrix("w", w, AnalyzeSettings(method="gram"))
    assert auto.singular_values == gram.singular_values
    with pytest.raises(InputError, match="analyze method"):
        AnalyzeSettings(method="qr")
    with pytest.raises(InputError, match="factorize method"):
        FactorizeSettings(method="qr")
    for bad in ("abc", -1.0, 1.5, True):
        with pytest.raises(InputError, match="compensate_residual_share"):
            FactorizeSettings(compensate_residual_share=bad)
    for bad in (-0.1, "high"):
        with pytest.raises(InputError, match="compensate_damping"):
            FactorizeSettings(compensate_damping=bad)
    for bad in (0, -0.5, 1.5, "half", True):
        with pytest.raises(InputError, match="compensate_lines"):
            FactorizeSettings(compensate_lines=bad)


@pytest.mark.parametrize("rows,cols", [(200, 1536 // 8), (5, 7), (3, 1), (0, 9)])
def test_lower_gram_reads_as_the_full_gram(rows, cols):
    from lowrank.linalg import lower_gram, symmetric

    x = torch.randn(rows, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # only the lower block triangle is written and read: what lies above it does not matter
    scratch = torch.full((cols, cols), float("nan"), dtype=torch.float64)
    for out in (None, scratch):
        gram = symmetric(lower_gram(x, out))
        assert torch.allclose(gram, x.T @ x, rtol=1e-12, atol=1e-12)
        assert torch.equal(gram, gram.T)
