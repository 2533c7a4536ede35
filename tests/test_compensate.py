"""Compensated factors (lowrank.stages.sequential.compensated_factors): each layer fitted to the
dense model's outputs from the inputs it gets in the partly factored model."""

import pytest
import torch

import lowrank
from lowrank.io.samples import read_calibration_text
from lowrank.linalg import Weighting, factorize_matrix, psd_root
from lowrank.models import load_dense
from lowrank.stages.sequential import _PairedInputs, _Reached, compensated_targets


def _objective(w, m, x, x_student):
    return float((x @ w.T - x_student @ m.T).pow(2).sum())


def test_target_is_the_weight_when_the_inputs_are_the_dense_ones():
    torch.manual_seed(0)
    w, x = torch.randn(12, 20, dtype=torch.float64), torch.randn(200, 20, dtype=torch.float64)
    gram = x.T @ x
    (target,), root = compensated_targets([w], gram, [w @ gram], damping=0.1)
    assert torch.allclose(target, w, atol=1e-10)
    lam = 0.1 * float(gram.diagonal().mean())
    assert torch.allclose(root @ root.T, gram + lam * torch.eye(20, dtype=torch.float64))


def test_compensated_factors_fit_the_dense_outputs_better_than_whitening():
    torch.manual_seed(0)
    w = torch.randn(16, 24, dtype=torch.float64)
    x = torch.randn(400, 24, dtype=torch.float64) @ torch.randn(24, 24, dtype=torch.float64)
    x_student = x + 0.3 * torch.randn_like(x)  # upstream compression error
    gram = x_student.T @ x_student
    (target,), root = compensated_targets([w], gram, [w @ x.T @ x_student], damping=1e-6)
    # Full rank: the least-squares map, better than the weight itself.
    assert _objective(w, target, x, x_student) < 0.95 * _objective(w, w, x, x_student)
    for rank in (4, 8):
        A, B, _, _ = factorize_matrix(target, rank, "exact",
                                      weighting=Weighting("whiten", root))
        A0, B0, _, _ = factorize_matrix(w, rank, "exact",
                                        weighting=Weighting("whiten", psd_root(gram)))
        assert _objective(w, A @ B, x, x_student) < _objective(w, A0 @ B0, x, x_student)


@pytest.mark.parametrize("width", [4, 40])  # narrower than the input: outputs kept; wider: inputs
def test_paired_sums_are_the_least_squares_products(width):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(16, width), torch.nn.Linear(16, 3, bias=False)]
    student = torch.nn.Linear(16, width)
    xs = [torch.randn(5, 16) for _ in range(3)]
    x_students = [x + 0.1 * torch.randn_like(x) for x in xs]
    weights = [layer.weight.detach() for layer in layers]
    paired = _PairedInputs({"g": list(zip(layers, weights))})
    assert paired.keeps_outputs["g"] == (width + 3 < 16)
    for x in xs:  # the dense block runs every layer of the group
        for layer in layers:
            layer(x)
    handle = paired.student("g", student)
    for paired.batch, x in enumerate(x_students):
        with pytest.raises(_Reached):
            student(x)
    handle.remove()
    paired.remove()
    gram, products = paired.sums("g")
    x, x_student = torch.cat(xs).double(), torch.cat(x_students).double()
    assert torch.allclose(gram, x_student.T @ x_student, atol=1e-4)
    for w, product in zip(weights, products):
        assert torch.allclose(product, w.double() @ x.T @ x_student, atol=1e-4)


def _compress(model_dir, out, compensate):
    spec = lowrank.default_pipeline()
    spec.stages = ["calibrate", *spec.stages]
    spec.settings["calibrate"] = {"samples": 64}
    spec.settings["plan"] = {"rank": 6}
    spec.settings["factorize"] = {"compensate": compensate, "compensate_damping": 0.01}
    return lowrank.run_pipeline(spec, model_dir, out, cache_dir=out.parent / "cache")


def _output_error(model_dir, out, texts):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        dense = load_dense(model_dir)(**batch, output_hidden_states=True).hidden_states[-1]
        low = lowrank.load(out)(**batch, output_hidden_states=True).hidden_states[-1]
    mask = batch["attention_mask"].bool()
    return float((dense - low)[mask].pow(2).sum() / dense[mask].pow(2).sum())


def test_compensation_lowers_the_output_error_on_a_decoder(tiny_llama_dir, tmp_path):
    plain = _compress(tiny_llama_dir, tmp_path / "plain", False)
    comp = _compress(tiny_llama_dir, tmp_path / "comp", True)
    a, b = (plain.artifacts["factorize"].tensors, comp.artifacts["factorize"].tensors)
    assert a.keys() == b.keys()
    # Every block after the first sees compressed inputs: its factors change.
    assert not torch.allclose(a["model.layers.1.mlp.down_proj.B"],
                              b["model.layers.1.mlp.down_proj.B"])
    texts = read_calibration_text(None, 64)  # the calibration text: what the fit is on
    assert _output_error(tiny_llama_dir, comp.output, texts) \
        < _output_error(tiny_llama_dir, plain.output, texts)
    result = comp.artifacts["factorize"].layers["model.layers.1.mlp.down_proj.weight"]
    assert result.rank == 6 and result.method == "gram+whiten+compensated"
    w = load_dense(tiny_llama_dir).model.layers[1].mlp.down_proj.weight.detach()
    ab = b["model.layers.1.mlp.down_proj.A"] @ b["model.layers.1.mlp.down_proj.B"]
    assert result.rel_error == pytest.approx(float((w - ab).norm() / w.norm()), rel=1e-4)
