import json

import pytest
import torch

from lowrank.errors import InputError, LowrankError
from lowrank.stages.analyze import AnalyzeSettings, Spectra, analyze_matrix
from lowrank.stages.plan import PlanSettings, apply_plan, make_plan

from .conftest import low_rank_matrix


def spectra_of(weights: dict, extra_params: int = 0) -> Spectra:
    sp = Spectra(AnalyzeSettings())
    for name, w in weights.items():
        sp.matrices[name] = analyze_matrix(name, w, AnalyzeSettings())
    sp.total_params = sum(w.numel() for w in weights.values()) + extra_params
    return sp


@pytest.fixture
def spectra():
    torch.manual_seed(0)
    return spectra_of({
        "a.weight": low_rank_matrix(256, 256, 40, noise=0.05),
        "b.weight": torch.randn(512, 128),
        "c.weight": low_rank_matrix(128, 384, 8, seed=1, noise=0.01),
        "emb.weight": torch.randn(2000, 64) * torch.linspace(3, 0.1, 64),
        "small.weight": torch.randn(8, 8),
        "lstm.weight_ih_l0": torch.randn(128, 64),
    }, extra_params=5000)


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.6, 0.8])
def test_param_ratio_lands_within_one_percent(spectra, ratio):
    plan = make_plan(spectra, PlanSettings(param_ratio=ratio))
    assert abs(plan.params_after / spectra.total_params - ratio) < 0.01
    assert plan.params_after <= ratio * spectra.total_params + 1


def test_param_ratio_is_not_uniform_low_rank_layers_lose_less(spectra):
    plan = make_plan(spectra, PlanSettings(param_ratio=0.5))
    # c is rank 8 plus noise: allocation keeps (nearly) all its energy, b is full rank noise.
    assert plan.layers["c.weight"].energy > 0.99
    assert plan.layers["b.weight"].rank is None or plan.layers["b.weight"].energy < 0.99


def test_unreachable_param_ratio_is_an_error(spectra):
    with pytest.raises(LowrankError, match="out of reach"):
        make_plan(spectra, PlanSettings(param_ratio=0.01))


def test_energy_policy_and_break_even_guard(spectra):
    plan = make_plan(spectra, PlanSettings(energy=0.95))
    assert plan.layers["c.weight"].rank <= 9
    assert plan.layers["c.weight"].energy >= 0.95
    # a full-rank random matrix needs a rank past 0.8 x break-even for 95%: stays dense
    assert plan.layers["b.weight"].rank is None
    assert "break-even" in plan.layers["b.weight"].reason


def test_skips_tiny_recurrent_and_excluded(spectra):
    plan = make_plan(spectra, PlanSettings(rank=4, exclude=("emb*",)))
    assert plan.layers["small.weight"].reason.startswith("tiny")
    assert plan.layers["lstm.weight_ih_l0"].rank == 4  # recurrent weights: LowRankRNN
    assert plan.layers["emb.weight"].reason == "excluded"
    only = make_plan(spectra, PlanSettings(rank=4, include=("a.*",)))
    assert [n for n, p in only.layers.items() if p.rank] == ["a.weight"]


def test_multiple_rounds_ranks_up(spectra):
    plan = make_plan(spectra, PlanSettings(rank_fraction=0.1, multiple=8))
    assert all(p.rank % 8 == 0 for p in plan.factored().values())


def test_policy_validation():
    with pytest.raises(InputError, match="exactly one"):
        PlanSettings(energy=0.9, rank=4)
    with pytest.raises(InputError, match="exactly one"):
        PlanSettings()
    with pytest.raises(InputError, match="energy"):
        PlanSettings(energy=1.5)


def test_plan_json_round_trip_and_reapply(spectra):
    plan = make_plan(spectra, PlanSettings(param_ratio=0.6))
    data = json.loads(json.dumps(plan.to_json()))
    again = apply_plan(data, spectra)
    assert {n: p.rank for n, p in again.layers.items()} == {n: p.rank for n, p in plan.layers.items()}
    data["layers"]["a.weight"]["rank"] = 17  # a user's edit is honoured
    assert apply_plan(data, spectra).layers["a.weight"].rank == 17


def test_reapplied_plan_errors(spectra):
    data = make_plan(spectra, PlanSettings(rank=4)).to_json()
    bad = json.loads(json.dumps(data))
    bad["layers"]["nope.weight"] = {"rank": 3}
    bad["layers"]["gone.weight"] = {"rank": 3}
    with pytest.raises(InputError, match="2 layer.*nope.weight, gone.weight"):
        apply_plan(bad, spectra)
    too_big = json.loads(json.dumps(data))
    too_big["layers"]["c.weight"]["rank"] = 129
    with pytest.raises(InputError, match=r"rank 129 must be an integer in \[1, 128\]"):
        apply_plan(too_big, spectra)
    wrong_shape = json.loads(json.dumps(data))
    wrong_shape["layers"]["a.weight"]["shape"] = [10, 10]
    with pytest.raises(InputError, match="another model"):
        apply_plan(wrong_shape, spectra)


class FakeLatency:
    """Factoring pays for every shape except fc1's (96 x 64): a planner test with no timing."""

    def ms(self, rows, cols, rank, tokens):
        slow = (rows, cols) == (96, 64)
        return 1.0 if rank is None else (2.0 if slow else 0.5)


def test_latency_check_keeps_slow_layers_dense_and_reallocates(toy_checkpoint):
    from lowrank import analyze, open_checkpoint

    spectra = analyze(open_checkpoint(toy_checkpoint))
    fixed = make_plan(spectra, PlanSettings(rank=4, latency_tokens=(16,)), latency=FakeLatency())
    assert fixed.layers["fc1.weight"].rank is None
    assert "not faster" in fixed.layers["fc1.weight"].reason
    assert fixed.layers["conv.weight"].rank == 4
    budget = make_plan(spectra, PlanSettings(param_ratio=0.7, latency_tokens=(16,)),
                       latency=FakeLatency())
    assert budget.layers["fc1.weight"].rank is None
    assert abs(budget.params_after / spectra.total_params - 0.7) < 0.01  # others gave more


def test_latency_table_measures_once_per_machine(tmp_path):
    from lowrank.timing import LatencyTable

    table = LatencyTable.for_machine(tmp_path, threads=1)
    dense, factored = table.ms(64, 64, None, 8), table.ms(64, 64, 4, 8)
    assert dense > 0 and factored > 0 and table.measured == 2
    table.save()
    again = LatencyTable.for_machine(tmp_path, threads=1)
    assert again.ms(64, 64, None, 8) == dense and again.measured == 0


class LinearLatency:
    """Milliseconds = FLOPs / 1e6 plus a fixed 0.01 ms per MatMul: factoring pays while
    r(m+n) + 1e4 < mn. Deterministic, so the latency objective can be tested exactly."""

    def ms(self, rows, cols, rank, tokens):
        flops = rows * cols if rank is None else rank * (rows + cols)
        return tokens * flops / 1e6 + (0.01 if rank is None else 0.02)


def test_latency_objective_meets_the_time_budget(toy_checkpoint):
    from lowrank import analyze, open_checkpoint
    from lowrank.stages.allocate import latency_cost

    spectra = analyze(open_checkpoint(toy_checkpoint))
    settings = PlanSettings(latency_ratio=0.6, latency_tokens=(64,))
    plan = make_plan(spectra, settings, latency=LinearLatency(), matmul_names={"fc1.weight",
                                                                               "conv.weight"})
    assert plan.layers["emb.weight"].rank is None and "not a matmul" in plan.layers["emb.weight"].reason
    costs = {n: latency_cost(LinearLatency(), spectra.matrices[n], settings)
             for n in ("fc1.weight", "conv.weight")}
    spent = sum(costs[n].at(plan.layers[n].rank) for n in costs)
    dense = sum(c.dense for c in costs.values())
    assert spent <= 0.6 * dense and spent >= 0.55 * dense  # the budget is met and used
    with pytest.raises(LowrankError, match="needs latency measurements"):
        make_plan(spectra, settings)


def test_matrices_given_as_dense_are_kept_and_the_budget_goes_to_the_others(spectra):
    free = make_plan(spectra, PlanSettings(param_ratio=0.5))
    assert free.layers["a.weight"].rank is not None
    kept = make_plan(spectra, PlanSettings(param_ratio=0.5), dense={"a.weight": "fusion"})
    assert kept.layers["a.weight"].rank is None and kept.layers["a.weight"].reason == "fusion"
    assert abs(kept.params_after / spectra.total_params - 0.5) < 0.01
    others = [n for n in free.layers if n != "a.weight" and free.layers[n].rank]
    assert sum(kept.layers[n].params() for n in others) < sum(free.layers[n].params() for n in others)
