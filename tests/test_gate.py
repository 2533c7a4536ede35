"""Gate goals against reports, the gate command's exit codes, and the edge pipeline end to end
on a small model (export -> int8 -> evaluate -> bench -> report -> gate)."""

import json

import pytest
from click.testing import CliRunner

import lowrank
from lowrank.cli import main
from lowrank.stages.gate import Goal, check

REPORT = {
    "format": "lowrank.report", "version": 1,
    "params": {"before": 100, "after": 50, "ratio": 0.5},
    "bytes": {"before": 400, "after": 200},
    "fidelity": {"kind": "encoder", "cosine": 0.96, "knn10_overlap": 0.72, "k": 10},
    "latency": {"results": [
        {"model": "dense", "batch": 1, "sequence": 16, "p50_ms": 2.0},
        {"model": "compressed", "batch": 1, "sequence": 16, "p50_ms": 2.1},
        {"model": "dense", "batch": 16, "sequence": 128, "p50_ms": 100.0},
        {"model": "compressed", "batch": 16, "sequence": 128, "p50_ms": 60.0}],
        "speedup": [{"batch": 1, "sequence": 16, "dense": 1.0, "compressed": 0.952},
                    {"batch": 16, "sequence": 128, "dense": 1.0, "compressed": 1.667}]},
}


@pytest.mark.parametrize("goal, passed", [
    (Goal("cosine", "threshold", 0.95), True),
    (Goal("cosine", "threshold", 0.97), False),
    (Goal("param_ratio", "threshold", 0.6), True),  # lower is better: 0.5 <= 0.6
    (Goal("param_ratio", "threshold", 0.4), False),
    (Goal("cosine", "max-degradation", 0.05), True),  # 1.0 -> 0.96
    (Goal("cosine", "max-degradation", 0.03), False),
    (Goal("latency_p50_ms", "percent-min-improvement", 40), True),  # 100 -> 60 ms at 16x128
    (Goal("latency_p50_ms", "percent-min-improvement", 41), False),
    (Goal("speedup", "threshold", 1.0), False),  # slower at batch 1: "never slower" fails
    (Goal("size_bytes", "min-improvement", 200), True),
    (Goal("params", "percent-max-degradation", 0), True),
])
def test_goals_resolve_against_the_dense_baseline(goal, passed):
    assert check(REPORT, [goal])[0]["passed"] is passed


def test_unmeasured_metric_is_an_error_unless_allowed():
    with pytest.raises(lowrank.InputError, match="perplexity was not measured"):
        check(REPORT, [Goal("perplexity", "threshold", 20)])
    assert check(REPORT, [Goal("perplexity", "threshold", 20)], allow_missing=True)[0]["passed"] is None
    with pytest.raises(lowrank.InputError, match="unknown gate metric"):
        Goal("accuracy!", "threshold", 1)


def test_gate_command_exit_codes(tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps(REPORT))
    runner = CliRunner()
    ok = runner.invoke(main, ["gate", str(report), "--min-cosine", "0.95", "--max-param-ratio", "0.6"])
    assert ok.exit_code == 0 and "PASS cosine" in ok.stdout and "gate passed" in ok.stdout
    bad = runner.invoke(main, ["gate", str(report), "--min-cosine", "0.99", "--max-param-ratio", "0.6"])
    assert bad.exit_code == 5 and "FAIL cosine" in bad.stdout and "PASS param_ratio" in bad.stdout
    assert "gate failed: 1 of 2 checks (cosine)" in bad.stderr
    missing = runner.invoke(main, ["gate", str(tmp_path / "none.json"), "--min-cosine", "0.9"])
    assert missing.exit_code == 3 and "no such report" in missing.stderr
    (tmp_path / "corrupt.json").write_text("{not json")
    corrupt = runner.invoke(main, ["gate", str(tmp_path / "corrupt.json"), "--min-cosine", "0.9"])
    assert corrupt.exit_code == 3 and corrupt.stderr.count("\n") == 1
    unmeasured = runner.invoke(main, ["gate", str(report), "--max-perplexity-ratio", "1.1"])
    assert unmeasured.exit_code == 3 and "not measured" in unmeasured.stderr
    allowed = runner.invoke(main, ["gate", str(report), "--max-perplexity-ratio", "1.1",
                                   "--allow-missing"])
    assert allowed.exit_code == 0 and "SKIP perplexity" in allowed.stdout
    custom = runner.invoke(main, ["gate", str(report), "--goal", "speedup:threshold:0.9", "--json"])
    assert custom.exit_code == 0 and json.loads(custom.stdout)[0]["passed"] is True


def edge_spec(goals):
    spec = lowrank.default_pipeline()
    spec.stages = ["calibrate", "analyze", "plan", "factorize", "export", "int8", "evaluate",
                   "bench", "gate"]
    spec.settings.update({
        "calibrate": {"samples": 64}, "plan": {"rank": 8}, "evaluate": {"samples": 64},
        "bench": {"batches": [1], "sequences": [8], "runs": 3, "warmup": 1, "rounds": 1},
        "gate": {"goals": goals},
    })
    return spec


def test_edge_pipeline_writes_reports_and_gates(tiny_bert_dir, tmp_path):
    goals = {"param_ratio": {"type": "threshold", "value": 0.99},
             "onnx_max_abs_diff": {"type": "threshold", "value": 1e-3}}
    result = lowrank.run_pipeline(edge_spec(goals), tiny_bert_dir, tmp_path / "out",
                                  cache_dir=tmp_path / "cache")
    out = result.output
    report = json.loads((out / "report.json").read_text())
    assert {r["model"] for r in report["latency"]["results"]} == {
        "dense", "compressed", "dense-int8", "compressed-int8"}
    assert report["latency"]["machine"]["cpu"] and "onnxruntime" in report["latency"]["machine"]
    assert report["int8"]["bytes"] < report["export"]["bytes"]
    assert 0 < report["fidelity"]["int8"]["cosine"] <= 1
    assert [g["passed"] for g in report["gate"]] == [True, True]
    assert (out / "onnx-int8" / "model.onnx").is_file()
    md = (out / "report.md").read_text()
    assert "| parameters |" in md and "PASS param_ratio" in md and "compressed-int8" in md
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3  # energy curves, parameters, latency

    failing = {"param_ratio": {"type": "threshold", "value": 0.1}}
    with pytest.raises(lowrank.GateFailed, match="param_ratio") as info:
        lowrank.run_pipeline(edge_spec(failing), tiny_bert_dir, tmp_path / "fail",
                             cache_dir=tmp_path / "cache")
    assert info.value.results[0]["passed"] is False
    assert json.loads((tmp_path / "fail" / "report.json").read_text())["gate"][0]["passed"] is False


def test_optimize_fuses_validates_and_benches_against_an_optimized_dense(tiny_bert_dir, tmp_path,
                                                                         monkeypatch):
    """--optimize: onnxruntime's transformer optimizer on the export, validated; int8 quantizes
    the fused graph and the benchmark's dense baseline gets the same treatment. The plan timed
    the model with attention factored and kept fusable (lowrank.stages.fusion)."""
    from lowrank.stages import fusion

    monkeypatch.setattr(fusion, "TIMING", {"runs": 2, "warmup": 1, "rounds": 1})
    result = CliRunner().invoke(main, ["compress", str(tiny_bert_dir), str(tmp_path / "out"),
                                       "--rank", "8", "--export", "onnx", "--optimize", "--int8",
                                       "--no-cache", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["optimize"]["fused"].get("SkipLayerNormalization", 0) > 0
    assert all(v["ok"] for v in report["optimize"]["validation"])
    assert (tmp_path / "out" / "onnx-optimized" / "model.onnx").is_file()
    timed = json.loads((tmp_path / "out" / "plan.json").read_text())["policy"]["fusion_check"]
    assert set(timed["p50_ms"]) == {"16", "2048"} and timed["attentions"] == 2
    assert all(set(t) == {"factored", "fused"} for t in timed["p50_ms"].values())
    bad = CliRunner().invoke(main, ["compress", str(tiny_bert_dir), str(tmp_path / "o2"),
                                    "--optimize"])
    assert bad.exit_code == 2 and "--optimize needs --export onnx" in bad.output


def test_bench_pairs_each_compressed_variant_with_its_dense_twin(tiny_bert_dir, tmp_path):
    spec = lowrank.default_pipeline()
    spec.stages += ["export", "optimize", "int8", "bench"]
    spec.settings["plan"] = {"rank": 8}
    spec.settings["bench"] = {"batches": [1], "sequences": [8], "runs": 2, "warmup": 1,
                              "rounds": 1}
    latency = lowrank.run_pipeline(spec, tiny_bert_dir, tmp_path / "out").report["latency"]
    assert {r["model"] for r in latency["results"]} == {
        "dense", "compressed", "dense-optimized", "compressed-optimized", "dense-int8",
        "compressed-int8"}
    pairs = {(p["model"], p["baseline"]): p["speedup"] for p in latency["pairs"]}
    assert set(pairs) == {("compressed", "dense"), ("compressed-optimized", "dense-optimized"),
                          ("compressed-int8", "dense-int8")}
    p50 = {r["model"]: r["p50_ms"] for r in latency["results"]}
    assert pairs[("compressed-int8", "dense-int8")] == pytest.approx(
        p50["dense-int8"] / p50["compressed-int8"], rel=1e-3)


def test_encoder_export_keeps_the_attention_pattern_the_optimizer_fuses(tiny_bert_dir, tmp_path):
    """The export traces eager attention (SDPA's graph fuses no Attention op); the model keeps
    its own attention implementation afterwards; factored Q/K/V block the fusion."""
    from lowrank.models import load_dense
    from lowrank.stages.export import ExportSettings, export_onnx
    from lowrank.stages.optimize import fusion_shape, optimize_onnx

    dense = load_dense(tiny_bert_dir)
    dense.set_attn_implementation("sdpa")
    export_onnx(dense, tmp_path / "dense.onnx", ExportSettings())
    assert dense.config._attn_implementation == "sdpa"
    fused = optimize_onnx(tmp_path / "dense.onnx", tmp_path / "dense-opt.onnx",
                          *fusion_shape(dense))["fused"]
    assert fused.get("Attention") == dense.config.num_hidden_layers

    out = tmp_path / "out"
    lowrank.run_pipeline(lowrank.compress_spec(plan={"rank": 8}), tiny_bert_dir, out)
    factored = lowrank.load(out)
    export_onnx(factored, tmp_path / "lr.onnx", ExportSettings())
    fused = optimize_onnx(tmp_path / "lr.onnx", tmp_path / "lr-opt.onnx",
                          *fusion_shape(factored))["fused"]
    assert "Attention" not in fused and fused.get("SkipLayerNormalization", 0) > 0
