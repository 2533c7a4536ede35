import pytest
import torch

from lowrank.errors import InputError
from lowrank.stages.evaluate import fidelity


def test_identical_embeddings_are_perfect_and_noise_lowers_both_metrics():
    g = torch.Generator().manual_seed(0)
    ref = torch.nn.functional.normalize(torch.randn(200, 32, generator=g), dim=-1)
    same = fidelity(ref, ref.clone())
    assert same["cosine"] == pytest.approx(1.0) and same["knn10_overlap"] == 1.0
    results = [fidelity(ref, ref + s * torch.randn(200, 32, generator=g)) for s in (0.01, 0.1, 1.0)]
    cosines = [r["cosine"] for r in results]
    overlaps = [r["knn10_overlap"] for r in results]
    assert cosines == sorted(cosines, reverse=True) and cosines[-1] < 0.9
    assert overlaps == sorted(overlaps, reverse=True) and overlaps[-1] < 0.5


def test_too_few_texts_for_knn():
    with pytest.raises(InputError, match="more than 10"):
        fidelity(torch.randn(10, 4), torch.randn(10, 4))


def test_quality_benchmark_never_evaluates_on_calibration_or_training_text():
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("quality", root / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    calibration = range(quality.CALIB_START, quality.CALIB_START + 256)
    training = range(quality.TRAIN_START, quality.TRAIN_START + 4096)
    evaluation = range(*quality.EVAL_LINES)
    assert not set(evaluation) & (set(calibration) | set(training))
    assert not set(calibration) & set(training)
    from lowrank.io.samples import DEFAULT_CALIBRATION, DEFAULT_EVALUATION

    shipped_eval = set(DEFAULT_EVALUATION.read_text().splitlines())
    assert not shipped_eval & set(DEFAULT_CALIBRATION.read_text().splitlines())
    if quality.DATA.is_file():  # the shared Debian text, when present: line-level check
        lines = quality.DATA.read_text().splitlines()
        held_out = {lines[i] for i in evaluation}
        seen = {lines[i] for i in (*calibration, *training)}
        # Debian repeats a few descriptions; the benchmark drops those from evaluation.
        assert len(held_out & seen) < 0.02 * len(held_out)
