"""Losses measured on the probe batch, end to end: the dense model against itself with some of
its matrices set to their truncated factors, by forward passes (autocast to bf16 where the CPU
multiplies it natively).

For the measured-loss allocation: the scores stage measures the input embedding's candidates
(:mod:`lowrank.stages.scores`), the plan stage the ones it left pending
(:func:`measure_pending`) and the joint loss of its plans (:func:`measure_joint`). The factors
are the ones factorization computes (:func:`leading_factors`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ..device import autocast_dtype, cpu_autocast
from ..io.checkpoint import Checkpoint
from ..io.samples import model_batches, read_calibration
from ..linalg import (
    matrix_view,
    row_weighted_factors_from_eigh,
    weighted_factors,
    whitened_factors_from_eigh,
)
from ..models import Models
from ..parallel import fixed_threads
from .distillation import distillation_loss
from .recover import RecoverSettings, loss_kind


def leading_factors(ckpt: Checkpoint, name: str, stats,
                    rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 factors A, B of matrix ``name`` (data-aware with ``stats``) up to ``rank``,
    ordered by singular value: A[:, :r]·B[:r] is the rank-r matrix factorization computes, for
    any r <= ``rank``. One thread, like factorization's tasks, so the memoized eigenvectors are
    the ones it would compute."""
    return leading_factors_with(ckpt, name, matrix_weighting(ckpt, name, stats), stats, rank)


def matrix_weighting(ckpt: Checkpoint, name: str, stats):
    """Matrix ``name``'s weighting, as factorize computes it (in the calling thread: with the
    thread executor, the whitening root keeps the bytes of a serial run)."""
    if stats is None:
        return None
    return stats.weighting(name, math.prod(ckpt.info(name).shape[1:]))  # matrix_view's columns


def leading_factors_with(ckpt: Checkpoint, name: str, weighting, stats,
                         rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`leading_factors` with the weighting given (:func:`matrix_weighting`)."""
    w = matrix_view(ckpt.get(name))
    if weighting is not None and name not in stats.transposed:
        # The analysis's eigendecomposition of this matrix: no weighted matrix to form and hash
        # again (MiniLM's word embedding: 0.59 -> 0.30 s)
        analyzed = stats.analyzed_eigh(name)
        if analyzed is not None and analyzed[1].shape[0] == min(w.shape):
            with fixed_threads():
                if weighting.kind in ("whiten", "whiten-output"):
                    A, B = whitened_factors_from_eigh(w, weighting, analyzed[1], rank)
                    return A.float(), B.float()
                if weighting.kind == "rows" and w.shape[0] >= w.shape[1]:
                    A, B = row_weighted_factors_from_eigh(w, *analyzed, rank)
                    return A.float(), B.float()
    eigh = stats.gram_eigenvectors if stats is not None else None
    with fixed_threads():
        A, B, _, _, _ = weighted_factors(w, rank, "gram", weighting=weighting, eigh=eigh)
    return A.float(), B.float()


class Probe(NamedTuple):
    """The dense model and the probe lines (the calibration text's first ``samples``) batched
    twice: in file order (``batches``: the scores' sampled labels follow it) and by token count
    (``by_length``: for a loss averaged over tokens, which pads less; SmolLM2's probe batch:
    848 positions instead of 1,120, the same losses)."""
    model: nn.Module
    batches: list
    by_length: list
    kind: str  # the distillation loss (lowrank.stages.recover.loss_kind)


def probe_data(ckpt: Checkpoint, settings, stats, factory=None) -> Probe:
    """The :class:`Probe` of ``settings`` (a :class:`~lowrank.stages.scores.ScoreSettings`)."""
    source = stats.settings.calibration_file if stats is not None else None
    data = read_calibration(source, settings.samples, warn=False)
    model, tokenizer = Models(ckpt, factory).runnable_model(need_tokenizer=isinstance(data, list))
    batches = [list(model_batches(data, tokenizer, settings.batch_size, settings.max_length,
                                  by_length=by_length)) for by_length in (False, True)]
    return Probe(model, *batches, loss_kind(RecoverSettings(), model))


def probed_candidates(count: int) -> list[int]:
    """Which of ``count`` candidates a measured matrix measures: every other one and the last."""
    return sorted({*range(0, count, 2), count - 1})


def record_measured(entry: dict, rows: list, losses: dict[int, float]) -> list:
    """Puts measured ``losses`` ({rank: loss}) into a measured matrix's scores ``entry``: its
    candidates from the lowest measured rank up interpolated between the measured ones (the
    loss falls smoothly with rank), those below None (pending). Returns the per-sequence
    samples ``rows`` at the new sizes: their directions kept (the knapsack's cross terms)."""
    ranks = entry["ranks"]
    known = {r: s for r, s in zip(ranks, entry["scores"]) if r in entry["measured"]}
    known.update(losses)
    measured = sorted(known)
    entry["pending"] = [r for r in entry["pending"] if r not in known]
    scores = [float(v) if r >= measured[0] else None
              for r, v in zip(ranks, np.interp(ranks, measured, [known[r] for r in measured]))]
    # each column's samples sum to its current score (the estimate where none was measured)
    before = [s if s is not None else e for s, e in zip(entry["scores"], entry["second_order"])]
    size = [math.sqrt(new / old) if new is not None and old > 0 else 1.0
            for new, old in zip(scores, before)]
    entry["scores"], entry["measured"] = scores, measured
    return [[v * c for v, c in zip(row, size)] for row in rows]


def pending_count(scores: dict) -> int:
    """How many candidates ``scores`` left to measure."""
    return sum(len(e.get("pending", ())) for e in scores["matrices"].values())


def measure_pending(ckpt: Checkpoint, scores: dict, settings, stats=None, factory=None,
                    on_step: Callable[[str], None] | None = None,
                    probe: Probe | None = None) -> dict:
    """``scores`` (made with ``settings``) with every measured matrix's pending candidates
    measured, as a new artifact: for a plan that would factor one of them
    (:func:`lowrank.stages.knapsack.loss_allocation`). ``probe``: its :func:`probe_data`, when
    loaded already."""
    pending = {n: e["pending"] for n, e in scores["matrices"].items() if e.get("pending")}
    if not pending:
        return scores
    model, _, batches, kind = probe or probe_data(ckpt, settings, stats, factory)
    matrices, directions = dict(scores["matrices"]), dict(scores["directions"])
    for name, ranks in pending.items():
        entry = matrices[name] = dict(matrices[name])  # the scores stage's own entry unchanged
        factors = leading_factors(ckpt, name, stats, entry["ranks"][-1])
        losses = plan_losses(model, batches, kind, [{name: r} for r in ranks],
                             lambda _, f=factors: f, autocast_dtype(settings.measure_dtype),
                             on_step)
        directions[name] = record_measured(entry, directions[name], dict(zip(ranks, losses)))
    return {**scores, "matrices": matrices, "directions": directions}


def measure_joint(ckpt: Checkpoint, settings, stats, plans: list[dict[str, int]],
                  factory=None, probe: Probe | None = None) -> list[float]:
    """The measured distillation loss on the probe batch of each plan ({tensor name: rank}),
    all its matrices factored at once as the scores assumed (:func:`leading_factors`).
    ``probe``: its :func:`probe_data`, when loaded already."""
    model, _, batches, kind = probe or probe_data(ckpt, settings, stats, factory)
    # Factors per matrix up to the largest rank any plan gives it, sliced to each plan's rank
    largest = {n: max(p[n] for p in plans if n in p) for n in set().union(*plans)}
    factors: dict[str, tuple] = {}

    def factors_of(name: str) -> tuple:
        if name not in factors:
            factors[name] = leading_factors(ckpt, name, stats, largest[name])
        return factors[name]
    return plan_losses(model, batches, kind, plans, factors_of,
                       autocast_dtype(settings.measure_dtype))


def plan_losses(model: nn.Module, batches: list, kind: str, plans: list[dict[str, int]],
                factors_of: Callable[[str], tuple], dtype: torch.dtype = torch.float32,
                on_plan=None) -> list[float]:
    """The distillation loss to ``model`` itself on ``batches`` of each plan, its matrices set
    to A[:, :r]·B[:r] for (A, B) = ``factors_of(name)`` while the plan runs; the passes
    autocast to ``dtype`` (CPU)."""
    params = dict(model.named_parameters())
    with torch.inference_mode(), cpu_autocast(dtype):
        refs = [model(**inputs, output_hidden_states=kind == "hidden") for inputs, _ in batches]
        losses = []
        for plan in plans:
            originals = {n: params[n].detach().clone() for n in plan}
            for name, rank in plan.items():
                A, B = factors_of(name)
                params[name].copy_((A[:, :rank] @ B[:rank]).reshape(params[name].shape))
            total, count = 0.0, 0
            for (inputs, mask), ref in zip(batches, refs):
                out = model(**inputs, output_hidden_states=kind == "hidden")
                n = int(mask.sum()) if mask is not None else 1
                total += float(distillation_loss(out, ref, mask, kind)) * n
                count += n
            losses.append(total / count)
            for name, original in originals.items():
                params[name].copy_(original)
            if on_plan:
                on_plan(f"{len(losses)} of {len(plans)} measured")
    return losses
