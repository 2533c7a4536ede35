import math

import torch

from lowrank.io.checkpoint import open_checkpoint
from lowrank.stages.analyze import AnalyzeSettings, Spectra, analyze, analyze_matrix

from .conftest import low_rank_matrix


def test_exact_spectrum_energy_and_ranks():
    w = torch.diag(torch.tensor([4.0, 2.0, 1.0, 1.0]))  # energies 16, 4, 1, 1 of 22
    s = analyze_matrix("w", w, AnalyzeSettings())
    assert s.exact and s.rows == s.cols == 4
    assert math.isclose(s.total_energy, 22.0)
    assert math.isclose(s.energy_at(1), 16 / 22, rel_tol=1e-6)
    assert s.rank_for_energy(0.90) == 2  # 20/22 = 0.909
    assert s.rank_for_energy(0.95) == 3  # 21/22 = 0.955
    assert math.isclose(s.stable_rank, 22 / 16, rel_tol=1e-6)
    assert s.break_even == 2.0 and s.params_saved(1) == 16 - 8


def test_randomized_top_k_matches_exact_on_low_rank_matrix():
    w = low_rank_matrix(300, 200, rank=10, noise=1e-3)
    exact = analyze_matrix("w", w, AnalyzeSettings(method="exact"))
    partial = analyze_matrix("w", w, AnalyzeSettings(exact_max_dim=100))
    assert exact.exact and not partial.exact
    assert len(partial.singular_values) == math.floor(300 * 200 / 500)  # the break-even rank
    torch.testing.assert_close(torch.tensor(partial.singular_values[:10]),
                               torch.tensor(exact.singular_values[:10]), rtol=1e-4, atol=1e-4)
    assert partial.rank_for_energy(0.99) == exact.rank_for_energy(0.99) == 10
    assert math.isclose(partial.total_energy, exact.total_energy, rel_tol=1e-9)


def test_conv_kernels_are_viewed_as_out_by_in_times_kernel():
    s = analyze_matrix("conv.weight", torch.randn(16, 8, 3, 3), AnalyzeSettings())
    assert (s.rows, s.cols) == (16, 72) and s.shape == (16, 8, 3, 3)


def test_non_finite_matrix_is_flagged_not_crashing():
    w = torch.randn(10, 10)
    w[3, 3] = float("nan")
    s = analyze_matrix("w", w, AnalyzeSettings())
    assert not s.finite and s.summary()["rank_at_energy"]["0.90"] is None


def test_analyze_checkpoint_skips_1d_and_integer_tensors_and_round_trips(toy_checkpoint):
    spectra = analyze(open_checkpoint(toy_checkpoint))
    assert set(spectra.matrices) == {"emb.weight", "conv.weight", "fc1.weight", "fc2.weight"}
    again = Spectra.from_json(spectra.to_json())
    assert again.to_json() == spectra.to_json()
