"""ONNX export: two-step factors in the graph, validation against PyTorch, pipeline stage."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import lowrank
from lowrank.errors import ValidationError
from lowrank.stages.export import ExportSettings, check_factors, export_onnx, validate_onnx


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
    assert data["rule"] == "max |Δ| ≤ 0.002 × RMS of PyTorch's output"  # encoder: no token checks
    assert all({"scale", "max_abs_diff", "rel_error"} <= set(v) for v in data["validation"])
    assert not any("top1_agreement" in v for v in data["validation"])

    strict = runner.invoke(main, ["export", str(compressed_tiny.output), str(tmp_path / "strict"),
                                  "--atol", "0", "--rtol", "0"])
    assert strict.exit_code == 4 and "differs from PyTorch" in strict.stderr
    assert "rule: |Δ| ≤ 0 + 0·|PyTorch| per element" in strict.stderr  # the override replaced it
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


# --------------------------------------------------------------------------------------------
# Validation that fits the output: correct exports pass at any output scale, wrong ones fail.


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama_dir):
    """The tiny Llama with a low-rank MLP layer and LM head: a causal LM with factors."""
    model = lowrank.models.load_dense(tiny_llama_dir)
    lowrank.factorize_(model, {"model.layers.0.mlp.down_proj.weight": 16, "lm_head.weight": 16})
    return model.eval()


class Scaled(nn.Module):
    """A causal LM whose logits are ``k`` times ``model``'s (keeps its config: still an LM)."""

    def __init__(self, model: nn.Module, k: float):
        super().__init__()
        self.model, self.config, self.k = model, model.config, k

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits * self.k


def test_causal_lm_export_passes_with_token_checks(tiny_lm, tmp_path):
    result = export_onnx(tiny_lm, tmp_path / "lm.onnx")
    assert result.outputs[0] == "logits" and result.factors["factors"] == 4
    assert "max |Δ log-prob| ≤ 0.02 nats" in result.rule
    for v in result.validation:
        assert v["ok"] and v["top1_agreement"] == 1.0 and v["top1_gap"] == 0.0
        assert v["max_logprob_diff"] < 1e-4 and v["rel_error"] < 1e-4  # float32 reordering only


def test_a_large_output_scale_passes(tiny_lm, tmp_path):
    """Logits x1e4: max abs diff ~1e-3 like issue 12's deep LM, which a fixed atol of 1e-4
    rejects; relative to the output's RMS the error is what it was, and the export passes."""
    scaled, path = Scaled(tiny_lm, 1e4), tmp_path / "scaled.onnx"
    result = export_onnx(scaled, path)
    assert all(v["ok"] and v["scale"] > 100 and v["rel_error"] < 1e-4 for v in result.validation)
    assert max(v["max_abs_diff"] for v in result.validation) > 1e-4
    with pytest.raises(ValidationError, match="differs from PyTorch"):
        validate_onnx(scaled, path, ExportSettings(atol=1e-4))  # the fixed atol alone


@pytest.fixture(scope="module")
def biased_bert(tiny_bert_dir, tmp_path_factory):
    """Tiny BERT with low-rank MLPs and nonzero biases (HF initializes biases to 0, and dropping
    a zero bias changes nothing), and its faithful export, which passes."""
    model = lowrank.models.load_dense(tiny_bert_dir)
    lowrank.factorize_(model, {f"encoder.layer.{i}.{n}.dense.weight": 16
                               for i in (0, 1) for n in ("intermediate", "output")})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias") and "LayerNorm" not in name:
                param.normal_(0, 0.02, generator=generator)
    path = tmp_path_factory.mktemp("biased") / "model.onnx"
    assert all(v["ok"] for v in export_onnx(model.eval(), path).validation)
    return model, path


def _edit(path, out, name, change):
    """A copy of the ONNX file ``path`` whose initializer ``name`` is ``change(array)``."""
    proto = onnx.load(str(path))
    init = next(i for i in proto.graph.initializer if i.name == name)
    array = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array(change(array).astype(array.dtype), name))
    onnx.save(proto, str(out))
    return out


@pytest.mark.parametrize("name, change", [
    # another matrix of the factor's shape and scale
    ("encoder.layer.0.intermediate.dense.A",
     lambda a: np.random.default_rng(0).standard_normal(a.shape) * a.std()),
    ("encoder.layer.1.output.dense.bias", np.zeros_like),  # a low-rank layer's (dense) bias
], ids=["swapped-factor", "dropped-bias"])
def test_a_wrong_weight_fails_validation(biased_bert, tmp_path, name, change):
    model, path = biased_bert
    same = _edit(path, tmp_path / "same.onnx", f"model.{name}", lambda a: a)
    assert all(v["ok"] for v in validate_onnx(model, same))  # the edit itself changes nothing
    bad = _edit(path, tmp_path / "bad.onnx", f"model.{name}", change)
    assert check_factors(model, bad)["factors"] == 8  # every factor in place: only numbers differ
    with pytest.raises(ValidationError, match="differs from PyTorch"):
        validate_onnx(model, bad)


def test_train_mode_dropout_fails_validation(tiny_bert_dir, tmp_path, monkeypatch):
    """A graph exported in training mode with dropout 0.5, validated against PyTorch in eval
    mode. onnxruntime's optimizer would drop the Dropout nodes and hide it: validation runs the
    graph as written."""
    model = lowrank.models.load_dense(tiny_bert_dir)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.5
    export_onnx(model, tmp_path / "eval.onnx")  # exported in eval mode, the same model passes
    export = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: export(
        *a, training=torch.onnx.TrainingMode.TRAINING, **k))
    with pytest.raises(ValidationError, match="differs from PyTorch"):
        export_onnx(model, tmp_path / "train.onnx")
    graph = onnx.load(str(tmp_path / "train.onnx")).graph
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t)
                 for n in graph.node if n.op_type == "Constant"}
    live = [n for n in graph.node if n.op_type == "Dropout" and len(n.input) == 3
            and constants[n.input[1]] == 0.5 and constants[n.input[2]]]  # ratio, training_mode
    assert live  # the graph really drops units at random


def test_export_command_on_a_causal_lm(tiny_llama_dir, tmp_path):
    from click.testing import CliRunner

    from lowrank.cli import main

    result = CliRunner().invoke(main, ["export", str(tiny_llama_dir), str(tmp_path / "onnx"),
                                       "--json", str(tmp_path / "export.json")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "export.json").read_text())
    assert data["outputs"][0] == "logits" and "top-1 equal up to ties" in data["rule"]
    assert all(v["top1_agreement"] == 1.0 and v["max_logprob_diff"] < 1e-4
               for v in data["validation"])
    assert "top-1 agreement 100.00%" in result.stdout and "log-prob" in result.stdout


def test_token_checks_forgive_near_ties_and_padding_only():
    from lowrank.stages.export import compare

    loose = ExportSettings(rel_tol=10.0)  # the element rule out of the way: token checks only
    want = np.array([[[5.0, 5.0 - 1e-4, 0, 0], [5.0, 4.975, 0, 0], [0, 0, 0, 9.0]]])
    real = np.array([[True, True, False]])  # the last position is padding

    tie = want.copy()
    tie[0, 0, 1] += 2e-4  # float32-sized wobble flips a 1e-4-nat tie
    tie[0, 2] = [0, 0, 9.5, 9.0]  # anything at a padded position
    entry = compare(tie, want, loose, real)
    assert entry["ok"] and entry["top1_agreement"] == 0.5
    assert entry["top1_gap"] == pytest.approx(1e-4) and entry["max_logprob_diff"] < 1e-3

    flip = want.copy()
    flip[0, 1, 1] += 0.03  # token 1 overtakes token 0, which PyTorch prefers by 0.025 nats
    entry = compare(flip, want, loose, real)
    assert entry["max_logprob_diff"] < loose.logprob_tol < entry["top1_gap"] and not entry["ok"]
