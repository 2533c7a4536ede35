"""Candidate scores: the end-to-end loss each matrix causes alone at each candidate rank.

For the measured-loss allocation (:mod:`lowrank.stages.knapsack`). Measuring every candidate by
a forward pass is out of reach on a CPU (SmolLM2-135M: 211 matrices × several ranks × a forward
of seconds each), so the loss is estimated to second order from the same data, end to end:

- The distillation loss to the dense model (KL of next-token distributions for LMs; normalized
  hidden-state or output MSE otherwise, :func:`lowrank.stages.distillation.distillation_loss`) is
  zero with zero gradient at the dense weights; its Hessian there is a Fisher / Gauss-Newton
  matrix F, and loss(δ) ≈ ½ δᵀFδ for a weight change δ.
- F = E[ggᵀ] for g the gradient of a *sampled* objective: next tokens drawn from the dense
  model's own distribution (logits), or Gaussian noise projected on the outputs (MSE). One
  backward pass per batch gives, for each probe sequence s, its sample a_s = ⟨g_s, δ⟩, and
  Σ_s a_s² estimates the loss on the probe batch (see ``_objective`` for the scale).
- δ = W − W_r for the factors factorize computes (data-aware weighting): with the factors
  A (m×K), B (K×n) of :func:`lowrank.linalg.weighted_factors` up to the largest candidate rank
  K, W_r = A[:, :r]·B[:r], so ⟨g, (W − W_r)x⟩ = gᵀWx − Σ_{i<r} (Aᵀg)_i (Bx)_i: one cumulative
  sum scores every rank at once. The factors come from the float64 Gram eigenvectors
  (``gram``), memoized in the statistics
  (:meth:`~lowrank.stages.calibrate.ActivationStats.gram_eigh`, computed by the analysis):
  factorization's truncated factors, same solver and thread count, reuse that eigensolve.
  The products with the gradients run in float32 (the gradients are float32), the
  per-sequence sums in float64.
- A weight used twice (a tied embedding and LM head) sums the contributions of both uses: one
  decision, scored with both uses factored.

The input embedding is the exception: the estimate is far off there, so its candidates are
measured (``ScoreSettings.measure_embedding``): every other one by a forward pass over the probe
batch (:func:`lowrank.stages.probe.plan_losses`), those between interpolated; its samples are
rescaled to the measured losses. Here only the largest candidate is measured; the others stay
``pending`` (score None) until a plan needs them (:func:`lowrank.stages.probe.measure_pending`):
a lower rank loses at least as much as the largest (the knapsack's scores are monotone), so a
plan that keeps the matrix dense at that lower bound keeps it dense at the measured losses too,
and the measurements are skipped (SmolLM2 at 85%: 7 passes, ~11 s).

The artifact keeps each sequence's a_{s,c} per matrix and candidate, so the planner can add the
cross terms between matrices (compounding, to second order) and compare with a measured joint
loss (:func:`lowrank.stages.probe.measure_joint`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..device import autocast_dtype, check_pass_dtype
from ..errors import InputError
from ..io.checkpoint import Checkpoint
from ..parallel import AUTO, ordered_map, resolve_workers
from ..pipeline.stage import Context, Stage, json_loader, json_saver, register_stage
from .analyze import Spectra
from .calibrate import ActivationStats
from .fisher import sampled_objective as _objective
from .probe import (
    leading_factors_with,
    matrix_weighting,
    plan_losses,
    probe_data,
    probed_candidates,
    record_measured,
)

SCORES_FORMAT, SCORES_VERSION = "lowrank.scores", 1


@dataclass(frozen=True)
class ScoreSettings:
    # Candidate ranks, × each matrix's break-even rank (the plan also keeps "dense"); scoring
    # every rank costs the same, so the grid is fine: the knapsack picks among these.
    fractions: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 16))
    samples: int = 64  # probe sequences (the first lines of the calibration text)
    max_length: int = 64
    batch_size: int = 16  # sequences per backward pass
    min_numel: int = 4096  # smaller matrices are not scored (the plan keeps them dense)
    seed: int = 0  # the sampled labels / noise
    # The input embedding's candidates measured (every other one, a forward pass over the probe
    # batch each; those between interpolated; all but the largest only when the plan could pick
    # them: measure_pending), not estimated to second order: a deep cut moves
    # every token's row far outside the quadratic regime. MiniLM's word embedding at rank 18 /
    # 37 / 132: estimated 0.137 / 0.122 / 0.067, measured 0.695 / 0.447 / 0.095; SmolLM2's at
    # 28 / 426: 8.29 / 3.50 against 3.93 / 1.87 (their Linears' estimates: within ~20%).
    measure_embedding: bool = True
    # What the passes that measure a loss (the embedding's candidates, the plan's joint check)
    # autocast to on CPU (lowrank.device.PASS_DTYPES). bf16 where the CPU multiplies it natively:
    # SmolLM2's 8 measured embedding candidates in 12.8 s instead of 20.2, each loss within
    # 0.5% of float32's (benchmarks/measured_passes.py). The second-order scores' backward
    # passes stay float32.
    measure_dtype: str = "auto"

    @classmethod
    def of(cls, scores: dict) -> ScoreSettings:
        """The settings a scores artifact was made with."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v
                      for k, v in scores["settings"].items()})

    def __post_init__(self):
        if not self.fractions or not all(0 < f < 1 for f in self.fractions):
            raise InputError("score fractions must be in (0, 1)")
        check_pass_dtype(self.measure_dtype, "scores measure_dtype")
        if min(self.samples, self.max_length, self.batch_size) < 1:
            raise InputError("score samples, max_length and batch_size must be >= 1")


def candidate_ranks(rows: int, cols: int, fractions) -> list[int]:
    be = rows * cols / (rows + cols)
    return sorted({max(1, math.floor(f * be)) for f in fractions})


class _Scorer:
    """Hooks on every module using a scored matrix: per sequence, the samples a_{s,r} for all
    ranks r (a cumulative sum over singular directions), summed over the matrix's uses."""

    def __init__(self, model: nn.Module, factors: dict[str, tuple], params: dict[int, str]):
        self.factors, self.handles, self.samples, self.batch = factors, [], {}, 0
        self.uses: dict[str, list[str]] = {n: [] for n in factors}
        for fqn, module in model.named_modules():
            name = params.get(id(getattr(module, "weight", None)))
            if name is None or not isinstance(module, (nn.Linear, nn.Embedding)):
                continue
            self.uses[name].append(fqn)
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module, args, out):
            if not out.requires_grad:  # nothing upstream needs a gradient: start the graph here
                out = out.detach().requires_grad_()
            x = args[0].detach()
            linear = isinstance(module, nn.Linear)
            plain = out.detach() - module.bias if linear and module.bias is not None else out.detach()
            out.register_hook(lambda g: self._accumulate(name, linear, x, plain, g))
            return out
        return hook

    def _accumulate(self, name, linear, x, plain, g):
        A, B = self.factors[name]
        g = g.detach().to(A.dtype)
        lead = g.shape[0]
        # ⟨g, Wx⟩ per sequence; sums in float64 (the score of rank r is a difference of them)
        full = (g * plain.to(A.dtype)).reshape(lead, -1).sum(1, dtype=torch.float64)
        if linear:  # (Aᵀg)_i (Bx)_i
            parts = (g @ A) * (x.to(A.dtype) @ B.T)
        else:  # an embedding row W[id] = A[id]·B: (A[id])_i (Bg)_i
            parts = A[x] * (g @ B.T)
        parts = parts.reshape(lead, -1, parts.shape[-1]).sum(1, dtype=torch.float64)  # (seq, k)
        kept = torch.cumsum(parts, 1)
        total = full[:, None] - torch.cat([torch.zeros(lead, 1, dtype=kept.dtype), kept], 1)
        if lead != self.batch:  # shared over the batch (position embeddings): one sample, still
            # unbiased (sequences' samples are independent with mean 0), kept in the first row
            total = torch.cat([total.sum(0, keepdim=True),
                               torch.zeros(self.batch - 1, total.shape[1], dtype=kept.dtype)])
        self.samples[name] = self.samples.get(name, 0) + total  # summed over uses

    def remove(self):
        for h in self.handles:
            h.remove()


def score_candidates(ckpt: Checkpoint, spectra: Spectra,
                     settings: ScoreSettings = ScoreSettings(),
                     stats: ActivationStats | None = None, factory=None,
                     on_step: Callable[[str], None] | None = None,
                     workers: int | str = AUTO) -> dict:
    """The scores artifact: for every scored matrix its candidate ranks, estimated loss at each
    (alone) and the per-sequence samples behind them (see the module docstring).

    The factors, up to each matrix's largest candidate rank (about half its full rank: the
    candidates stop at 0.75 × break-even), are computed ``workers`` matrices at a time
    (default: one per CPU core) in threads of this process, whatever the run's executor: the
    Gram eigenvectors they memoize in ``stats`` are the ones factorization reuses."""
    model, batches, length_batches, kind = probe_data(ckpt, settings, stats, factory)
    for p in model.parameters():
        p.requires_grad_(False)
    params = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        s = spectra.matrices.get(name)
        if s is not None and s.finite and s.rows * s.cols >= settings.min_numel \
                and min(s.rows, s.cols) >= 2:
            params.setdefault(id(p), name)
    factors = {}
    names = list(params.values())
    ranks = {n: candidate_ranks(spectra.matrices[n].rows, spectra.matrices[n].cols,
                                settings.fractions) for n in names}
    tasks = ((ckpt, n, matrix_weighting(ckpt, n, stats), stats, ranks[n][-1]) for n in names)
    for name, AB in zip(names, ordered_map(leading_factors_with, tasks, resolve_workers(workers),
                                           "thread")):
        factors[name] = AB
        if on_step:
            on_step(name)
    scorer = _Scorer(model, factors, params)
    gen = torch.Generator().manual_seed(settings.seed)
    rows: dict[str, list] = {n: [] for n in factors}
    tokens = 0
    try:
        for inputs, mask in batches:
            out = model(**inputs, output_hidden_states=kind == "hidden")
            objective, scale = _objective(out, mask, kind, gen)
            scorer.samples, scorer.batch = {}, next(iter(inputs.values())).shape[0]
            objective.backward()
            # Batches count by their real tokens, as measure_joint averages them.
            weight = int(mask.sum()) if mask is not None else 1
            tokens += weight
            for name, total in scorer.samples.items():
                rows[name].append(total * scale * math.sqrt(weight))
            if on_step:
                on_step(f"{len(next(iter(rows.values()), []))} batches")
    finally:
        scorer.remove()
    matrices, directions = {}, {}
    for name, parts in rows.items():
        if not parts:  # no module used it in the forward pass: not scored
            continue
        samples = torch.cat(parts) / math.sqrt(tokens)  # (sequences, K + 1): column r = rank r
        chosen = samples[:, ranks[name]]
        matrices[name] = {"ranks": ranks[name],
                          "scores": chosen.pow(2).sum(0).tolist(),
                          "uses": scorer.uses[name]}
        directions[name] = chosen.tolist()
    for name in _measured(model, params, settings, matrices):
        entry = matrices[name]
        probed = [entry["ranks"][i] for i in probed_candidates(len(entry["ranks"]))]
        largest = probed[-1:]  # the lower bound of the others' losses; they wait for the plan
        losses = plan_losses(model, length_batches, kind, [{name: r} for r in largest],
                             factors.__getitem__, autocast_dtype(settings.measure_dtype))
        entry.update(second_order=entry["scores"], measured=[], pending=probed[:-1])
        directions[name] = record_measured(entry, directions[name], dict(zip(largest, losses)))
        if on_step:
            on_step(f"{name} at rank {largest[0]} measured")
    return {"format": SCORES_FORMAT, "version": SCORES_VERSION, "kind": kind,
            "tokens": tokens, "settings": asdict(settings), "matrices": matrices,
            "directions": directions}


def _measured(model: nn.Module, params: dict[int, str], settings: ScoreSettings,
              matrices: dict) -> list[str]:
    """The scored matrices whose candidates are measured, not estimated: the input embedding
    (with ``settings.measure_embedding``)."""
    try:
        embedding = model.get_input_embeddings() if settings.measure_embedding else None
    except (AttributeError, NotImplementedError):  # not a transformers model
        embedding = None
    name = params.get(id(getattr(embedding, "weight", None)))
    return [name] if name in matrices else []


def _run(ctx: Context, settings: ScoreSettings, spectra: Spectra, calibrate=None) -> dict:
    total = sum(1 for s in spectra.matrices.values() if s.rows * s.cols >= settings.min_numel)
    steps = total + -(-settings.samples // settings.batch_size) + settings.measure_embedding
    with ctx.track("scores", steps) as advance:
        return score_candidates(ctx.checkpoint, spectra, settings, calibrate,
                                ctx.models.factory, advance,
                                resolve_workers(ctx.workers, ctx.device))


register_stage(Stage(
    "scores", ("analyze",), ScoreSettings, _run,
    save=json_saver("scores.json"),
    load=json_loader("scores.json"),
    uses=("calibrate",),
))
