"""ONNX export of a dense or low-rank HF model, validated against PyTorch.

The graph computes each factored layer as two MatMuls, x·Bᵀ then ·Aᵀ — never a folded A·B
(onnxruntime has no MatMul→MatMul fusion and would keep the folded dense weight) — and :func:`check_factors`
proves it by finding every factor among the saved initializers. Encoders follow Optimum's names:
inputs ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the model takes it), output
``last_hidden_state``; causal LMs output ``logits``; dynamic axes ``batch_size`` and
``sequence_length``. Models over 2 GB are saved with external data (``model.onnx_data``).

Other models (a model factory's: CNNs, LSTMs) are exported from example tensor inputs (a
.safetensors/.pt file, samples on dim 0): inputs keep the file's names, the output is
``logits`` (or ``output``), only the batch axis is dynamic, and validation runs real samples.
"""

from __future__ import annotations

import inspect
import json
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..backends import require
from ..errors import InputError, ValidationError
from ..io.files import write_json
from ..io.samples import LABELS, is_tensor_file, num_samples, read_calibration_tensors
from ..models import eager_attention, output_tensor
from ..nn.adapters import lowrank_modules
from ..pipeline.stage import Context, Stage, register_stage
from .evaluate import is_causal_lm
from .export_decoder import (
    no_past_feeds,
    random_prompts,
    takes_cache,
    validate_generation,
    write_decoder,
)
from .factored import LowRankCheckpoint

TWO_GB = 2 * 1024**3


@dataclass(frozen=True)
class ExportSettings:
    opset: int = 17
    # Validation (see compare): max |Δ| ≤ rel_tol × RMS of PyTorch's output, per output and input.
    rel_tol: float = 2e-3
    # Causal LMs, on real tokens: max |Δ log-prob| ≤ logprob_tol nats, and onnxruntime's argmax may
    # differ from PyTorch's only at a near tie (PyTorch's log-probs of the two within logprob_tol).
    logprob_tol: float = 2e-2
    # Fixed element-wise tolerances, |Δ| ≤ atol + rtol·|PyTorch|: either one given replaces the
    # relative rule (the other one then counts as 0).
    atol: float | None = None
    rtol: float | None = None
    # Validation inputs: (batch, sequence) pairs of random token ids.
    shapes: tuple[tuple[int, int], ...] = ((1, 8), (2, 16), (4, 33))
    seed: int = 0
    # Models that take tensors (a model factory's): example inputs, a .safetensors/.pt file of
    # name -> tensor (samples on dim 0); `compress` with a factory uses the calibration file.
    inputs_file: str | None = None
    # Causal LMs: export with the KV cache (Optimum's text-generation-with-past layout) and
    # validate greedy decoding of new_tokens tokens from a few prompts against PyTorch.
    cache: bool = True
    new_tokens: int = 16

    @property
    def fixed(self) -> bool:
        return self.atol is not None or self.rtol is not None

    def rule(self, lm: bool, decoder: bool = False) -> str:
        """The validation rule in words, for reports and errors."""
        text = (f"|Δ| ≤ {self.atol or 0:g} + {self.rtol or 0:g}·|PyTorch| per element" if self.fixed
                else f"max |Δ| ≤ {self.rel_tol:g} × RMS of PyTorch's output")
        if lm:
            text += (f"; real tokens: max |Δ log-prob| ≤ {self.logprob_tol:g} nats, top-1 equal up "
                     f"to ties within {self.logprob_tol:g} nats")
        if decoder:
            text += (f"; greedy decoding with the KV cache equals PyTorch's for {self.new_tokens} "
                     f"tokens (up to a near tie)")
        return text


@dataclass
class ExportResult:
    path: Path
    inputs: list[str]
    outputs: list[str]
    rule: str = ""  # ExportSettings.rule: what validation checked
    validation: list[dict] = field(default_factory=list)  # per input shape
    factors: dict = field(default_factory=dict)  # check_factors' result
    bytes: int = 0
    generation: list[dict] = field(default_factory=list)  # decoders: greedy check per prompt

    def to_json(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


class _Wrapper(nn.Module):
    """Named tensor inputs in, one named tensor out (what onnxruntime users feed and read)."""

    def __init__(self, model: nn.Module, inputs: list[str], output: str):
        super().__init__()
        self.model, self.inputs, self.output = model, inputs, output

    def forward(self, *args):
        out = self.model(**dict(zip(self.inputs, args)))
        if isinstance(out, torch.Tensor):
            return out
        return getattr(out, self.output, None) if hasattr(out, self.output) else output_tensor(out)


def model_io(model: nn.Module) -> tuple[list[str], str]:
    params = inspect.signature(model.forward).parameters
    inputs = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in params]
    return inputs, "logits" if is_causal_lm(model) else "last_hidden_state"


def _example(inputs: list[str], batch: int, seq: int, vocab: int, generator) -> list[torch.Tensor]:
    tensors = []
    for name in inputs:
        if name == "input_ids":
            tensors.append(torch.randint(0, vocab, (batch, seq), generator=generator))
        elif name == "attention_mask":
            mask = torch.ones(batch, seq, dtype=torch.long)
            mask[1:, seq // 2:] = 0  # padded rows exercise the mask
            tensors.append(mask)
        else:
            tensors.append(torch.zeros(batch, seq, dtype=torch.long))
    return tensors


def tensor_feeds(data: dict[str, torch.Tensor]) -> tuple[list[str], list[list[torch.Tensor]]]:
    """Input names (labels left out) and validation feeds of 1, 2 and 4 samples from ``data``."""
    names = [k for k in data if k != LABELS]
    n, feeds, start = num_samples(data), [], 0
    for size in (1, 2, 4):
        if start >= n:
            break
        feeds.append([data[k][start:start + size] for k in names])
        start += size
    return names, feeds


def _signature(model: nn.Module, inputs: dict[str, torch.Tensor] | None):
    """Input names, output name and validation feeds (None: random token ids) of ``model``."""
    if inputs is None:
        return (*model_io(model), None)
    names, feeds = tensor_feeds(inputs)
    with torch.no_grad():
        out = model(**{n: inputs[n][:2] for n in names})
    output = "logits" if isinstance(out, torch.Tensor) or hasattr(out, "logits") else "output"
    return names, output, feeds


def _vocab(model: nn.Module) -> int:
    return model.config.vocab_size if hasattr(model, "config") else 100


def export_onnx(model: nn.Module, path: Path, settings: ExportSettings = ExportSettings(),
                inputs: dict[str, torch.Tensor] | None = None) -> ExportResult:
    """Write ``model`` to ``path`` (ONNX), validate it with onnxruntime, check the factors.

    ``inputs`` (name -> tensor, samples on dim 0) exports a model that takes tensors, not
    token ids: traced on two samples, validated on 1, 2 and 4 others.

    Raises:
        ValidationError: onnxruntime's outputs differ from PyTorch's beyond the rule of
            :func:`compare` on any validation input, or a factor is missing from the graph.
    """
    onnx = require("onnx")

    model = model.eval()
    names, output, feeds = _signature(model, inputs)
    if feeds is None:
        generator = torch.Generator().manual_seed(settings.seed)
        example = tuple(_example(names, 2, 8, _vocab(model), generator))
        axes = {n: {0: "batch_size", 1: "sequence_length"} for n in (*names, output)}
    else:
        example = tuple(inputs[n][:2] for n in names)
        axes = {n: {0: "batch_size"} for n in (*names, output)}
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    path.parent.mkdir(parents=True, exist_ok=True)
    decoder = settings.cache and takes_cache(model, inputs)
    if decoder:
        names, outputs = write_decoder(model, path, settings.opset, settings.seed)
    else:
        outputs = [output]
        wrapper = _Wrapper(model, names, output).eval()  # export restores this mode: keep eval
        with warnings.catch_warnings(), eager_attention(model):
            warnings.simplefilter("ignore")  # tracer and deprecation chatter, not user-facing
            torch.onnx.export(wrapper, example, str(path), input_names=names, output_names=outputs,
                              dynamic_axes=axes, opset_version=settings.opset, dynamo=False,
                              # keep initializer names, so check_factors can find every factor
                              do_constant_folding=False)
    if n_bytes > TWO_GB:  # protobuf's limit: move the weights next to the graph
        proto = onnx.load(str(path))
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + "_data")
    result = ExportResult(path, names, outputs, settings.rule(_is_lm(output, feeds), decoder))
    result.factors = check_factors(model, path)
    result.validation = validate_onnx(model, path, settings, inputs)
    if decoder:
        prompts = random_prompts(_vocab(model), settings.seed + 2)
        result.generation = validate_generation(model, path, prompts, settings.new_tokens,
                                                settings.logprob_tol)
    result.bytes = sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))
    return result


def check_factors(model: nn.Module, path: Path) -> dict:
    """Every low-rank factor used by the graph must be an initializer of its own, so onnxruntime
    multiplies by B then A. The export keeps parameter names (no exporter constant folding), so
    a module whose factors are both absent was pruned as unused by the output (e.g. BERT's
    pooler for ``last_hidden_state``); one factor without the other means A·B was folded."""
    onnx = require("onnx")

    graph = onnx.load(str(path), load_external_data=False).graph
    names = {i.name.removeprefix("model.") for i in graph.initializer}
    found, unused = 0, []
    for name in lowrank_modules(model):
        present = [f"{name}.{f}" in names for f in ("A", "B")]
        if all(present):
            found += 2
        elif not any(present):
            unused.append(name)
        else:
            raise ValidationError(f"{path}: only one factor of {name} is in the graph (was A·B "
                                  f"folded into one weight?)")
    if found == 0 and unused:
        raise ValidationError(f"{path}: no low-rank factor is in the graph")
    return {"factors": found, "unused_modules": unused}


def _is_lm(output: str, feeds) -> bool:
    """A causal LM: token ids in, logits out (a factory model's "logits" may be anything)."""
    return output == "logits" and feeds is None


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(got: np.ndarray, expected: np.ndarray, settings: ExportSettings,
            real: np.ndarray | None = None) -> dict:
    """One validation entry: onnxruntime's output ``got`` against PyTorch's ``expected``.

    The rule, unless ``settings`` fixes atol/rtol: max |Δ| ≤ rel_tol × RMS(expected). Float32
    rounding error grows with the magnitude of the values a network computes, so one atol cannot
    suit both an encoder's unit-scale hidden states and a deep LM's logits in the tens (a
    correct 30-layer LM export, max |Δ| 1.2e-3, failed the former atol 1e-4). Reordered float32 sums
    land at 1e-6..1e-4 of the output's RMS; a wrong or missing weight or bias, or live dropout,
    moves outputs by percents: rel_tol 2e-3 sits between. The RMS, unlike the max, is not set
    by one outlier element, and an output scaled by k scales its tolerance by k.

    ``real`` (causal LMs: a bool mask of the logits' positions, True for non-padded tokens) adds
    two scale-free checks, in nats, on those positions: max |Δ log-prob| ≤ logprob_tol, and
    top-1 agreement, where a mismatch passes only at a near tie: PyTorch's log-probs of its own
    top-1 and of onnxruntime's within logprob_tol (float32 noise can flip a near tie, no more).
    """
    got, expected = got.astype(np.float64), expected.astype(np.float64)
    diff = float(np.abs(got - expected).max(initial=0.0))
    scale = float(np.sqrt(np.mean(expected ** 2))) if expected.size else 0.0
    if settings.fixed:
        atol, rtol = settings.atol or 0.0, settings.rtol or 0.0
        ok = bool(np.isclose(got, expected, atol=atol, rtol=rtol).all())
    else:
        ok = diff <= settings.rel_tol * scale
    entry = {"max_abs_diff": diff, "scale": scale, "rel_error": diff / max(scale, 1e-30)}
    if real is not None:
        want, have = _log_softmax(expected[real]), _log_softmax(got[real])  # (tokens, vocab)
        pick = have.argmax(-1)
        gap = want.max(-1) - np.take_along_axis(want, pick[:, None], -1)[:, 0]
        entry.update(top1_agreement=float((pick == want.argmax(-1)).mean()),
                     top1_gap=float(gap.max(initial=0.0)),
                     max_logprob_diff=float(np.abs(have - want).max(initial=0.0)))
        ok = ok and max(entry["top1_gap"], entry["max_logprob_diff"]) <= settings.logprob_tol
    return {**entry, "ok": ok}


def validate_onnx(model: nn.Module, path: Path, settings: ExportSettings = ExportSettings(),
                  inputs: dict[str, torch.Tensor] | None = None) -> list[dict]:
    """Run the ONNX file at ``path`` with onnxruntime and ``model`` with PyTorch on each
    validation input (random token ids of ``settings.shapes``, or feeds from ``inputs``) and
    :func:`compare` them: one entry per input, with its shape.

    Raises:
        ValidationError: an entry fails the rule.
    """
    ort = require("onnxruntime")

    names, output, feeds = _signature(model.eval(), inputs)
    lm = _is_lm(output, feeds)
    wrapper = _Wrapper(model, names, output).eval()
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 0, 1
    # The graph as written, which every runtime must reproduce: onnxruntime's optimizer drops
    # Dropout nodes even in training mode, so an optimized session would hide live dropout.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    if feeds is None:
        generator = torch.Generator().manual_seed(settings.seed + 1)
        feeds = [_example(names, batch, seq, _vocab(model), generator)
                 for batch, seq in settings.shapes]
    entries = []
    for feed in feeds:  # shape: (batch, sequence) of token ids, or the first input tensor's
        with torch.no_grad():
            expected = wrapper(*feed).float().numpy()
        got = session.run(None, {n: t.numpy() for n, t in zip(names, feed)}
                          | no_past_feeds(session, feed[0].shape))[0]
        mask = dict(zip(names, feed)).get("attention_mask", torch.ones_like(feed[0]))
        real = mask.numpy().astype(bool) if lm else None
        entries.append({"shape": list(feed[0].shape), **compare(got, expected, settings, real)})
    for v in entries:
        if not v["ok"]:
            lm_part = (f", top-1 agreement {v['top1_agreement']:.2%} (worst tie gap "
                       f"{v['top1_gap']:.3g} nats), max |Δ log-prob| {v['max_logprob_diff']:.3g}"
                       if lm else "")
            raise ValidationError(
                f"{path}: onnxruntime differs from PyTorch on input {v['shape']}: max abs diff "
                f"{v['max_abs_diff']:.3g} ({v['rel_error']:.3g} × the output's RMS "
                f"{v['scale']:.3g}){lm_part}; rule: {settings.rule(lm)}")
    return entries


# --------------------------------------------------------------------------------------------
# The pipeline stage: its artifact is an ONNX model on disk, never its bytes in memory (models
# over 2 GB come with external data).


@dataclass
class OnnxArtifact:
    directory: Path  # model.onnx (+ model.onnx_data) and nothing else
    result: dict  # ExportResult.to_json() without the path (or the int8 stage's info)
    owner: tempfile.TemporaryDirectory | None = None  # a scratch directory, removed with this

    @property
    def path(self) -> Path:
        return self.directory / "model.onnx"


def write_onnx(artifact: OnnxArtifact, directory: Path) -> None:
    """``directory``/model.onnx (+ its data) and export.json: what OUTPUT/onnx holds."""
    directory.mkdir(parents=True, exist_ok=True)
    for file in artifact.directory.iterdir():
        shutil.copyfile(file, directory / file.name)
    write_json(directory / "export.json", artifact.result)


def save_onnx(artifact: OnnxArtifact, directory: Path) -> None:
    """The cache keeps the model files apart from export.json, so loading needs no copy."""
    write_onnx(artifact, directory / "model")
    (directory / "model" / "export.json").replace(directory / "export.json")


def load_onnx(directory: Path) -> OnnxArtifact:
    return OnnxArtifact(directory / "model", json.loads((directory / "export.json").read_text()))


def onnx_scratch(ctx: Context, stage: str) -> tempfile.TemporaryDirectory:
    """Where a stage writes its ONNX files: beside OUTPUT when the run has a work directory."""
    return ctx.scratch(stage) or tempfile.TemporaryDirectory(prefix=f"lowrank-{stage}-")


def _run(ctx: Context, settings: ExportSettings, factorize: LowRankCheckpoint,
         recover=None) -> OnnxArtifact:
    final = recover or factorize
    if not ctx.models.runnable:
        raise InputError(f"{ctx.checkpoint.path}: ONNX export needs an architecture: give an HF "
                         f"model directory (config.json) or a model factory")
    example = (read_calibration_tensors(settings.inputs_file, 8, warn=False)
               if is_tensor_file(settings.inputs_file) else None)
    if example is None and ctx.checkpoint.model_dir is None:
        raise InputError("ONNX export of a model factory's model needs example inputs: a "
                         "tensor calibration file or [export] inputs_file")
    model = ctx.models.compressed(final.tensors, final.layers)
    scratch = onnx_scratch(ctx, "export")
    with ctx.track("export", 1) as advance:
        result = export_onnx(model, Path(scratch.name) / "model.onnx", settings, example)
        advance("validated")
    return OnnxArtifact(Path(scratch.name), {k: v for k, v in result.to_json().items()
                                             if k != "path"}, scratch)


register_stage(Stage(
    "export", ("factorize",), ExportSettings, _run, save=save_onnx, load=load_onnx,
    emit=lambda artifact, out, ctx: write_onnx(artifact, out / "onnx"),
    uses=("recover",),
))
