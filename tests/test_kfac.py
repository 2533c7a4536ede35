"""Two-sided (KFAC) whitening and outlier handling in calibration (issue 11 items 2 and 3)."""

import json

import pytest
import torch
from click.testing import CliRunner

from lowrank.cli import main
from lowrank.io.samples import read_calibration
from lowrank.linalg import factorize_matrix
from lowrank.stages.calibrate import ActivationStats, CalibrateSettings, collect_stats
from lowrank.weighting import Weighting, make_weighting, shrink

UP = "model.layers.0.mlp.up_proj.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"


def _llama(path):
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def _stats(model, tokenizer, lines, **settings):
    return collect_stats(model, tokenizer, lines, CalibrateSettings(batch_size=8, **settings))


def _fisher_error(w, A, B, stats, name):
    """tr(G_g Δ G_x Δᵀ): the Kronecker-factored Fisher estimate of the loss from Δ = W − AB."""
    d = w.double() - A.double() @ B.double()
    return float(torch.trace(stats.out_grams[name] @ d @ stats.grams[name] @ d.T))


def test_kfac_factors_lower_the_fisher_weighted_error(tiny_llama_dir):
    model, tokenizer = _llama(tiny_llama_dir)
    lines = read_calibration(None, 48)
    stats = _stats(model, tokenizer, lines, method="kfac")
    assert stats.out_grams[UP].shape == (128, 128) and stats.grams[UP].shape == (64, 64)
    assert "lm_head.weight" not in stats.out_grams  # the LM head keeps one-sided weighting
    for name in (UP, DOWN, "model.layers.1.self_attn.o_proj.weight"):
        w = dict(model.named_parameters())[name].detach()
        kfac = stats.weighting(name, w.shape[1])
        assert kfac.kind == "kfac"
        whiten = kfac.one_sided()
        rank = min(w.shape) // 4
        A, B, _, _ = factorize_matrix(w, rank, "exact", weighting=kfac)
        A1, B1, _, _ = factorize_matrix(w, rank, "exact", weighting=whiten)
        two_sided, one_sided = (_fisher_error(w, A, B, stats, name),
                                _fisher_error(w, A1, B1, stats, name))
        assert two_sided < 0.95 * one_sided, (name, two_sided, one_sided)


def test_shrinkage_keeps_a_rank_deficient_output_gram_finite():
    torch.manual_seed(0)
    w, x = torch.randn(32, 24), torch.randn(500, 24)
    v = torch.randn(32, 2)
    stats = ActivationStats(grams={"w": (x.T @ x).double()}, abs_sums={"w": x.abs().sum(0).double()},
                            out_grams={"w": (v @ v.T).double()})  # rank 2 of 32
    assert torch.linalg.eigvalsh(stats.out_grams["w"]).min() < 1e-10
    assert torch.linalg.eigvalsh(shrink(stats.out_grams["w"], 0.05)).min() > 0
    wt = make_weighting("w", stats, "kfac", shrinkage=0.05)
    A, B, _, error = factorize_matrix(w, 8, "exact", weighting=wt)
    assert torch.isfinite(A).all() and torch.isfinite(B).all() and 0 < error < 1
    # Unshrunk, the inverse square root of G_g does not exist: the factors blow up.
    bare = make_weighting("w", stats, "kfac", shrinkage=0.0)
    A0, _, _, _ = factorize_matrix(w, 8, "exact", weighting=bare)
    assert not torch.isfinite(A0).all() or A0.abs().max() > 1e4 * A.abs().max()
    # No output Gram: one-sided whitening.
    assert make_weighting("w", ActivationStats(grams=stats.grams), "kfac").kind == "whiten"


@pytest.mark.parametrize("fixture,blocks", [("tiny_llama_dir", "model.layers.*"),
                                            ("tiny_bert_dir", "encoder.*")])
def test_data_method_kfac_end_to_end(fixture, blocks, request, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "compress", str(request.getfixturevalue(fixture)), str(out), "--rank-fraction", "0.25",
        "--include", blocks, "--calibration", "--calibration-samples", "16",
        "--data-method", "kfac", "--outliers", "skip-first", "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    layers = json.loads((out / "lowrank_config.json").read_text())["layers"]
    methods = {e["method"] for e in layers.values() if e.get("rank") is not None}
    assert methods == {"gram+kfac"}, methods


def _massive_first_token(model, name=DOWN, factor=300.0):
    """A pre-hook adding a huge vector to the first token's input of ``name`` (as at the
    attention-sink position of LLaMA-family LMs), a different one per sequence: registered
    before calibration's hooks, so they see it."""
    module = model.get_submodule(name.rsplit(".", 1)[0])

    def hook(mod, args):
        x = args[0].clone()
        spikes = torch.randn(x.shape[0], x.shape[-1], generator=torch.Generator().manual_seed(0))
        x[:, 0] += factor * x[:, 1:].std() * spikes
        return (x,)
    return module.register_forward_pre_hook(hook)


@pytest.mark.parametrize("outliers", ["skip-first", "clip"])
def test_outlier_handling_on_a_model_with_a_massive_activation(tiny_llama_dir, outliers):
    model, tokenizer = _llama(tiny_llama_dir)
    handle = _massive_first_token(model)
    lines = read_calibration(None, 64)
    calib, held_out = lines[:32], lines[32:]
    inputs = {"output_grams": False}  # down_proj's input Gram, whose trace is read below
    kept = _stats(model, tokenizer, calib, **inputs)
    # Clip at 2x the median norm: here one token in ~20 is an outlier (sequences are short).
    handled = _stats(model, tokenizer, calib, outliers=outliers, outlier_factor=2.0, **inputs)
    # Held-out inputs of down_proj at every position but the first (the normal tokens).
    rows = []
    hook = model.get_submodule(DOWN[:-len(".weight")]).register_forward_pre_hook(
        lambda mod, args: rows.append(args[0][:, 1:].reshape(-1, args[0].shape[-1]).detach()))
    batch = tokenizer(held_out, return_tensors="pt", padding=True, truncation=True, max_length=64)
    with torch.inference_mode():
        model(**batch)
    hook.remove()
    mask = batch["attention_mask"][:, 1:].reshape(-1).bool()
    x = torch.cat(rows)[mask].double()
    # The statistics: the first tokens (one in ~20) held nearly all of the Gram's trace; handled,
    # a small part (skip-first: the Gram of the other tokens, the reference, by construction).
    normal = float(_stats(model, tokenizer, calib, outliers="skip-first",
                          **inputs).grams[DOWN].trace())
    handle.remove()
    share = {label: 1 - normal / float(stats.grams[DOWN].trace())
             for label, stats in (("keep", kept), (outliers, handled))}
    assert share["keep"] > 0.9 and share[outliers] < 0.5, share
    # Output error on the normal tokens at the same rank: lower with the outliers handled.
    w = dict(model.named_parameters())[DOWN].detach().double()
    errors = {}
    for label, stats in (("keep", kept), (outliers, handled)):
        A, B, _, _ = factorize_matrix(w, 12, "exact", weighting=stats.weighting(DOWN, 128))
        residual = x @ (w - A.double() @ B.double()).T
        errors[label] = float(residual.pow(2).sum() / (x @ w.T).pow(2).sum())
    assert errors[outliers] < 0.95 * errors["keep"], errors


def test_weighting_one_sided_keeps_other_kinds():
    wt = Weighting("scale", torch.ones(3))
    assert wt.one_sided() is wt
