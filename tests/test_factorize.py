import pytest
import torch

import lowrank
from lowrank.io.checkpoint import open_checkpoint
from lowrank.linalg import factorize_matrix
from lowrank.stages.analyze import analyze
from lowrank.stages.factored import reconstruct_dense
from lowrank.stages.factorize import FactorizeSettings, factorize
from lowrank.stages.plan import PlanSettings, make_plan

from .conftest import low_rank_matrix


def test_error_falls_as_rank_grows():
    w = torch.randn(120, 80)
    errors = [factorize_matrix(w, r)[3] for r in (4, 16, 32, 64, 80)]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-5  # full rank reconstructs W


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_factors_shapes_and_energy_relation(method):
    w = torch.randn(64, 40)
    A, B, energy, err = factorize_matrix(w, 8, method)
    assert A.shape == (64, 8) and B.shape == (8, 40)
    if method == "exact":  # Eckart–Young: ‖W − W_r‖² = (1 − energy)‖W‖²
        assert err == pytest.approx((1 - energy) ** 0.5, rel=1e-4)


def test_exact_and_randomized_agree_on_known_low_rank():
    w = low_rank_matrix(500, 300, rank=12, noise=1e-4)
    _, _, _, err_exact = factorize_matrix(w, 12, "exact")
    A, B, _, err_rand = factorize_matrix(w, 12, "randomized", seed=3)
    assert err_exact < 1e-3 and err_rand < 1e-3
    Ae, Be, _, _ = factorize_matrix(w, 12, "exact")
    torch.testing.assert_close(A @ B, Ae @ Be, atol=1e-3, rtol=1e-3)


def test_randomized_is_deterministic_for_a_seed():
    w = torch.randn(200, 150)
    a1 = factorize_matrix(w, 20, "randomized", seed=7)[0]
    a2 = factorize_matrix(w, 20, "randomized", seed=7)[0]
    a3 = factorize_matrix(w, 20, "randomized", seed=8)[0]
    assert torch.equal(a1, a2) and not torch.equal(a1, a3)


def test_randomized_does_not_depend_on_other_threads():
    """Tasks of the thread executor run at once: a seeded range finder must not draw from the
    process-wide generator (torch.svd_lowrank does: then about one task in a hundred here got
    another task's test matrix), or the same seed gives different bytes."""
    from concurrent.futures import ThreadPoolExecutor
    w = torch.randn(96, 64)
    seeds = range(256)
    alone = [factorize_matrix(w, 8, "randomized", seed=s)[0] for s in seeds]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda s: factorize_matrix(w, 8, "randomized", seed=s)[0], seeds))
    assert all(torch.equal(a, b) for a, b in zip(alone, together))


def test_factorize_checkpoint_replaces_weights_by_factors(toy_checkpoint):
    ckpt = open_checkpoint(toy_checkpoint)
    plan = make_plan(analyze(ckpt), PlanSettings(rank=8, min_numel=0))
    result = factorize(ckpt, plan, FactorizeSettings())
    assert "fc1.weight" not in result.tensors
    assert result.tensors["fc1.A"].shape == (96, 8) and result.tensors["fc1.B"].shape == (8, 64)
    assert result.tensors["conv.A"].shape == (64, 8) and result.tensors["conv.B"].shape == (8, 144)
    assert torch.equal(result.tensors["fc1.bias"], ckpt.get("fc1.bias"))
    dense = reconstruct_dense(result.tensors, result.lowrank_config())
    assert dense["conv.weight"].shape == (64, 48, 3) and set(dense) == set(ckpt.names())
    assert result.params_after == plan.params_after


def test_factorize_in_place_on_a_model_you_hold(toy_model):
    """factorize_ swaps factored modules into the model itself; its outputs equal the dense
    model with W replaced by A·B, and the error falls as the rank grows."""
    import copy

    from lowrank import factorize_
    from lowrank.nn.layers import LowRankConv, LowRankLinear

    ids = torch.randint(0, 200, (2, 9))
    with torch.no_grad():
        dense_out = toy_model(ids)
    errors = []
    for rank in (2, 8, 24):
        model = factorize_(copy.deepcopy(toy_model), {"fc1.weight": rank, "conv.weight": rank})
        assert isinstance(model.fc1, LowRankLinear) and model.fc1.rank == rank
        assert isinstance(model.conv, LowRankConv) and model.conv.rank == rank
        reference = copy.deepcopy(toy_model)
        with torch.no_grad():
            reference.fc1.weight.copy_(model.fc1.A @ model.fc1.B)
            reference.conv.weight.copy_((model.conv.A @ model.conv.B).view_as(reference.conv.weight))
            torch.testing.assert_close(model(ids), reference(ids), atol=1e-5, rtol=1e-4)
            errors.append(float((model(ids) - dense_out).pow(2).mean()))
    assert errors[0] > errors[1] > errors[2]
    only_fc1 = factorize_(copy.deepcopy(toy_model), {"fc1.weight": 4, "conv.weight": 4},
                          filter_fn=lambda module, fqn: isinstance(module, torch.nn.Linear))
    assert isinstance(only_fc1.fc1, LowRankLinear) and isinstance(only_fc1.conv, torch.nn.Conv1d)
    with pytest.raises(lowrank.InputError, match="no weight 'nope.weight'"):
        factorize_(copy.deepcopy(toy_model), {"nope.weight": 4})
