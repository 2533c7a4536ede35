"""What an ONNX export must reproduce, and the check that it does: the validation rule
(:class:`ExportSettings`, whose fields are mostly its tolerances), the inputs and outputs a
model is exported with, :func:`compare` (one output against PyTorch's) and
:func:`validate_onnx` (a file against its model on several inputs). The export itself is
:mod:`lowrank.stages.export`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..backends import require
from ..errors import ValidationError
from ..io.samples import LABELS, num_samples
from ..models import is_causal_lm, output_tensor
from .export_decoder import no_past_feeds


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



class NamedOutput(nn.Module):
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


def example_inputs(inputs: list[str], batch: int, seq: int, vocab: int, generator) -> list[torch.Tensor]:
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


def signature(model: nn.Module, inputs: dict[str, torch.Tensor] | None):
    """Input names, output name and validation feeds (None: random token ids) of ``model``."""
    if inputs is None:
        return (*model_io(model), None)
    names, feeds = tensor_feeds(inputs)
    with torch.no_grad():
        out = model(**{n: inputs[n][:2] for n in names})
    output = "logits" if isinstance(out, torch.Tensor) or hasattr(out, "logits") else "output"
    return names, output, feeds


def vocab_size(model: nn.Module) -> int:
    return model.config.vocab_size if hasattr(model, "config") else 100

def is_lm(output: str, feeds) -> bool:
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

    names, output, feeds = signature(model.eval(), inputs)
    lm = is_lm(output, feeds)
    wrapper = NamedOutput(model, names, output).eval()
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 0, 1
    # The graph as written, which every runtime must reproduce: onnxruntime's optimizer drops
    # Dropout nodes even in training mode, so an optimized session would hide live dropout.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    if feeds is None:
        generator = torch.Generator().manual_seed(settings.seed + 1)
        feeds = [example_inputs(names, batch, seq, vocab_size(model), generator)
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

