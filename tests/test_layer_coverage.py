"""Layer coverage: a CNN and an LSTM classifier trained here on scikit-learn's digits and
compressed through the public API and the CLI (``--model-factory``), recurrent layers against
torch, tied LM heads, and bad factory values.

The factories below are what ``--model-factory tests.test_layer_coverage:digits_cnn`` imports.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from torch import nn

import lowrank
from lowrank.cli import main
from lowrank.linalg import factorize_matrix
from lowrank.nn.layers import LowRankFactors, TiedLowRankLinear
from lowrank.nn.recurrent import LowRankRNN
from lowrank.nn.swap import swap_lowrank_
from lowrank.pipeline import PipelineSpec
from lowrank.stages.factored import reconstruct_dense

HERE = "tests.test_layer_coverage"


# --------------------------------------------------------------------------------------------
# Models and factories


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, pixels):  # (N, 1, 8, 8)
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(pixels)))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class DigitsLSTM(nn.Module):
    """The image's 8 rows as a sequence of 8 features."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 64, num_layers=2, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, rows):  # (N, 8, 8)
        out, _ = self.lstm(rows)
        return self.head(out[:, -1])


class TiedToy(nn.Module):
    """An embedding whose table is also the output layer (``tie=True``: tied in code too)."""

    def __init__(self, tie: bool = False):
        super().__init__()
        self.emb = nn.Embedding(300, 32)
        self.mix = nn.Linear(32, 32)
        self.head = nn.Linear(32, 300, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.emb(ids))))


def digits_cnn():
    return DigitsCNN()


def digits_lstm():
    return DigitsLSTM()


NOT_CALLABLE = 42


def not_a_module():
    return 42


# --------------------------------------------------------------------------------------------
# Data and training (fixed seeds; a few seconds on 2 cores)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: a second intra-op thread only spins, and on a busy machine the
    spinning costs many times the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(model, x, y, epochs, lr):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=order)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Trained CNN (.safetensors) and LSTM (.pt) checkpoints; calibration inputs from the
    training split, evaluation inputs with labels from the held-out split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1200], perm[1200:]
    tmp = tmp_path_factory.mktemp("digits")
    files = {}
    for name, build, shape, epochs, lr in (("cnn", DigitsCNN, (-1, 1, 8, 8), 10, 3e-3),
                                           ("lstm", DigitsLSTM, (-1, 8, 8), 15, 1e-2)):
        torch.manual_seed(0)
        images = x.view(shape)
        model = _train(build(), images[train], y[train], epochs, lr)
        key = "pixels" if name == "cnn" else "rows"
        calib, evaluation = tmp / f"{name}-calib.safetensors", tmp / f"{name}-eval.safetensors"
        save_file({key: images[train[:256]].contiguous()}, str(calib))
        save_file({key: images[test].contiguous(), "labels": y[test]}, str(evaluation))
        if name == "cnn":
            path = tmp / "cnn.safetensors"
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        else:
            path = tmp / "lstm.pt"
            torch.save(model.state_dict(), path)
        files[name] = {"model": path, "calib": calib, "eval": evaluation}
    return files


def _spec(files, plan: dict, export: bool = False) -> PipelineSpec:
    stages = ["calibrate", "analyze", "plan", "factorize"] + (["export"] if export else [])
    settings = {"calibrate": {"calibration_file": str(files["calib"]), "samples": 256},
                "plan": {"min_numel": 1000, **plan},
                "evaluate": {"eval_file": str(files["eval"])}}
    if export:
        settings["export"] = {"inputs_file": str(files["calib"])}
    return PipelineSpec(stages + ["evaluate"], settings)


def _accuracy_line(name: str, rank: str, f: dict) -> str:
    return (f"{name} {rank}: accuracy dense {f['accuracy_dense']:.4f} -> compressed "
            f"{f['accuracy']:.4f} (top-1 agreement {f['top1_agreement']:.4f})")


# --------------------------------------------------------------------------------------------
# CNN through the public API: data-aware conv factors, accuracy, ONNX export


def test_cnn_digits_compressed_accuracy_and_onnx(digits, tmp_path):
    files = digits["cnn"]
    moderate = lowrank.run_pipeline(_spec(files, {"rank_fraction": 0.5}, export=True),
                                    files["model"], tmp_path / "cnn-r50",
                                    model_factory=f"{HERE}:digits_cnn")
    low = lowrank.run_pipeline(_spec(files, {"rank": 1}), files["model"], tmp_path / "cnn-r1",
                               model_factory=digits_cnn)
    fm, fl = moderate.report["fidelity"], low.report["fidelity"]
    print("\n" + _accuracy_line("CNN", "rank 0.5·min(m,n)", fm))
    print(_accuracy_line("CNN", "rank 1", fl))
    layers = moderate.report["layers"]
    assert layers["conv2.weight"]["rank"] == 16 and layers["fc1.weight"]["rank"] == 32
    # conv patches reached the calibration: data-aware factors for the conv
    assert "+whiten" in layers["conv2.weight"]["method"]
    assert fm["kind"] == "classifier" and fm["samples"] == 597
    assert fm["accuracy_dense"] > 0.93
    assert fm["accuracy"] >= fm["accuracy_dense"] - 0.03
    assert fl["accuracy"] <= fm["accuracy_dense"] - 0.2  # rank 1 must hurt: the test can fail
    export = moderate.report["export"]
    assert all(v["ok"] for v in export["validation"]) and export["factors"]["factors"] == 4
    assert (tmp_path / "cnn-r50" / "onnx" / "model.onnx").is_file()
    # the output loads into the dense architecture and equals it with A·B as weights
    model = lowrank.load(tmp_path / "cnn-r50", model=digits_cnn())
    state = load_file(str(tmp_path / "cnn-r50" / "model.safetensors"))
    config = json.loads((tmp_path / "cnn-r50" / "lowrank_config.json").read_text())
    dense = digits_cnn()
    dense.load_state_dict(reconstruct_dense(state, config))
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(model(x), dense(x), atol=1e-5, rtol=1e-4)
    # `lowrank export` of the output, with the factory and example inputs
    result = CliRunner().invoke(main, ["export", str(tmp_path / "cnn-r50"), str(tmp_path / "onnx"),
                                       "--model-factory", f"{HERE}:digits_cnn",
                                       "--inputs", str(files["calib"])])
    assert result.exit_code == 0, result.output
    assert "input 1x1x8x8" in result.output and (tmp_path / "onnx" / "model.onnx").is_file()


# --------------------------------------------------------------------------------------------
# LSTM through the CLI with --model-factory


def test_lstm_digits_through_cli_with_model_factory(digits, tmp_path):
    files = digits["lstm"]
    out = tmp_path / "lstm-r32"
    result = CliRunner().invoke(main, [
        "compress", str(files["model"]), str(out), "--model-factory", f"{HERE}:digits_lstm",
        "--rank", "32", "--min-numel", "4096", "--calibration", str(files["calib"]),
        "--calibration-samples", "256", "--recover", "factors", "--recover-steps", "20",
        "--recover-text", str(files["calib"]), "--export", "onnx",
        "--evaluate", str(files["eval"]), "--no-cache"])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output  # the summary line
    report = json.loads((out / "report.json").read_text())
    recovery = report["recovery"]  # distillation on the output tensor (loss "outputs")
    assert recovery["method"] == "factors" and len(recovery["loss_curve"]) == 20
    assert recovery["heldout_loss_after"] < 0.01  # rank 32 starts close; it stays close
    assert all(v["ok"] for v in report["export"]["validation"])  # the recurrence, unrolled
    assert report["export"]["factors"]["factors"] == 6
    low = lowrank.run_pipeline(_spec(files, {"rank": 2, "min_numel": 4096}), files["model"],
                               tmp_path / "lstm-r2", model_factory=digits_lstm)
    fm, fl = report["fidelity"], low.report["fidelity"]
    result = CliRunner().invoke(main, [
        "plan", str(files["model"]), "-o", str(tmp_path / "plan.json"), "--rank", "32",
        "--min-numel", "4096", "--model-factory", f"{HERE}:digits_lstm",
        "--calibration", str(files["calib"]), "--calibration-samples", "256", "--json"])
    assert result.exit_code == 0, result.output
    planned = json.loads((tmp_path / "plan.json").read_text())["layers"]
    assert planned["lstm.weight_hh_l1"]["rank"] == 32
    print("\n" + _accuracy_line("LSTM", "rank 32", fm))
    print(_accuracy_line("LSTM", "rank 2", fl))
    layers = report["layers"]
    for name in ("lstm.weight_hh_l0", "lstm.weight_ih_l1", "lstm.weight_hh_l1"):
        assert layers[name]["rank"] == 32 and "+whiten" in layers[name]["method"]
    assert layers["lstm.weight_ih_l0"]["rank"] is None  # 256 x 8: tiny
    assert fm["accuracy_dense"] > 0.9
    assert fm["accuracy"] >= fm["accuracy_dense"] - 0.03
    assert fl["accuracy"] <= fm["accuracy_dense"] - 0.2
    # factor names, swap and reconstruct_dense agree
    state = load_file(str(out / "model.safetensors"))
    assert {"lstm.weight_hh_l0.A", "lstm.weight_hh_l0.B", "lstm.weight_ih_l0"} <= set(state)
    assert state["lstm.weight_hh_l0.A"].shape == (256, 32)
    model = lowrank.load(out, model=f"{HERE}:digits_lstm")
    assert isinstance(model.lstm, LowRankRNN)
    dense = digits_lstm()
    config = json.loads((out / "lowrank_config.json").read_text())
    dense.load_state_dict(reconstruct_dense(state, config))
    x = torch.rand(3, 8, 8)
    torch.testing.assert_close(model(x), dense(x), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Recurrent layers against torch


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("batch_first,bidirectional", [(True, False), (False, True)])
def test_lowrank_rnn_equals_torch_at_full_rank(cls, batch_first, bidirectional):
    torch.manual_seed(0)
    holder = nn.Module()
    holder.rnn = cls(6, 5, num_layers=2, batch_first=batch_first,
                     bidirectional=bidirectional).double()
    dense = holder.rnn
    weights = {n: p.detach().clone() for n, p in dense.named_parameters() if n.startswith("weight")}
    model = swap_lowrank_(holder, {f"rnn.{n}": min(w.shape) for n, w in weights.items()})
    low = model.rnn
    assert isinstance(low, LowRankRNN)
    for n, w in weights.items():
        factors = getattr(low, n)
        assert isinstance(factors, LowRankFactors)
        A, B, _, _ = factorize_matrix(w, min(w.shape))
        factors.A.data.copy_(A)
        factors.B.data.copy_(B)
    x = torch.randn(3, 7, 6, dtype=torch.double)
    h = torch.randn(2 * (2 if bidirectional else 1), 3 if batch_first else 7, 5,
                    dtype=torch.double)
    hx = (h, torch.randn_like(h)) if cls is nn.LSTM else h
    if not batch_first:
        hx = None  # zero initial state, torch's default
    got, want = low(x, hx), dense(x, hx)
    flat = (lambda o: [o[0], *o[1]]) if cls is nn.LSTM else (lambda o: list(o))
    for g, w in zip(flat(got), flat(want)):
        torch.testing.assert_close(g, w)
    with pytest.raises(lowrank.LowrankError, match="PackedSequence"):
        low(nn.utils.rnn.pack_sequence([torch.randn(3, 6, dtype=torch.double)]))


def test_plan_factors_recurrent_and_in_proj_weights_keeps_other_parameters_dense():
    from lowrank.stages.analyze import AnalyzeSettings, Spectra, analyze_matrix
    from lowrank.stages.plan import PlanSettings, make_plan

    sp = Spectra(AnalyzeSettings())
    for name, w in {"gru.weight_hh_l0_reverse": torch.randn(192, 64),
                    "attn.in_proj_weight": torch.randn(192, 64),
                    "pos.table": torch.randn(192, 64)}.items():
        sp.matrices[name] = analyze_matrix(name, w, AnalyzeSettings())
    sp.total_params = 3 * 192 * 64
    plan = make_plan(sp, PlanSettings(rank=8))
    assert plan.layers["gru.weight_hh_l0_reverse"].rank == 8
    assert plan.layers["attn.in_proj_weight"].rank == 8  # lowrank.nn.attention
    assert "not a module weight" in plan.layers["pos.table"].reason


# --------------------------------------------------------------------------------------------
# Tied weights


def test_tied_hf_lm_head_is_factored_once_and_stays_tied(tmp_path):
    import transformers

    from lowrank.models import build_hf_model

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "tied")
    spec = lowrank.default_pipeline()
    spec.settings["plan"] = {"rank": 8, "include": ["*embed_tokens*"], "min_numel": 1000}
    lowrank.run_pipeline(spec, tmp_path / "tied", tmp_path / "out")
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(k for k in state if k.endswith((".A", ".B"))) == [
        "model.embed_tokens.A", "model.embed_tokens.B"]
    assert "lm_head.weight" not in state and "model.embed_tokens.weight" not in state
    model = lowrank.load(tmp_path / "out")
    assert isinstance(model.lm_head, TiedLowRankLinear)
    assert model.lm_head.A is model.model.embed_tokens.A
    assert model.lm_head.B is model.model.embed_tokens.B
    config_json = json.loads((tmp_path / "out" / "lowrank_config.json").read_text())
    dense = build_hf_model(tmp_path / "out")
    dense.load_state_dict(reconstruct_dense(state, config_json), strict=False)
    assert dense.lm_head.weight is dense.model.embed_tokens.weight
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-4)


def test_tied_entries_of_a_pt_state_dict_share_one_pair_of_factors(tmp_path):
    torch.manual_seed(0)
    source = TiedToy(tie=True)
    torch.save(source.state_dict(), tmp_path / "tied.pt")  # both names, one storage
    spec = lowrank.default_pipeline()
    spec.settings["plan"] = {"rank": 8, "min_numel": 1000}
    lowrank.run_pipeline(spec, tmp_path / "tied.pt", tmp_path / "out")
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    config = json.loads((tmp_path / "out" / "lowrank_config.json").read_text())
    assert config["layers"]["head.weight"]["tied_to"] == "emb.weight"
    assert sorted(k for k in state if k.endswith((".A", ".B"))) == [
        "emb.A", "emb.B", "mix.A", "mix.B"]
    assert not any(k.startswith("head.") for k in state)
    # a model that does not tie in code gets the tie from lowrank_config.json
    model = lowrank.load(tmp_path / "out", model=TiedToy(tie=False))
    assert isinstance(model.head, TiedLowRankLinear) and model.head.A is model.emb.A
    dense = TiedToy(tie=False)
    dense.load_state_dict(reconstruct_dense(state, config))
    ids = torch.randint(0, 300, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), dense(ids), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Bad --model-factory values: one line, exit 3, no OUTPUT


@pytest.mark.parametrize("value,message", [
    ("nocolon", "expected package.module:function"),
    ("tests.no_such_module_here:build", "cannot import tests.no_such_module_here"),
    (f"{HERE}:missing", "has no 'missing'"),
    (f"{HERE}:NOT_CALLABLE", "NOT_CALLABLE is not callable (int)"),
    (f"{HERE}:not_a_module", "returned int, not a torch nn.Module"),
])
def test_bad_model_factory_is_one_line_exit_3(digits, tmp_path, value, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compress", str(digits["cnn"]["model"]), str(out),
                                       "--model-factory", value, "--no-cache"])
    assert result.exit_code == 3, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_factory_of_another_architecture_is_refused(digits, tmp_path):
    files = digits["lstm"]
    with pytest.raises(lowrank.InputError, match="does the model factory .*digits_cnn build"):
        lowrank.run_pipeline(_spec(files, {"rank": 4}), files["model"], tmp_path / "out",
                             model_factory=f"{HERE}:digits_cnn")


def test_model_factory_runs_static_int8_and_bench(digits, tmp_path):
    """Every stage that builds a model goes through the same builder, the factory included:
    static int8 (calibrated on the tensor file) and the dense-vs-compressed benchmark."""
    files = digits["cnn"]
    spec = _spec(files, {"rank": 8}, export=True)
    spec.stages = [s for s in spec.stages if s != "evaluate"] + ["int8", "bench"]
    spec.settings["int8"] = {"format": "static", "samples": 16}
    spec.settings["bench"] = {"batches": [1], "sequences": [1], "runs": 2, "warmup": 1,
                              "rounds": 1}
    result = lowrank.run_pipeline(spec, files["model"], tmp_path / "out",
                                  model_factory=f"{HERE}:digits_cnn")
    latency = result.report["latency"]
    assert {r["model"] for r in latency["results"]} == {
        "dense", "compressed", "dense-int8", "compressed-int8"}
    assert result.report["int8"]["format"] == "static"
    assert (tmp_path / "out" / "onnx-int8" / "model.onnx").is_file()
