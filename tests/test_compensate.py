"""Compensated factors (lowrank.stages.compensate.compensated_factors): each layer fitted to the
dense model's outputs from the inputs it gets in the partly factored model."""

import copy

import pytest
import torch

import lowrank
from lowrank.io.samples import read_calibration_text
from lowrank.linalg import factorize_matrix
from lowrank.models import load_dense
from lowrank.stages.blockwise import output_module, writes_block_output
from lowrank.stages.compensate import (
    _PairedInputs,
    _Reached,
    block_output_sums,
    compensated_targets,
)
from lowrank.weighting import Weighting, psd_root


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


class _Block(torch.nn.Module):
    """A pre-norm residual MLP block (``post_norm``: BERT's order, a LayerNorm after the add)."""

    def __init__(self, width=8, hidden=24, post_norm=False):
        super().__init__()
        self.up, self.down = torch.nn.Linear(width, hidden), torch.nn.Linear(hidden, width)
        self.norm = torch.nn.LayerNorm(width) if post_norm else torch.nn.Identity()

    def forward(self, h):
        return self.norm(h + self.down(torch.relu(self.up(h))))


def test_only_a_layer_added_to_the_block_output_as_is_writes_it():
    torch.manual_seed(0)
    state = (torch.randn(3, 5, 8), (), {})
    block = _Block()
    assert writes_block_output(block, block.down, state)
    assert not writes_block_output(block, block.up, state)  # another width, through relu
    post_norm = _Block(post_norm=True)
    assert not writes_block_output(post_norm, post_norm.down, state)


class _PostNormBlock(torch.nn.Module):
    """BERT's layout: the last Linear inside a module that adds the residual and normalizes."""

    class Output(torch.nn.Module):
        def __init__(self, hidden, width):
            super().__init__()
            self.dense, self.norm = torch.nn.Linear(hidden, width), torch.nn.LayerNorm(width)

        def forward(self, x, residual):
            return self.norm(residual + self.dense(x))

    def __init__(self, width=8, hidden=24):
        super().__init__()
        self.up, self.output = torch.nn.Linear(width, hidden), self.Output(hidden, width)

    def forward(self, h):
        return self.output(torch.relu(self.up(h)), h)


def test_the_module_whose_output_is_the_blocks_is_found():
    torch.manual_seed(0)
    state = (torch.randn(3, 5, 8), (), {})
    block = _PostNormBlock()
    assert output_module(block, block.output.dense, state) is block.output
    assert output_module(block, block.up, state) is None  # nothing around up but the block
    pre_norm = _Block()
    assert output_module(pre_norm, pre_norm.down, state) is None


def test_a_post_norm_blocks_new_outputs_come_from_that_module(tiny_bert_dir, tmp_path,
                                                                monkeypatch):
    """After BERT's output.dense is fitted, the block's new outputs are BertOutput's on the
    inputs kept from that layer's pass, not a rerun of the block: the same factors."""
    from lowrank.stages import blockwise

    found = []
    real = blockwise.output_module
    monkeypatch.setattr(blockwise, "output_module", lambda *a: found.append(real(*a)) or found[-1])
    kept = _compress(tiny_bert_dir, tmp_path / "kept" / "out", True)
    # found on the first block; the second, of the same kind, reuses the answer (BlockStructure)
    assert len(found) == 1 and type(found[0]).__name__ == "BertOutput"
    monkeypatch.setattr(blockwise, "output_module", lambda *a: None)
    rerun = _compress(tiny_bert_dir, tmp_path / "rerun" / "out", True)
    a, b = kept.artifacts["factorize"].tensors, rerun.artifacts["factorize"].tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("model", ["tiny_llama_dir", "tiny_bert_dir"])
def test_finished_outputs_give_the_same_factors_with_less_work(model, tmp_path, monkeypatch,
                                                               request):
    """A module that finished before a pass stopped is not run again by the block's later
    passes (LLaMA's block-output pass skips the attention; BERT's passes after the query's),
    and the factors are the same bit for bit as when every pass runs it."""
    import contextlib

    from lowrank.stages import blockwise

    model_dir = request.getfixturevalue(model)
    if model == "tiny_llama_dir":
        from transformers.models.llama.modeling_llama import LlamaAttention as attention
    else:
        from transformers.models.bert.modeling_bert import BertSelfAttention as attention
    runs = []
    real_forward = attention.forward
    monkeypatch.setattr(attention, "forward",
                        lambda self, *a, **k: runs.append(1) or real_forward(self, *a, **k))
    reused = _compress(model_dir, tmp_path / "reused" / "out", True)
    runs_reused = len(runs)
    runs.clear()
    monkeypatch.setattr(blockwise.FinishedOutputs, "reusing",
                        lambda self, pending, keep=True: contextlib.nullcontext())
    rerun = _compress(model_dir, tmp_path / "rerun" / "out", True)
    assert len(runs) > runs_reused > 0
    a, b = reused.artifacts["factorize"].tensors, rerun.artifacts["factorize"].tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Interleaved(torch.nn.Module):
    """a1 and a2 multiply x, b1 multiplies a1's output, in the order a1, b1, a2."""

    def __init__(self):
        super().__init__()
        self.a1, self.b1, self.a2 = (torch.nn.Linear(4, 4) for _ in range(3))

    def forward(self, x):
        return self.b1(self.a1(x)) + self.a2(x)


def test_block_structure_answers_like_the_checks_once_per_kind(monkeypatch):
    """BlockStructure gives each block the answers of input_groups / writes_block_output /
    output_module, for any subset of layers, running the first block of a kind only."""
    from lowrank.stages import blockwise

    torch.manual_seed(0)
    state, mlp_state = (torch.randn(2, 3, 4), (), {}), (torch.randn(2, 3, 8), (), {})
    blocks = [_Interleaved(), _Interleaved()]
    structure = blockwise.BlockStructure()
    for subset in (["a2", "b1"], ["a1", "a2"], ["b1"], ["a1", "b1", "a2"]):
        for block in blocks:
            modules = {f"w.{n}": block.get_submodule(n) for n in subset}
            assert structure.groups(block, {f"w.{n}": n for n in subset}, state) \
                == blockwise.input_groups(block, modules, state)
    # in the order the layers run, as input_groups gives them
    assert structure.groups(blocks[1], {"w.a2": "a2", "w.b1": "b1"}, state) == [["w.b1"], ["w.a2"]]
    mlp = _Block()
    assert structure.writes_output(mlp, "down", mlp_state) \
        == writes_block_output(mlp, mlp.down, mlp_state) is True
    assert structure.output_module(mlp, "down", mlp_state) \
        is output_module(mlp, mlp.down, mlp_state) is None
    runs = []
    real = blockwise.run_block
    monkeypatch.setattr(blockwise, "run_block", lambda *a: runs.append(1) or real(*a))
    fresh = blockwise.BlockStructure()
    for block in (*blocks, _Interleaved()):
        fresh.groups(block, {"w": "b1"}, state)
    assert len(runs) == 1  # the blocks after the first, of the same kind, reuse its answer


@pytest.mark.parametrize("model", ["tiny_llama_dir", "tiny_bert_dir"])
def test_structure_answered_once_per_kind_gives_the_same_factors(model, tmp_path, monkeypatch,
                                                                 request):
    from lowrank.stages import blockwise

    model_dir = request.getfixturevalue(model)
    once = _compress(model_dir, tmp_path / "once" / "out", True)
    monkeypatch.setattr(blockwise.BlockStructure, "_answer",
                        lambda self, block, question, compute: compute())
    every = _compress(model_dir, tmp_path / "every" / "out", True)
    a, b = once.artifacts["factorize"].tensors, every.artifacts["factorize"].tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_block_output_sums_fit_the_weighted_block_output():
    torch.manual_seed(0)
    dense = _Block().double()
    student = copy.deepcopy(dense)
    student.up.weight.data += 0.3 * torch.randn_like(student.up.weight)  # upstream error
    h = torch.randn(4, 30, 8, dtype=torch.float64)
    h[:, 0] *= 50  # attention-sink-like tokens with a huge norm
    h_student = h + 0.05 * torch.randn_like(h)
    y = dense(h).detach()
    w = dense.down.weight.detach()
    with torch.no_grad():
        gram, product = block_output_sums(student, student.down, w, [(h_student, (), {})], [y],
                                          [None], share=1.0)
        (m,), _ = compensated_targets([w], gram, [product], damping=1e-9)
        # The weighted least-squares map from the student's inputs to the block output.
        x = torch.relu(student.up(h_student)).reshape(-1, 24)
        rest = (h_student + student.down.bias).reshape(-1, 8)
        root_w = y.reshape(-1, 8).pow(2).mean(dim=1).rsqrt()[:, None]
        best = torch.linalg.lstsq(x * root_w, (y.reshape(-1, 8) - rest) * root_w).solution.T
    assert torch.allclose(m, best, atol=1e-4 * best.abs().max())
    # A share below 1 moves from W toward it: a part of the block output's error is absorbed.
    with torch.no_grad():
        _, half = block_output_sums(student, student.down, w, [(h_student, (), {})], [y],
                                    [None], share=0.5)
        (m_half,), _ = compensated_targets([w], gram, [half], damping=1e-9)
    assert torch.allclose(m_half, (w + best) / 2, atol=1e-4 * best.abs().max())


def _compress(model_dir, out, compensate, dtype="float32"):
    spec = lowrank.default_pipeline()
    spec.stages = ["calibrate", *spec.stages]
    spec.settings["calibrate"] = {"samples": 64}
    spec.settings["plan"] = {"rank": 6}
    spec.settings["factorize"] = {"compensate": compensate, "compensate_damping": 0.01,
                                  "compensate_dtype": dtype}
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
    layers = comp.artifacts["factorize"].layers
    result = layers["model.layers.1.mlp.down_proj.weight"]
    # down_proj's output is added to the block's output: fitted to it (block_output_sums)
    assert result.rank == 6 and result.method == "gram+whiten+compensated+residual"
    assert layers["model.layers.1.self_attn.o_proj.weight"].method == "gram+whiten+compensated"
    w = load_dense(tiny_llama_dir).model.layers[1].mlp.down_proj.weight.detach()
    ab = b["model.layers.1.mlp.down_proj.A"] @ b["model.layers.1.mlp.down_proj.B"]
    assert result.rel_error == pytest.approx(float((w - ab).norm() / w.norm()), rel=1e-4)


def test_bfloat16_passes_fit_about_as_well_as_float32(tiny_llama_dir, tmp_path):
    texts = read_calibration_text(None, 64)
    plain = _output_error(tiny_llama_dir, _compress(tiny_llama_dir, tmp_path / "plain",
                                                    False).output, texts)
    full = _output_error(tiny_llama_dir, _compress(tiny_llama_dir, tmp_path / "fp32",
                                                   True).output, texts)
    bf16 = _compress(tiny_llama_dir, tmp_path / "bf16", True, "bfloat16")
    half = _output_error(tiny_llama_dir, bf16.output, texts)
    method = bf16.artifacts["factorize"].layers["model.layers.1.mlp.down_proj.weight"].method
    assert method == "gram+whiten+compensated+residual+bf16"
    # bf16 inputs to the fit (8 significant bits) cost a little of compensation's gain, not all
    assert half != full and half < plain
    assert abs(half - full) < 0.1 * (plain - full)
