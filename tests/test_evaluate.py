import pytest
import torch

from lowrank.errors import InputError
from lowrank.evaluate import fidelity


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
