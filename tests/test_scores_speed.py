"""Scores-stage speed (issue 13): float32 probing chooses what float64 exact-SVD probing chose,
and the Gram eigenvectors the scores stage computes are the ones factorization reuses."""

import dataclasses
from collections import OrderedDict

import pytest
import torch

from lowrank.io.checkpoint import open_checkpoint
from lowrank.linalg import factorize_matrix, matrix_view
from lowrank.stages import calibrate as calibrate_mod
from lowrank.stages import probe as probe_mod
from lowrank.stages import scores as scores_mod
from lowrank.stages.analyze import AnalyzeSettings, analyze, analyze_matrix
from lowrank.stages.calibrate import CalibrateSettings, calibrate
from lowrank.stages.factorize import FactorizeSettings, factorize
from lowrank.stages.plan import PlanSettings, make_plan
from lowrank.stages.probe import measure_pending
from lowrank.stages.scores import ScoreSettings, score_candidates

PLAIN = FactorizeSettings(compensate=False)  # compensated layers solve their own targets

SETTINGS = ScoreSettings(samples=16, batch_size=8, max_length=32)


@pytest.fixture(scope="module")
def probed(tiny_llama_dir):
    ckpt = open_checkpoint(tiny_llama_dir)
    stats = calibrate(ckpt, CalibrateSettings(samples=32))
    return ckpt, stats, analyze(ckpt, stats=stats)


def _float64_exact(ckpt, name, stats):  # the stage before issue 13: LAPACK SVD, float64 hooks
    w = matrix_view(ckpt.get(name))
    A, B, _, _ = factorize_matrix(w, min(w.shape), "exact", weighting=stats.weighting(name,
                                                                                    w.shape[1]))
    return A.double(), B.double()


def test_float32_scores_choose_what_float64_chose(probed, monkeypatch):
    ckpt, stats, spectra = probed

    def scored():  # with the embedding's pending candidates measured too
        return measure_pending(ckpt, score_candidates(ckpt, spectra, SETTINGS, stats), SETTINGS,
                               stats)
    fast = scored()
    for module in (scores_mod, probe_mod):
        monkeypatch.setattr(module, "leading_factors_with",
                            lambda ckpt, name, weighting, stats, rank: _float64_exact(ckpt, name,
                                                                                       stats))
    slow = scored()
    assert fast["matrices"].keys() == slow["matrices"].keys()
    for name, entry in slow["matrices"].items():
        assert fast["matrices"][name]["ranks"] == entry["ranks"]
        assert fast["matrices"][name]["scores"] == pytest.approx(entry["scores"], rel=1e-3,
                                                                 abs=1e-9)
    for ratio in (0.6, 0.8):
        plans = [make_plan(spectra, PlanSettings(param_ratio=ratio), scores=s)
                 for s in (fast, slow)]
        assert {n: p.rank for n, p in plans[0].layers.items()} == \
            {n: p.rank for n, p in plans[1].layers.items()}


def _whitening_only(stats):  # a copy of the memo without Gram eigenvectors
    return OrderedDict((k, v) for k, v in stats.memo.items() if k[0] == "root")


def test_scores_reuse_the_eigensolves_of_the_weighted_spectra(probed, monkeypatch):
    """Analysis with calibration takes each weighted matrix's spectrum from a memoized eigh:
    the eigenvectors that come with it are the scores stage's full factors, not solved again,
    and the values are the eigenvalue-only solver's."""
    ckpt, stats, spectra = probed
    stats = dataclasses.replace(stats, memo=_whitening_only(stats))
    calls = []
    real = calibrate_mod.gram_eigh
    monkeypatch.setattr(calibrate_mod, "gram_eigh", lambda x: calls.append(x) or real(x))
    memoized = analyze(ckpt, stats=stats)
    analyzed = len(calls)
    assert analyzed == len(spectra.matrices)
    for name, spectrum in spectra.matrices.items():
        plain = analyze_matrix(name, ckpt.get(name), AnalyzeSettings(),
                               stats.weighting(name, spectrum.cols))
        values = plain.singular_values
        assert memoized.matrices[name].singular_values == pytest.approx(values, rel=1e-9,
                                                                        abs=1e-9 * values[0])
    scores = score_candidates(ckpt, memoized, SETTINGS, stats)
    assert scores["matrices"] and len(calls) == analyzed


def test_factors_from_the_analysis_eigh_equal_the_general_ones(probed, monkeypatch):
    """The scores stage takes whitened and row-weighted (embedding) factors from the analysis's
    eigendecomposition, found by name (wide matrices: the eigenvectors are U; tall: U =
    W·L·V/σ; an embedding: A = W·V·Λ^(-1/4)): the factors of the general path, which forms the
    weighted matrix again, up to rounding."""
    ckpt, stats, spectra = probed
    general = dataclasses.replace(stats, analyzed={})
    shapes, taken = set(), []
    for shortcut in ("whitened_factors_from_eigh", "row_weighted_factors_from_eigh"):
        real = getattr(probe_mod, shortcut)
        monkeypatch.setattr(probe_mod, shortcut,
                            lambda *a, real=real: taken.append(a[0].shape) or real(*a))
    for name in stats.analyzed:
        weighting = probe_mod.matrix_weighting(ckpt, name, stats)
        if weighting is None or weighting.kind not in ("whiten", "rows"):
            continue
        s = spectra.matrices[name]
        assert stats.analyzed_eigh(name) is not None  # the shortcut's input
        shapes.add((weighting.kind, s.rows > s.cols))
        rank = max(1, min(s.rows, s.cols) // 2)
        taken.clear()
        A, B = probe_mod.leading_factors_with(ckpt, name, weighting, stats, rank)
        assert len(taken) == 1
        A0, B0 = probe_mod.leading_factors_with(ckpt, name, weighting, general, rank)
        assert len(taken) == 1  # the general path
        scale = float((A0 @ B0).abs().max())
        torch.testing.assert_close(A @ B, A0 @ B0, rtol=1e-5, atol=1e-5 * scale)
        if weighting.kind == "rows":  # the same split between A and B, not only their product
            torch.testing.assert_close(A, A0, rtol=1e-5, atol=1e-5 * float(A0.abs().max()))
            torch.testing.assert_close(B, B0, rtol=1e-5, atol=1e-5 * float(B0.abs().max()))
    # tall and wide matrices and an embedding all took the shortcut
    assert shapes == {("whiten", True), ("whiten", False), ("rows", True)}


def test_factorize_reuses_the_scores_eigensolves(probed, monkeypatch):
    ckpt, stats, spectra = probed
    stats = dataclasses.replace(stats, memo=_whitening_only(stats))
    calls = []
    real = calibrate_mod.gram_eigh
    monkeypatch.setattr(calibrate_mod, "gram_eigh", lambda x: calls.append(x) or real(x))
    scores = score_candidates(ckpt, spectra, SETTINGS, stats)
    scored = len(calls)
    assert scored == len(scores["matrices"])
    plan = make_plan(spectra, PlanSettings(param_ratio=0.7), scores=scores,
                     complete=lambda s: measure_pending(ckpt, s, SETTINGS, stats))
    reused = factorize(ckpt, plan, PLAIN, stats=stats)
    factored = plan.factored()
    assert factored and all(n in scores["matrices"] for n in factored)
    assert len(calls) == scored  # no eigensolve of its own
    fresh = factorize(ckpt, plan, PLAIN,
                      stats=dataclasses.replace(stats, memo=_whitening_only(stats)))
    assert len(calls) == scored + len(factored)
    for key, tensor in fresh.tensors.items():
        assert torch.equal(reused.tensors[key], tensor), key


def test_threaded_scores_and_their_reuse_are_byte_identical_to_serial(probed, monkeypatch):
    """The scores' full factors in threads (the default: one per core; 3 here) give the bytes
    of a serial run, each Gram eigensolve runs once, and factorize in threads reuses them."""
    ckpt, stats, spectra = probed
    calls = []
    real = calibrate_mod.gram_eigh
    monkeypatch.setattr(calibrate_mod, "gram_eigh", lambda x: calls.append(x) or real(x))
    runs = {}
    for workers in (1, 3):
        run_stats = dataclasses.replace(stats, memo=_whitening_only(stats))
        before = len(calls)
        scores = score_candidates(ckpt, spectra, SETTINGS, run_stats, workers=workers)
        assert len(calls) - before == len(scores["matrices"])  # one eigensolve per matrix
        plan = make_plan(spectra, PlanSettings(param_ratio=0.7), scores=scores,
                         complete=lambda s, st=run_stats: measure_pending(ckpt, s, SETTINGS, st))
        runs[workers] = (scores, factorize(ckpt, plan, PLAIN, stats=run_stats,
                                                   workers=workers))
        assert len(calls) - before == len(scores["matrices"])  # factorize reused them
    (serial, serial_ckpt), (threaded, threaded_ckpt) = runs[1], runs[3]
    assert threaded == serial
    assert serial_ckpt.tensors.keys() == threaded_ckpt.tensors.keys()
    for key, tensor in serial_ckpt.tensors.items():
        assert torch.equal(threaded_ckpt.tensors[key], tensor), key
