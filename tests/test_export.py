"""ONNX export: two-step factors in the graph, validation against PyTorch, pipeline stage."""

import json

import onnx
import pytest

import lowrank
from lowrank.errors import ValidationError
from lowrank.stages.export import ExportSettings, check_factors, export_onnx


@pytest.fixture(scope="module")
def compressed_tiny(tiny_bert_dir, tmp_path_factory):
    spec = lowrank.default_pipeline()
    spec.settings["plan"] = {"rank": 8}
    spec.stages.append("export")
    return lowrank.run_pipeline(spec, tiny_bert_dir, tmp_path_factory.mktemp("x") / "out",
                                cache_dir=None)


def test_export_stage_writes_validated_onnx_with_factors(compressed_tiny):
    out = compressed_tiny.output
    graph = onnx.load(str(out / "onnx" / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in graph.output] == ["last_hidden_state"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch_size"
    assert graph.input[0].type.tensor_type.shape.dim[1].dim_param == "sequence_length"
    export = json.loads((out / "report.json").read_text())["export"]
    assert len(export["validation"]) == 3 and all(v["ok"] for v in export["validation"])
    assert {tuple(v["shape"]) for v in export["validation"]} == {(1, 8), (2, 16), (4, 33)}
    factored = sum(1 for e in compressed_tiny.report["layers"].values() if e["rank"] is not None)
    assert export["factors"]["unused_modules"] == ["pooler.dense"]  # not on last_hidden_state's path
    assert export["factors"]["factors"] == 2 * (factored - 1)
    # No initializer holds a folded dense (out x in) weight of a factored Linear.
    shapes = [tuple(i.dims) for i in graph.initializer]
    assert (128, 64) not in shapes and (64, 128) not in shapes  # intermediate/output dense


def test_validation_failure_is_an_error(tiny_bert_dir, tmp_path):
    model = lowrank.models.load_dense(tiny_bert_dir)
    with pytest.raises(ValidationError, match="differs from PyTorch"):
        export_onnx(model, tmp_path / "m.onnx", ExportSettings(atol=0.0, rtol=0.0))


def test_a_folded_product_is_detected(compressed_tiny, tiny_bert_dir, tmp_path):
    dense = lowrank.models.load_dense(tiny_bert_dir)
    path = tmp_path / "dense.onnx"
    export_onnx(dense, path)  # dense graph: no factors anywhere
    with pytest.raises(ValidationError, match="no low-rank factor"):
        check_factors(lowrank.load(compressed_tiny.output), path)


def test_export_command(compressed_tiny, tmp_path):
    from click.testing import CliRunner

    from lowrank.cli import main

    runner = CliRunner()
    ok = runner.invoke(main, ["export", str(compressed_tiny.output), str(tmp_path / "onnx"), "--json"])
    assert ok.exit_code == 0, ok.output
    data = json.loads(ok.stdout)
    assert (tmp_path / "onnx" / "model.onnx").is_file() and all(v["ok"] for v in data["validation"])

    strict = runner.invoke(main, ["export", str(compressed_tiny.output), str(tmp_path / "strict"),
                                  "--atol", "0", "--rtol", "0"])
    assert strict.exit_code == 4 and "differs from PyTorch" in strict.stderr
    assert not (tmp_path / "strict").exists()  # nothing half-written

    (tmp_path / "raw").mkdir()
    bad = runner.invoke(main, ["export", str(tmp_path / "raw"), str(tmp_path / "o")])
    assert bad.exit_code == 3 and bad.stderr.count("\n") == 1 and "config.json" in bad.stderr


def test_large_models_use_external_data(compressed_tiny, tmp_path, monkeypatch):
    import lowrank.stages.export

    monkeypatch.setattr(lowrank.stages.export, "TWO_GB", 0)  # pretend the tiny model is over 2 GB
    result = export_onnx(lowrank.load(compressed_tiny.output), tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx_data").stat().st_size > (tmp_path / "model.onnx").stat().st_size
    assert all(v["ok"] for v in result.validation) and result.factors["factors"] > 0


@pytest.mark.parametrize("fmt", ["dynamic", "static"])
def test_int8_is_smaller_and_runs(compressed_tiny, tiny_bert_dir, tmp_path, fmt):
    import numpy as np
    import onnxruntime as ort
    from transformers import AutoTokenizer

    from lowrank.io.samples import read_calibration_text
    from lowrank.stages.int8 import Int8Settings, quantize_int8

    source = compressed_tiny.output / "onnx" / "model.onnx"
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    texts = read_calibration_text(None, 16)
    feeds = [dict(tokenizer(texts[i:i + 8], padding=True, return_tensors="np")) for i in (0, 8)]
    info = quantize_int8(source, tmp_path / "int8.onnx", Int8Settings(format=fmt), feeds)
    assert info["bytes"] < 0.5 * source.stat().st_size
    out = ort.InferenceSession(str(tmp_path / "int8.onnx")).run(None, feeds[0])[0]
    assert out.shape[:2] == feeds[0]["input_ids"].shape and np.isfinite(out).all()
