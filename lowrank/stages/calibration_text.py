"""The samples calibration runs on: the first lines of the calibration text within the token
budget, the last share of them packed into longer sequences (or the first rows of a tensor
file), and, for a causal LM whose text falls short of the budget, lines sampled from the dense
model to fill it (:mod:`lowrank.sample_text`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from torch import nn

from ..io.samples import (
    Samples,
    is_tensor_file,
    lines_within_tokens,
    num_samples,
    packed_lines,
    read_calibration_tensors,
    read_calibration_text,
    token_count,
)
from ..models import Models, is_causal_lm
from ..pipeline.stage import Track, no_progress
from ..sample_text import SampleTextSettings, sample_text

if TYPE_CHECKING:
    from .calibrate import CalibrateSettings


# Sequences sampled together for a top-up: SmolLM2's default one (8,605 tokens, 135 lines of
# 64) in one batch, since each one-token step's Python overhead is paid per batch.
TOP_UP_BATCH = 256


def top_up_sampling(settings: CalibrateSettings, missing: int) -> SampleTextSettings:
    """How a top-up of ``missing`` tokens is sampled: lines of ``sampled_length`` new tokens (at
    most ``max_length``), up to TOP_UP_BATCH of them at a time."""
    return SampleTextSettings(tokens=missing,
                              length=min(settings.sampled_length, settings.max_length),
                              batch_size=TOP_UP_BATCH, seed=settings.sampled_seed,
                              dtype=settings.forward_dtype)


def top_up(model: nn.Module, tokenizer, data, settings: CalibrateSettings,
           track: Track = no_progress) -> list[str]:
    """Lines sampled from causal LM ``model`` (:mod:`lowrank.sample_text`) for the part of the
    token budget that calibration lines ``data`` leave; [] for other models, for tensors, with
    a fixed line count (``samples``), without ``sampled_text``, or with less than a line left."""
    if (not settings.sampled_text or settings.samples is not None or tokenizer is None
            or not is_causal_lm(model)):
        return []
    missing = settings.tokens - token_count(data, tokenizer, settings.max_length)
    if missing < 1:
        return []
    sampling = top_up_sampling(settings, missing)
    if missing < sampling.length:  # less than a line left
        return []
    with track("sample text", sampling.batches) as advance:
        lines = sample_text(model, tokenizer, sampling, advance)
    return lines_within_tokens(lines, tokenizer, missing, settings.max_length)


TENSOR_SAMPLES = 256  # rows of a tensor calibration file used when `samples` is unset


def spread(samples: Samples, share: float) -> Samples:
    """``share`` of ``samples`` (text lines or tensor rows), evenly spread: the first, then each
    one where the running count of ``share``-sized steps reaches a whole number."""
    if share >= 1:
        return samples
    count = num_samples(samples)
    keep = [i for i in range(count) if math.floor(i * share) != math.floor((i - 1) * share)]
    if isinstance(samples, list):
        return [samples[i] for i in keep]
    return {k: v[keep] for k, v in samples.items()}


def calibration_data(models: Models, settings: CalibrateSettings, warn: bool = True,
                     sampled: list[str] = (), file_share: float = 1.0):
    """(dense model, tokenizer or None, samples): the model and the calibration lines (or input
    tensors) its statistics come from, chosen as :class:`CalibrateSettings` says, then the
    ``sampled`` lines (the statistics' ``sampled_lines``). Every stage that reruns the
    calibration text (compensation, sequential statistics) takes it from here, so all see the
    same lines; ``file_share``: only that share of the file's (:func:`spread`)."""
    path = settings.calibration_file
    if is_tensor_file(path):
        model, _ = models.runnable_model(need_tokenizer=False)
        return model, None, spread(read_calibration_tensors(
            path, settings.samples or TENSOR_SAMPLES, warn), file_share)
    model, tokenizer = models.runnable_model()
    lines = read_calibration_text(path, settings.samples, warn)
    if settings.samples is None:
        lines = lines_within_tokens(lines, tokenizer, settings.tokens, settings.max_length)
    lines = packed_lines(lines, tokenizer, settings.max_length, settings.pack)
    return model, tokenizer, spread(lines, file_share) + list(sampled)
