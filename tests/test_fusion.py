"""--optimize keeps an encoder's attention fusable (Q/K/V/output projections dense) when the
whole optimized model is measured faster that way (lowrank.stages.fusion)."""

import json

import pytest

import lowrank
from lowrank.models import Models, load_dense
from lowrank.stages import fusion
from lowrank.stages.plan import PlanStageSettings

GROUP = ("attention.self.query", "attention.self.key", "attention.self.value",
         "attention.output.dense")


def test_attention_groups_are_the_four_projections_of_each_bert_attention(tiny_bert_dir,
                                                                          tiny_llama_dir):
    groups = fusion.attention_groups(load_dense(tiny_bert_dir))
    assert groups == [[f"encoder.layer.{i}.{p}.weight" for p in GROUP] for i in range(2)]
    assert fusion.attention_groups(load_dense(tiny_llama_dir)) == []  # nothing the optimizer fuses


@pytest.mark.parametrize("fused_faster", [True, False])
def test_optimize_keeps_attention_dense_only_when_the_fused_model_is_faster(
        tiny_bert_dir, tmp_path, monkeypatch, fused_faster):
    timed = []

    def timer(architecture, plans, tokens, threads, precision):
        timed.append(plans)
        return {t: {"factored": 2.0, "fused": 1.0 if fused_faster else 3.0} for t in tokens}

    monkeypatch.setattr(fusion, "time_plans", timer)
    spec = lowrank.compress_spec(plan={"rank_fraction": 0.25}, export="onnx", optimize=True)
    assert spec.settings["plan"]["attention_fusion"] == "float32"
    report = lowrank.run_pipeline(spec, tiny_bert_dir, tmp_path / "out").report
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    group = [f"encoder.layer.{i}.{p}.weight" for i in range(2) for p in GROUP]

    (plans,) = timed
    assert all(n in plans["factored"] for n in group)  # the policy factored them...
    assert not any(n in plans["fused"] for n in group)  # ...and the other plan keeps them
    assert plan["policy"]["fusion_check"]["kept_dense"] is fused_faster
    assert plan["policy"]["fusion_check"]["fused_over_factored"] == (0.5 if fused_faster else 1.5)
    fused_ops = report["optimize"]["fused"]
    assert report["optimize"]["fusion_check"] == plan["policy"]["fusion_check"]
    summary = (tmp_path / "out" / "report.md").read_text()
    assert ("attention kept dense and fused" if fused_faster else "attention kept factored") \
        in summary
    if fused_faster:
        assert all(plan["layers"][n]["rank"] is None for n in group)
        assert "fuses the attention" in plan["layers"][group[0]]["reason"]
        assert fused_ops.get("Attention") == 2
    else:
        assert all(plan["layers"][n]["rank"] for n in group)
        assert "Attention" not in fused_ops
    assert all(v["ok"] for v in report["optimize"]["validation"])


def test_fusion_timing_exports_optimizes_and_times_both_plans(tiny_bert_dir, monkeypatch):
    """The real measurement, on a tiny BERT: both models exported, optimized and timed."""
    monkeypatch.setattr(fusion, "TIMING", {"runs": 2, "warmup": 1, "rounds": 1})
    models = Models(lowrank.open_checkpoint(tiny_bert_dir))
    names = [n for g in fusion.attention_groups(load_dense(tiny_bert_dir)) for n in g]
    for precision in ("float32", "int8"):
        times = fusion.time_plans(models.architecture, {"factored": {n: 4 for n in names},
                                                        "fused": {}}, (16,), 1, precision)
        assert set(times) == {16} and set(times[16]) == {"factored", "fused"}
        assert all(ms > 0 for ms in times[16].values())


def test_the_check_times_the_precision_deployed_and_a_plan_file_is_applied_as_written():
    spec = lowrank.compress_spec(plan={}, export="onnx", optimize=True, int8={})
    assert spec.settings["plan"]["attention_fusion"] == "int8"
    spec = lowrank.compress_spec(plan_file="plan.json", export="onnx", optimize=True)
    assert "attention_fusion" not in spec.settings["plan"]
    spec = lowrank.compress_spec(plan={}, export="onnx", optimize=True, fusion_check=False)
    assert "attention_fusion" not in spec.settings["plan"]
    with pytest.raises(lowrank.errors.InputError, match="attention_fusion"):
        PlanStageSettings(param_ratio=0.5, attention_fusion="fp16")


def test_token_counts_become_batches_of_sequences_the_model_can_take():
    assert fusion._shape(16, 512) == (1, 16)
    assert fusion._shape(2048, 512) == (16, 128)
    assert fusion._shape(2048, 64) == (32, 64)


def test_the_check_reports_the_probe_loss_the_allocation_measured():
    from types import SimpleNamespace

    found = {"first": {"measured_joint": 0.2}, "refined": {"measured_joint": 0.1},
             "chosen": "refined"}
    assert fusion._probe_loss(SimpleNamespace(policy={"loss_allocation": found})) == 0.1
    assert fusion._probe_loss(SimpleNamespace(policy={})) is None  # no calibration, no probe
