"""Measured-loss allocation (issue 11): candidate scores, the exact multiple-choice knapsack, the
tied embedding/LM head as one decision, and the default pipeline with calibration using it."""

import itertools
import json
import random

import pytest
import torch

import lowrank
from lowrank.pipeline.spec import compress_spec
from lowrank.stages.knapsack import solve_mck


def _brute_force(groups, required):
    best = None
    for pick in itertools.product(*(range(len(o)) for o in groups.values())):
        options = [o[i] for o, i in zip(groups.values(), pick)]
        if sum(s for s, _ in options) >= required:
            loss = sum(v for _, v in options)
            best = loss if best is None else min(best, loss)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_knapsack_is_exact(seed):
    rng = random.Random(seed)
    groups = {f"g{i}": [(0, 0.0)] + [(rng.randint(1, 30), rng.random()) for _ in range(rng.randint(1, 4))]
              for i in range(rng.randint(2, 6))}
    total = sum(max(s for s, _ in o) for o in groups.values())
    required = rng.randint(0, total)
    choice = solve_mck(groups, required)
    picked = [groups[n][i] for n, i in choice.items()]
    assert sum(s for s, _ in picked) >= required  # the budget is met
    assert sum(v for _, v in picked) == pytest.approx(_brute_force(groups, required))


def test_knapsack_refuses_an_unreachable_budget():
    with pytest.raises(lowrank.LowrankError, match="out of reach"):
        solve_mck({"a": [(0, 0.0), (5, 1.0)]}, 6)


def _compress(model_dir, tmp_path, name, **plan):
    spec = compress_spec(calibration_file="", calibration={"samples": 32},
                         plan={"param_ratio": 0.8, **plan})
    spec.settings["scores"] = {"samples": 16, "batch_size": 8}
    return lowrank.run_pipeline(spec, model_dir, tmp_path / name, cache_dir=tmp_path / "cache")


def test_default_pipeline_with_calibration_allocates_by_loss(tiny_llama_dir, tmp_path):
    assert "scores" in compress_spec(calibration_file="").stages
    assert "scores" not in compress_spec().stages  # no data: energy allocation
    assert "scores" not in compress_spec(calibration_file="", plan={"allocation": "energy"}).stages
    result = _compress(tiny_llama_dir, tmp_path, "loss")
    plan = json.loads((tmp_path / "loss" / "plan.json").read_text())
    assert plan["params"]["ratio"] <= 0.8  # the budget is met ...
    # ... and spent, up to the steps of the candidates: here the embedding's and the head's
    # largest candidates (rank 47 of 64) save ~0.26M parameters each, 6% of the model
    assert plan["params"]["ratio"] > 0.7
    info = plan["policy"]["loss_allocation"]
    assert info["chosen"] in ("first", "refined")
    assert info[info["chosen"]]["measured_joint"] >= 0
    scored = {n: e for n, e in plan["layers"].items() if "scores" in e}
    assert "lm_head.weight" in scored and "model.layers.0.mlp.up_proj.weight" in scored
    for entry in scored.values():  # every candidate's score lands in the plan, dense too
        assert entry["scores"]["dense"] == 0.0
        assert entry["rank"] is None or str(entry["rank"]) in entry["scores"]
        ranks = sorted(int(r) for r in entry["scores"] if r != "dense")
        assert entry["scores"][str(ranks[0])] > 0
    energy = _compress(tiny_llama_dir, tmp_path, "energy", allocation="energy")
    assert "loss_allocation" not in energy.artifacts["plan"].policy
    assert result.artifacts["plan"].params_after <= 0.8 * result.artifacts["plan"].total_params


def test_scores_track_the_measured_loss(tiny_llama_dir, tmp_path):
    from lowrank.stages.probe import measure_joint
    from lowrank.stages.scores import ScoreSettings

    result = _compress(tiny_llama_dir, tmp_path, "s")
    scores, stats = result.artifacts["scores"], result.artifacts["calibrate"]
    entry = scores["matrices"]["model.layers.1.mlp.up_proj.weight"]
    # A larger rank loses less (up to the sampling noise of the estimate).
    assert entry["scores"][-1] < entry["scores"][0]
    plans = [{"model.layers.1.mlp.up_proj.weight": entry["ranks"][0]}]
    measured = measure_joint(lowrank.open_checkpoint(tiny_llama_dir),
                             ScoreSettings(samples=16, batch_size=8), stats, plans)
    assert 0.3 < entry["scores"][0] / measured[0] < 3  # second order, sampled: same scale


def test_tied_embedding_and_head_are_one_decision(tiny_llama_dir, tmp_path):
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    tied = tmp_path / "tied"
    model.save_pretrained(tied)
    for f in tiny_llama_dir.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special")):
            (tied / f.name).write_bytes(f.read_bytes())
    result = _compress(tied, tmp_path, "out")
    scores = result.artifacts["scores"]["matrices"]
    assert "lm_head.weight" not in scores  # one decision ...
    assert scores["model.embed_tokens.weight"]["uses"] == ["model.embed_tokens", "lm_head"]
    plan = result.artifacts["plan"]  # ... counted once in the budget
    assert "lm_head.weight" not in plan.layers
    assert plan.params_after <= 0.8 * plan.total_params


def test_input_embedding_candidates_are_measured(tiny_llama_dir, tmp_path):
    """The second-order estimate is far off for deep cuts of an embedding (MiniLM: 0.12
    estimated, 0.45 measured): its candidates are measured, every other one, the rest
    interpolated; the samples behind the knapsack's cross terms take the measured size. The
    scores stage measures the largest, the plan the others when it could factor the matrix."""
    import numpy as np

    from lowrank.stages.probe import measure_joint, measure_pending
    from lowrank.stages.scores import ScoreSettings

    result = _compress(tiny_llama_dir, tmp_path, "s")
    scores, stats = result.artifacts["scores"], result.artifacts["calibrate"]
    ckpt, probe = lowrank.open_checkpoint(tiny_llama_dir), ScoreSettings.of(scores)
    name = "model.embed_tokens.weight"
    partial = scores["matrices"][name]
    ranks = partial["ranks"]
    probed = [r for i, r in enumerate(ranks) if i % 2 == 0 or i == len(ranks) - 1]
    assert partial["measured"] == probed[-1:] and partial["pending"] == probed[:-1]
    assert partial["scores"][:-1] == [None] * (len(ranks) - 1)
    full = measure_pending(ckpt, scores, probe, stats)
    assert scores["matrices"][name]["pending"] == probed[:-1]  # a new artifact
    entry, directions = full["matrices"][name], np.asarray(full["directions"][name])
    assert entry["measured"] == probed and entry["pending"] == []
    measured = measure_joint(ckpt, probe, stats, [{name: r} for r in probed])
    by_rank = dict(zip(ranks, entry["scores"]))
    assert [by_rank[r] for r in probed] == pytest.approx(measured, rel=1e-4)
    for i in range(1, len(ranks) - 1, 2):  # between its measured neighbours
        low, high = sorted((entry["scores"][i - 1], entry["scores"][i + 1]))
        assert low <= entry["scores"][i] <= high
    assert len(entry["second_order"]) == len(ranks) and entry["second_order"] != entry["scores"]
    sized = [s for s, e in zip(entry["scores"], entry["second_order"]) if e > 0]
    assert (directions ** 2).sum(0)[[e > 0 for e in entry["second_order"]]] == pytest.approx(sized)
    # At 80% the plan factors the embedding, so it measured the rest: the same numbers.
    layer = result.artifacts["plan"].layers[name]
    assert layer.rank is not None
    assert [layer.scores[str(r)] for r in probed] == pytest.approx(measured, rel=1e-4)
    # Linears keep the estimate; measure_embedding=False keeps it for the embedding too.
    assert "measured" not in scores["matrices"]["model.layers.1.mlp.up_proj.weight"]
    spec = compress_spec(calibration_file="", calibration={"samples": 32},
                         plan={"param_ratio": 0.8})
    spec.settings["scores"] = {"samples": 16, "batch_size": 8, "measure_embedding": False}
    off = lowrank.run_pipeline(spec, tiny_llama_dir, tmp_path / "off", cache_dir=tmp_path / "cache")
    assert "measured" not in off.artifacts["scores"]["matrices"][name]
    assert off.artifacts["scores"]["matrices"][name]["scores"] == entry["second_order"]


@pytest.mark.parametrize("ratio", [0.8, 0.97])
def test_pending_candidates_give_the_plan_measuring_them_would(tiny_llama_dir, tmp_path, ratio):
    """A plan that keeps the embedding dense at the lower bound of its pending candidates'
    losses is the plan their measured losses give, so they are measured only when a plan would
    factor it: at 97% it stays dense unmeasured, at 80% it is cut, after measuring."""
    from lowrank.stages.plan import PlanSettings, make_plan
    from lowrank.stages.probe import measure_pending
    from lowrank.stages.scores import ScoreSettings

    result = _compress(tiny_llama_dir, tmp_path, "s")
    scores, stats, spectra = (result.artifacts[k] for k in ("scores", "calibrate", "analyze"))
    ckpt = lowrank.open_checkpoint(tiny_llama_dir)
    full = measure_pending(ckpt, scores, ScoreSettings.of(scores), stats)
    calls = []

    def complete(partial):
        calls.append(partial)
        return full
    settings = PlanSettings(param_ratio=ratio)
    lazy = make_plan(spectra, settings, scores=scores, complete=complete)
    eager = make_plan(spectra, settings, scores=full)
    assert {n: p.rank for n, p in lazy.layers.items()} \
        == {n: p.rank for n, p in eager.layers.items()}
    name = "model.embed_tokens.weight"
    entry = scores["matrices"][name]
    unmeasured = [r for r, score in zip(entry["ranks"], entry["scores"]) if score is None]
    if ratio > 0.9:
        assert not calls and lazy.layers[name].rank is None
        assert lazy.policy["loss_allocation"]["not_measured"][name] == unmeasured
        assert [lazy.layers[name].scores[str(r)] for r in unmeasured] == [None] * len(unmeasured)
    else:
        assert calls and lazy.layers[name].rank is not None
        assert "not_measured" not in lazy.policy["loss_allocation"]
        assert lazy.layers[name].scores == eager.layers[name].scores
    with pytest.raises(lowrank.LowrankError, match="not all measured"):
        make_plan(spectra, PlanSettings(param_ratio=0.8), scores=scores)


def test_the_plan_stage_loads_the_probe_and_measures_pending_once(tiny_llama_dir, tmp_path,
                                                                  monkeypatch):
    """The latency check plans again after keeping slow layers dense (here every factored
    Linear, made "slower" on purpose): the probe batch is loaded, and the embedding's pending
    candidates measured, once."""
    from lowrank.stages import plan as plan_mod

    calls = {"allocations": 0, "pending": 0, "probe": 0}

    def counted(key, real):
        def call(*args, **kwargs):
            calls[key] += 1
            return real(*args, **kwargs)
        return call
    for key, name in (("allocations", "loss_allocation"), ("pending", "measure_pending"),
                      ("probe", "probe_data")):
        monkeypatch.setattr(plan_mod, name, counted(key, getattr(plan_mod, name)))
    monkeypatch.setattr(plan_mod, "slower_factored", lambda *args: "slower (on purpose)")
    result = _compress(tiny_llama_dir, tmp_path, "s", latency_tokens=[1])
    assert calls["allocations"] > 1 and calls["pending"] == calls["probe"] == 1
    assert result.artifacts["plan"].layers["model.embed_tokens.weight"].rank is not None


def test_measured_losses_do_not_depend_on_batching_and_hold_in_bf16(tiny_llama_dir, tmp_path):
    """The passes that measure a loss run over the probe lines batched by length (less padding)
    and autocast to ``measure_dtype``: the same losses as in file order, and bf16's close to
    float32's."""
    from lowrank.errors import InputError
    from lowrank.stages.probe import leading_factors, plan_losses, probe_data
    from lowrank.stages.scores import ScoreSettings

    result = _compress(tiny_llama_dir, tmp_path, "s")
    stats, ckpt = result.artifacts["calibrate"], lowrank.open_checkpoint(tiny_llama_dir)
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"]
    factors = {n: leading_factors(ckpt, n, stats, 16) for n in names}
    plans = [{names[0]: 8}, {names[1]: 4}, {n: 16 for n in names}]
    probe = probe_data(ckpt, ScoreSettings(samples=16, batch_size=4), stats)
    assert sum(int(m.numel()) for _, m in probe.by_length) \
        < sum(int(m.numel()) for _, m in probe.batches)  # the lines differ in length

    def losses(batches, dtype=torch.float32):
        return plan_losses(probe.model, batches, probe.kind, plans, factors.__getitem__, dtype)
    in_order = losses(probe.batches)
    assert min(in_order) > 0
    assert losses(probe.by_length) == pytest.approx(in_order, rel=1e-3)
    assert losses(probe.by_length, torch.bfloat16) == pytest.approx(in_order, rel=0.01)
    with pytest.raises(InputError, match="measure_dtype"):
        ScoreSettings(measure_dtype="float16")
