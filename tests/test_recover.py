"""Recovery by distillation, the evaluate stage, sequential statistics and the sensitivity probe,
on small randomly initialized HF models (quality claims are in benchmarks/quality.py)."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

import lowrank
from lowrank.io.samples import read_calibration_text
from lowrank.models import load_dense, output_tensor
from lowrank.nn.adapters import (
    BlockRotation,
    adapter_config,
    adapter_state,
    add_adapters_,
    lowrank_modules,
    merge_adapters_,
    peft_key,
    save_adapters,
)
from lowrank.nn.layers import LowRankConv, LowRankEmbedding, LowRankLinear
from lowrank.nn.recurrent import LowRankRNN
from lowrank.stages.recover import RecoverSettings, distill


def compress(model_dir, tmp_path, stages=(), name="out", **settings):
    spec = lowrank.default_pipeline()
    spec.stages = ["calibrate", *spec.stages, *stages]
    spec.settings["calibrate"] = {"samples": 64}
    spec.settings["plan"] = {"rank": 8}
    for stage, values in settings.items():
        spec.settings.setdefault(stage, {}).update(values)
    return lowrank.run_pipeline(spec, model_dir, tmp_path / name, cache_dir=tmp_path / "cache")


@pytest.fixture(scope="module")
def factored(tiny_bert_dir, tmp_path_factory):
    return compress(tiny_bert_dir, tmp_path_factory.mktemp("factored"))


@pytest.mark.parametrize("method", ["lora", "orthogonal", "factors"])
def test_recovery_lowers_the_loss_and_merging_keeps_ranks(tiny_bert_dir, factored, method):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    teacher = load_dense(tiny_bert_dir)
    student = lowrank.load(factored.output)
    texts = read_calibration_text(None, 256)
    log = distill(student, teacher, tokenizer, texts,
                  RecoverSettings(method=method, steps=40, batch_size=16, lr=1e-2 if method != "factors" else 3e-3))
    assert log.heldout_after < 0.9 * log.heldout_before
    batch = tokenizer(texts[:8], padding=True, return_tensors="pt")
    with torch.no_grad():
        adapted = student(**batch).last_hidden_state
    if method == "orthogonal":
        for module in lowrank_modules(student).values():
            rotation = module.parametrizations.B[0]
            assert isinstance(rotation, BlockRotation)
            r = rotation.rotation()
            assert torch.allclose(r.T @ r, torch.eye(r.shape[0]), atol=1e-5)
    merge_adapters_(student)
    with torch.no_grad():
        merged = student(**batch).last_hidden_state
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-4)  # merging is exact
    for module in lowrank_modules(student).values():
        assert isinstance(module.A, torch.nn.Parameter) and module.A.shape[1] == 8
        assert module.B.shape[0] == 8  # the planned rank, unchanged


def test_bfloat16_recovery_trains_about_as_well_as_float32(tiny_bert_dir, factored):
    """dtype bfloat16 (the default where the CPU has it): the passes autocast, the adapters and
    the optimizer stay float32."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    teacher = load_dense(tiny_bert_dir)
    texts = read_calibration_text(None, 256)
    logs = {}
    for dtype in ("float32", "bfloat16"):
        student = lowrank.load(factored.output)
        logs[dtype] = distill(student, teacher, tokenizer, texts,
                              RecoverSettings(steps=40, batch_size=16, lr=1e-2, dtype=dtype))
        assert all(p.dtype == torch.float32 for p in student.parameters())
    full, half = logs["float32"], logs["bfloat16"]
    assert (full.pass_dtype, half.pass_dtype) == ("float32", "bfloat16")
    assert full.heldout_before == pytest.approx(half.heldout_before, rel=0.05)
    assert half.losses != full.losses  # the bf16 passes really ran
    gain_full = full.heldout_before - full.heldout_after
    gain_half = half.heldout_before - half.heldout_after
    assert gain_half > 0.8 * gain_full
    with pytest.raises(lowrank.InputError, match="recovery dtype"):
        RecoverSettings(dtype="half")


def test_lora_adapters_use_peft_layout(tiny_bert_dir, factored):
    student = lowrank.load(factored.output)
    settings = RecoverSettings(method="lora", rank=4, alpha=8, steps=2, samples=64)
    distill(student, load_dense(tiny_bert_dir), AutoTokenizer.from_pretrained(tiny_bert_dir),
            read_calibration_text(None, 64), settings)
    state = adapter_state(student)
    # PEFT's LoRA on parameters: B's wrapper is outermost, A's one base_layer deeper.
    key = "base_model.model.encoder.layer.0.attention.self.query"
    assert state[f"{key}.lora_A.weight"].shape == (4, 64)  # B (8 x 64): (q, in)
    assert state[f"{key}.lora_B.weight"].shape == (8, 4)  # (r, q)
    assert state[f"{key}.base_layer.lora_A.weight"].shape == (4, 8)  # A (64 x 8): (q, r)
    assert state[f"{key}.base_layer.lora_B.weight"].shape == (64, 4)  # (out, q)
    assert sum(".lora_" in k for k in state) == 4 * len(lowrank_modules(student))
    # The biases and norms trained with them (train_norms), under the PeftModel's names.
    assert state[f"{key}.base_layer.base_layer.bias"].shape == (64,)
    assert state["base_model.model.embeddings.LayerNorm.weight"].shape == (64,)
    trained = [n for n, p in student.named_parameters() if p.requires_grad]
    assert len(state) == len(trained)  # every trained tensor, once
    config = adapter_config(student, settings, None)
    assert config["target_modules"] == [] and config["rank_pattern"] == {}
    assert len(config["target_parameters"]) == 2 * len(lowrank_modules(student))
    assert "encoder.layer.0.attention.self.query.A" in config["target_parameters"]


def assert_peft_reproduces_merged(base, student, settings, tmp_path, inputs):
    """Save ``student``'s LoRA adapters, load them with PEFT over ``base`` (the same model
    before adapters), and compare with ``student`` merged."""
    from peft import PeftModel

    save_adapters(adapter_state(student), adapter_config(student, settings, None), tmp_path)
    peft_model = PeftModel.from_pretrained(base, tmp_path).eval()
    merge_adapters_(student)
    with torch.no_grad():
        expected, got = output_tensor(student(**inputs)), output_tensor(peft_model(**inputs))
        with peft_model.disable_adapter():
            before = output_tensor(peft_model(**inputs))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert (before - expected).abs().max() > 1e-3  # the adapters did change the model


# PEFT 0.21 checks rank_pattern keys against targeted modules only and warns that the
# per-parameter keys matched nothing, although it applies them (the shapes would not load
# otherwise).
peft_rank_warning = pytest.mark.filterwarnings("ignore:The following rank_pattern keys")


@peft_rank_warning
def test_peft_loads_the_adapters_over_the_factored_model(tiny_bert_dir, tmp_path):
    pytest.importorskip("peft")
    # An energy plan gives ranks from 1 to 31: with q = 4 some factors get the full q and
    # some are narrower (their own rank in rank_pattern).
    factored = compress(tiny_bert_dir, tmp_path, plan={"rank": None, "energy": 0.5})
    student = lowrank.load(factored.output)
    base = copy.deepcopy(student)  # the factors before recovery, which the adapters apply to
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    texts = read_calibration_text(None, 64)
    settings = RecoverSettings(method="lora", rank=4, alpha=8, steps=4, batch_size=16,
                               samples=64, lr=1e-2)
    distill(student, load_dense(tiny_bert_dir), tokenizer, texts, settings)
    config = adapter_config(student, settings, None)
    assert config["rank_pattern"] and len(config["rank_pattern"]) < len(config["target_parameters"])
    inputs = dict(tokenizer(texts[:8], padding=True, return_tensors="pt"))
    assert_peft_reproduces_merged(base, student, settings, tmp_path / "adapters", inputs)


@peft_rank_warning
def test_peft_over_the_unrecovered_output_equals_the_recovered_output(tiny_bert_dir, tmp_path):
    peft = pytest.importorskip("peft")
    recover = {"method": "lora", "steps": 5, "samples": 64, "rank": 4, "lr": 1e-2}
    recovered = compress(tiny_bert_dir, tmp_path, stages=("recover",), recover=recover).output
    plain = compress(tiny_bert_dir, tmp_path, name="plain").output  # factorize from the cache
    model = peft.PeftModel.from_pretrained(lowrank.load(plain), recovered / "adapters").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    batch = tokenizer(read_calibration_text(None, 8), padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = lowrank.load(recovered)(**batch).last_hidden_state
        torch.testing.assert_close(model(**batch).last_hidden_state, expected, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(lowrank.load(plain)(**batch).last_hidden_state, expected, atol=1e-3)


class FactorZoo(torch.nn.Module):
    """One of each low-rank module type: embedding, conv, LSTM factors, linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = LowRankEmbedding(50, 12, 3)
        self.conv = LowRankConv(torch.nn.Conv1d(12, 10, 3, padding=1), 5)
        self.lstm = LowRankRNN(torch.nn.LSTM(10, 8, batch_first=True), {"weight_ih_l0": 6})
        self.head = LowRankLinear(8, 4, 2)
        for p in self.parameters():
            torch.nn.init.normal_(p, std=0.5)

    def forward(self, ids):
        x = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)
        return self.head(self.lstm(x)[0])


@peft_rank_warning
def test_peft_loads_adapters_on_every_factor_type(tmp_path):
    pytest.importorskip("peft")
    student = FactorZoo()
    base = copy.deepcopy(student)
    settings = RecoverSettings(method="lora", rank=4, alpha=6)
    add_adapters_(student, settings)
    with torch.no_grad():  # as if trained: a nonzero correction on every factor
        for name, p in student.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.3)
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    assert_peft_reproduces_merged(base, student, settings, tmp_path, {"ids": ids})


def test_compress_with_recovery_and_evaluation_writes_report(tiny_bert_dir, tmp_path):
    result = compress(tiny_bert_dir, tmp_path, stages=("recover", "evaluate"),
                      recover={"method": "lora", "steps": 5, "samples": 64, "rank": 4},
                      evaluate={"samples": 100})
    out = result.output
    report = json.loads((out / "report.json").read_text())
    assert report["format"] == "lowrank.report" and report["version"] == 1
    assert report["recovery"]["method"] == "lora"
    assert report["recovery"]["settings"]["replace_share"] == 0.15  # an encoder's, resolved
    assert report["fidelity"]["kind"] == "encoder" and 0 < report["fidelity"]["cosine"] <= 1
    assert report["fidelity"]["samples"] == 100
    config = json.loads((out / "adapters" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    adapters = load_file(str(out / "adapters" / "adapter_model.safetensors"))
    assert config["target_modules"] == [] and config["target_parameters"]
    assert {k for k in adapters if ".lora_" in k} == {
        f"{peft_key(*name.rsplit('.', 1))}.lora_{ab}.weight"
        for name in config["target_parameters"] for ab in "AB"}
    # The recovered factors replaced the plain ones, at the same ranks.
    model = lowrank.load(out)
    assert all(m.rank == 8 for m in lowrank_modules(model).values())
    # A rerun reuses every stage from the cache.
    again = compress(tiny_bert_dir, tmp_path, stages=("recover", "evaluate"), name="again",
                     recover={"method": "lora", "steps": 5, "samples": 64, "rank": 4},
                     evaluate={"samples": 100})
    assert all(st["cached"] for st in again.manifest["stages"])
    assert again.report["fidelity"] == report["fidelity"]


@pytest.mark.parametrize("model_dir, method", [("tiny_bert_dir", "factors"),
                                               ("tiny_llama_dir", "lora")])
def test_auto_method_trains_an_encoders_factors_and_a_causal_lms_lora(model_dir, method,
                                                                     request, tmp_path):
    result = compress(request.getfixturevalue(model_dir), tmp_path, stages=("recover",),
                      recover={"steps": 2, "samples": 32, "batch_size": 8})
    recovery = result.report["recovery"]
    assert recovery["method"] == recovery["settings"]["method"] == method  # resolved, recorded
    assert (result.output / "adapters").is_dir() == (method == "lora")
    assert "discarded" not in recovery


def test_recovery_that_raises_the_heldout_loss_is_discarded(tiny_bert_dir, tmp_path):
    """Two full-size steps on the factors (lr 1): the held-back batch's loss rises, so the
    output is the factored model as it was, with a warning and report.json saying so."""
    with pytest.warns(lowrank.LowrankWarning, match="raised the held-out loss"):
        result = compress(tiny_bert_dir, tmp_path, stages=("recover",), recover={
            "method": "factors", "steps": 2, "lr": 1.0, "samples": 32, "batch_size": 8})
    recovery = result.report["recovery"]
    assert recovery["discarded"] is True
    assert recovery["heldout_loss_after"] > recovery["heldout_loss_before"]
    plain = compress(tiny_bert_dir, tmp_path, name="plain")
    kept, before = (load_file(str(r.output / "model.safetensors")) for r in (result, plain))
    assert kept.keys() == before.keys() and all(torch.equal(kept[k], before[k]) for k in kept)
    assert "(worse: discarded)" in (result.output / "report.md").read_text()


def test_adapters_need_a_resolved_method():
    with pytest.raises(ValueError, match="resolve"):
        add_adapters_(FactorZoo(), RecoverSettings())


def test_evaluation_never_uses_calibration_text(tiny_bert_dir, tmp_path):
    text = tmp_path / "text.txt"
    lines = read_calibration_text(None, 300)
    text.write_text("\n".join(lines) + "\n")
    result = compress(tiny_bert_dir, tmp_path, stages=("evaluate",),
                      calibrate={"calibration_file": str(text), "samples": 200},
                      evaluate={"eval_file": str(text)})
    fidelity = result.report["fidelity"]
    assert fidelity["dropped_overlapping_lines"] >= 200
    assert fidelity["samples"] == len(set(lines) - set(lines[:200])) or fidelity["samples"] <= 100
    with pytest.raises(lowrank.InputError, match="evaluation lines left"):
        compress(tiny_bert_dir, tmp_path, stages=("evaluate",), name="all-seen",
                 calibrate={"calibration_file": str(text), "samples": 300},
                 evaluate={"eval_file": str(text)})


def test_causal_lm_recovers_on_logits_and_reports_perplexity(tiny_llama_dir, tmp_path):
    result = compress(tiny_llama_dir, tmp_path, stages=("recover", "evaluate"),
                      recover={"method": "factors", "steps": 12, "samples": 64, "lr": 3e-3,
                               "batch_size": 8},
                      evaluate={"samples": 32, "batch_size": 8})
    recovery, fidelity = result.report["recovery"], result.report["fidelity"]
    assert recovery["heldout_loss_after"] < recovery["heldout_loss_before"]
    assert recovery["settings"]["replace_share"] == 0.0  # a causal LM's, resolved
    assert fidelity["kind"] == "causal-lm"
    assert fidelity["perplexity"] > 1 and fidelity["perplexity_dense"] > 1


def test_sequential_groups_follow_execution_order(tiny_bert_dir):
    from lowrank.stages.sequential import execution_groups

    model = load_dense(tiny_bert_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    names = [n for n, p in model.named_parameters() if p.dim() == 2]
    inputs = dict(tokenizer(["a test sentence"], return_tensors="pt"))
    groups = execution_groups(model, inputs, list(reversed(names)))
    firsts = [g[0] for g in groups]
    assert firsts[0].startswith("embeddings.")
    layer0 = next(g for g in groups if g[0].startswith("encoder.layer.0."))
    assert [n.split(".")[-2] for n in layer0[:3]] == ["query", "key", "value"]
    assert groups.index(layer0) < next(i for i, g in enumerate(groups)
                                       if g[0].startswith("encoder.layer.1."))


def test_sequential_statistics_change_only_downstream_factors(tiny_bert_dir, tmp_path):
    plain = compress(tiny_bert_dir, tmp_path, name="plain").artifacts["factorize"].tensors
    seq = compress(tiny_bert_dir, tmp_path, name="seq",
                   factorize={"sequential": True}).artifacts["factorize"].tensors
    first = "embeddings.word_embeddings.A"  # group 0 sees the dense model's inputs either way
    assert torch.equal(plain[first], seq[first])
    later = "encoder.layer.1.output.dense.B"
    assert not torch.allclose(plain[later], seq[later])


def test_sensitivity_probe_is_cached_and_steers_the_plan(tiny_bert_dir, tmp_path):
    from lowrank.stages.sensitivity import layer_weights

    first = _run_with_sensitivity(tiny_bert_dir, tmp_path, "s1")
    second = _run_with_sensitivity(tiny_bert_dir, tmp_path, "s2")
    probe = first.artifacts["sensitivity"]
    assert probe and all(len(losses) == 2 for losses in probe.values())
    # A larger rank loses less, layer by layer.
    for losses in probe.values():
        small, large = sorted(losses, key=int)
        assert losses[large] <= losses[small] + 1e-6
    assert [st["cached"] for st in second.manifest["stages"] if st["stage"] == "sensitivity"] == [True]
    weights = layer_weights(probe, first.artifacts["analyze"])
    assert sorted(weights.values())[len(weights) // 2] == pytest.approx(1.0)
    assert first.artifacts["plan"].policy["sensitivity_weights"]


def _run_with_sensitivity(model_dir, tmp_path, name):
    spec = lowrank.default_pipeline()
    spec.stages = ["calibrate", "analyze", "sensitivity", "plan", "factorize"]
    spec.settings["calibrate"] = {"samples": 64}
    spec.settings["sensitivity"] = {"samples": 16}
    spec.settings["plan"] = {"param_ratio": 0.8}
    return lowrank.run_pipeline(spec, model_dir, tmp_path / name, cache_dir=tmp_path / "cache")


def test_sensitivity_weights_move_rank_to_the_sensitive_layer(tiny_bert_dir):
    spectra = lowrank.analyze(lowrank.open_checkpoint(tiny_bert_dir))
    settings = lowrank.PlanSettings(param_ratio=0.985, include=("encoder.*",))  # ~half of the encoder
    base = lowrank.make_plan(spectra, settings)
    target = next(n for n, layer in base.factored().items() if "encoder" in n)
    weighted = lowrank.make_plan(spectra, settings, {target: 50.0})
    assert (weighted.layers[target].rank or 10**9) > base.layers[target].rank
    assert abs(weighted.params_after - base.params_after) <= 0.01 * spectra.total_params


def test_tensor_calibration_for_non_text_inputs(tiny_bert_dir, tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    good = tmp_path / "inputs.safetensors"
    save_file({"input_ids": torch.randint(1000, 2000, (24, 12), generator=g)}, str(good))
    result = compress(tiny_bert_dir, tmp_path, name="tensors",
                      calibrate={"calibration_file": str(good), "samples": 24})
    methods = {e.get("method") for e in result.report["layers"].values() if e["rank"]}
    assert any("+whiten" in m for m in methods)
    bad = tmp_path / "bad.safetensors"
    save_file({"input_ids": torch.zeros(4, 3, dtype=torch.long),
               "attention_mask": torch.ones(5, 3, dtype=torch.long)}, str(bad))
    with pytest.raises(lowrank.InputError, match="same, non-zero first"):
        compress(tiny_bert_dir, tmp_path, name="bad", calibrate={"calibration_file": str(bad)})
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x02not a pickle")
    with pytest.raises(lowrank.InputError, match="not a readable tensor file"):
        compress(tiny_bert_dir, tmp_path, name="garbage", calibrate={"calibration_file": str(garbage)})
