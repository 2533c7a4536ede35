"""Sensitivity probe: how much the model's output moves when one layer alone is truncated.

For every candidate matrix and a few candidate ranks (fractions of its break-even rank), the
layer is replaced by its (data-aware, when calibrated) rank-r approximation and the end-to-end
distillation loss to the dense model is measured on a few probe samples (the same loss as
recovery: normalized hidden-state MSE, or KL on logits for LMs). The planner turns this into a
per-layer weight: measured loss ÷ the normalized energy that rank loses, so a layer whose
truncation hurts more than its spectrum predicts keeps more rank. The stage cache keys the
result by the checkpoint's content and these settings, so the probe runs once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..io.checkpoint import Checkpoint
from ..io.samples import model_batches, read_calibration
from ..linalg import factorize_matrix, layer_seed, matrix_view
from ..models import Models
from ..pipeline.stage import Context, Stage, json_loader, json_saver, register_stage
from .analyze import Spectra
from .calibrate import ActivationStats
from .distillation import distillation_loss
from .recover import RecoverSettings, loss_kind


@dataclass(frozen=True)
class SensitivitySettings:
    fractions: tuple[float, ...] = (0.25, 0.5)  # candidate ranks, × the break-even rank
    samples: int = 64  # probe samples (the first lines of the calibration text)
    max_length: int = 128
    min_numel: int = 4096  # smaller matrices are not probed

    def __post_init__(self):
        if not self.fractions or not all(0 < f < 1 for f in self.fractions):
            raise InputError("sensitivity fractions must be in (0, 1)")
        if self.samples < 1:
            raise InputError("sensitivity samples must be >= 1")


def probe(ckpt: Checkpoint, spectra: Spectra, settings: SensitivitySettings = SensitivitySettings(),
          stats: ActivationStats | None = None,
          on_layer: Callable[[str], None] | None = None) -> dict[str, dict[str, float]]:
    """{tensor name: {rank: end-to-end loss with only this layer at that rank}}."""
    source = stats.settings.calibration_file if stats is not None else None
    data = read_calibration(source, settings.samples, warn=False)
    model, tokenizer = Models(ckpt).runnable_model(need_tokenizer=isinstance(data, list))
    batch, mask = next(model_batches(data, tokenizer, settings.samples, settings.max_length))
    kind = loss_kind(RecoverSettings(), model)
    with torch.inference_mode():
        reference = model(**batch, output_hidden_states=kind == "hidden")
    params = dict(model.named_parameters())
    result = {}
    for name, s in spectra.matrices.items():
        if name not in params or s.rows * s.cols < settings.min_numel or not s.finite:
            continue
        weight = params[name]
        original = weight.detach().clone()
        flip = stats is not None and name in stats.transposed  # a Conv1D weight: (in, out)
        w = matrix_view(ckpt.get(name), flip)
        weighting = stats.weighting(name, w.shape[1]) if stats is not None else None
        losses = {}
        for fraction in settings.fractions:
            rank = max(1, math.floor(fraction * s.break_even))
            A, B, _, _ = factorize_matrix(w, rank, "exact", layer_seed(0, name), weighting=weighting)
            with torch.inference_mode():
                weight.copy_((A @ B).T if flip else (A @ B).reshape(weight.shape))
                out = model(**batch, output_hidden_states=kind == "hidden")
                losses[str(rank)] = float(distillation_loss(out, reference, mask, kind))
        with torch.inference_mode():
            weight.copy_(original)
        result[name] = losses
        if on_layer:
            on_layer(name)
    return result


def layer_weights(sensitivity: dict[str, dict[str, float]], spectra: Spectra) -> dict[str, float]:
    """Per layer: measured loss per unit of lost normalized energy (mean over probed ranks),
    divided by the median over layers, so 1 means "as sensitive as its spectrum predicts"."""
    raw = {}
    for name, losses in sensitivity.items():
        s = spectra.matrices[name]
        ratios = []
        for rank, loss in losses.items():
            kept = s.energy_at(int(rank))
            if kept is not None and kept < 1:
                ratios.append(loss / (1 - kept))
        if ratios:
            raw[name] = max(sum(ratios) / len(ratios), 1e-12)
    if not raw:
        return {}
    median = sorted(raw.values())[len(raw) // 2]
    return {n: v / median for n, v in raw.items()}


def _run(ctx: Context, settings: SensitivitySettings, spectra: Spectra, calibrate=None) -> dict:
    if ctx.models.factory is not None:
        raise InputError("the sensitivity probe runs HF models only, not a model factory's")
    total = sum(1 for s in spectra.matrices.values() if s.rows * s.cols >= settings.min_numel)
    with ctx.track("sensitivity", total) as advance:
        return probe(ctx.checkpoint, spectra, settings, calibrate, advance)


register_stage(Stage(
    "sensitivity", ("analyze",), SensitivitySettings, _run,
    save=json_saver("sensitivity.json"),
    load=json_loader("sensitivity.json"),
    emit=json_saver("sensitivity.json"),
    uses=("calibrate",),
))
