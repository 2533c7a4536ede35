"""Rank planning: policies -> :class:`RankPlan`, a JSON file users can read, edit and re-apply.

Keys are tensor names (``encoder.layer.0.attention.self.query.weight``); a layer whose rank is
``null`` stays dense, with the reason recorded.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..errors import InputError, LowrankError
from ..naming import FACTORABLE
from ..pipeline.stage import Context, Stage, json_loader, json_saver, register_stage
from ..timing import LatencyTable, machine_key
from .allocate import Cost, allocate_budget, is_matmul, latency_cost, round_rank, slower_factored
from .analyze import Spectra, Spectrum
from .fusion import FUSION_TOKENS, PRECISIONS, keep_attention_fused
from .knapsack import loss_allocation
from .plan_file import LayerPlan, RankPlan, apply_plan, plan_from_json, read_plan_file
from .probe import measure_joint, measure_pending, pending_count, probe_data
from .scores import ScoreSettings
from .sensitivity import layer_weights

POLICIES = ("energy", "rank", "rank_fraction", "param_ratio", "latency_ratio")
ALLOCATIONS = ("loss", "energy")


@dataclass(frozen=True)
class PlanSettings:
    """Exactly one policy field is set. Ranks are per matrix (out × in·kernel view)."""

    energy: float | None = None  # keep this fraction of each matrix's spectral energy
    rank: int | None = None  # the same rank for every matrix
    rank_fraction: float | None = None  # rank = ceil(fraction × min(m, n))
    param_ratio: float | None = None  # keep this fraction of the whole checkpoint's parameters
    # Keep this fraction of the Linears' dense matmul time on this CPU, measured at the largest
    # of latency_tokens (2048 when empty); other matrices (embeddings) stay dense.
    latency_ratio: float | None = None
    # Keep a matrix dense when its rank reaches guard × mn/(m+n): near break-even, factoring
    # saves little and costs a second matmul (slower on CPUs: measured, lowrank.timing).
    guard: float = 0.8
    multiple: int = 1  # round ranks up to a multiple of this (SIMD/tile-friendly shapes)
    min_numel: int = 4096  # smaller matrices stay dense: nothing worth saving
    include: tuple[str, ...] = ()  # glob patterns on tensor names; empty = all
    exclude: tuple[str, ...] = ()
    # Keep a Linear dense when its factors are not faster than dense on this CPU at every one
    # of these token counts (batch × sequence), by a cached microbenchmark (lowrank.latency).
    latency_tokens: tuple[int, ...] = ()
    latency_threads: int = 2
    # param_ratio with candidate scores (the scores stage, run with calibration): "loss" picks
    # ranks by measured end-to-end loss (lowrank.stages.knapsack); "energy" by spectral energy.
    allocation: str = "loss"

    def __post_init__(self):
        if self.allocation not in ALLOCATIONS:
            raise InputError(f"allocation must be loss or energy, got {self.allocation!r}")
        chosen = [p for p in POLICIES if getattr(self, p) is not None]
        if len(chosen) != 1:
            raise InputError(
                "choose exactly one rank policy: energy, rank, rank_fraction, param_ratio or "
                "latency_ratio"
                + (f" (got {', '.join(chosen)})" if chosen else "")
            )
        for name in ("energy", "rank_fraction", "param_ratio", "latency_ratio"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise InputError(f"{name.replace('_', '-')} must be in (0, 1], got {value}")
        if self.rank is not None and self.rank < 1:
            raise InputError(f"rank must be >= 1, got {self.rank}")
        if not 0 < self.guard <= 1:
            raise InputError(f"guard must be in (0, 1], got {self.guard}")
        if self.multiple < 1:
            raise InputError(f"multiple must be >= 1, got {self.multiple}")

    @property
    def policy(self) -> str:
        return next(p for p in POLICIES if getattr(self, p) is not None)


def _candidate_reason(name: str, s: Spectrum, settings: PlanSettings) -> str | None:
    """Why a matrix cannot be factored at all, or None if it is a candidate."""
    if settings.include and not any(fnmatch.fnmatchcase(name, p) for p in settings.include):
        return "not included"
    if any(fnmatch.fnmatchcase(name, p) for p in settings.exclude):
        return "excluded"
    if not FACTORABLE.search(name):
        return ("not a module weight (factored: <module>.weight, the weight_ih/weight_hh_l<k> "
                "of LSTM/GRU/RNN and MultiheadAttention's in_proj_weight)")
    if not s.finite:
        return "contains NaN/Inf; kept as is"
    if min(s.rows, s.cols) < 2:
        return f"a {s.rows}x{s.cols} matrix: rank 1 saves nothing"
    if s.rows * s.cols < settings.min_numel:
        return f"tiny (< {settings.min_numel} elements)"
    return None


def _guarded(rank: int | None, s: Spectrum, settings: PlanSettings, why: str) -> LayerPlan:
    shape = list(s.shape)
    limit = settings.guard * s.break_even
    if rank is None:
        return LayerPlan(shape, None, f"{why} needs rank >= {math.floor(limit)} "
                                      f"(guard {settings.guard} x break-even {s.break_even:.0f})")
    if rank >= limit:
        return LayerPlan(shape, None, f"rank {rank} >= guard {settings.guard} x break-even "
                                      f"{s.break_even:.0f}: factoring would not pay")
    return LayerPlan(shape, rank, energy=s.energy_at(rank))


def make_plan(spectra: Spectra, settings: PlanSettings,
              weights: dict[str, float] | None = None, latency=None,
              matmul_names: set[str] | None = None, scores: dict | None = None,
              measure=None, dense: dict[str, str] | None = None, complete=None) -> RankPlan:
    """Choose a rank (or dense) for every matrix of ``spectra`` under ``settings``' policy.

    ``weights`` (tensor name -> factor, default 1) scale each layer's energy in the global
    ``param_ratio`` allocation; :func:`lowrank.sensitivity.layer_weights` measures them.
    With ``settings.latency_tokens`` and a :class:`~lowrank.latency.LatencyTable`, every factored
    matrix in ``matmul_names`` (Linear weights; default: names without "embed") whose factors
    are not faster than dense on this CPU stays dense, and a budget is re-allocated without it.
    With ``scores`` (the scores stage's artifact) and ``allocation="loss"``, ``param_ratio`` is
    met by :func:`lowrank.stages.knapsack.loss_allocation` (``measure``: its joint check;
    ``complete``: what measures the candidates the scores left pending).
    ``dense`` (name -> why) are kept dense before the policy, so a budget goes to the others.

    Example:
        >>> plan = make_plan(spectra, PlanSettings(param_ratio=0.6))  # doctest: +SKIP
        >>> plan.params_after / plan.total_params  # doctest: +SKIP
        0.5996
    """
    forced = dict(dense or {})  # matrices kept dense (given, or by the latency check): why
    info: dict = {}
    for _ in range(10):  # each pass can only add to `forced`; a budget settles in a few
        loss = (scores, measure, complete, info) if scores and settings.allocation == "loss" \
            else None
        layers = _plan_layers(spectra, settings, weights or {}, forced, latency, matmul_names,
                              loss)
        if not settings.latency_tokens or latency is None:
            break
        newly = {}
        for name, layer in layers.items():
            if layer.rank is None or name in forced:
                continue
            if not is_matmul(name, matmul_names):
                continue
            s = spectra.matrices[name]
            why = slower_factored(latency, s, layer.rank, settings.latency_tokens)
            if why:
                newly[name] = why
        if not newly:
            break
        forced.update(newly)
    ordered = {name: layers[name] for name in spectra.matrices}
    policy = {k: v for k, v in asdict(settings).items() if v is not None and v != ()}
    if info:
        policy["loss_allocation"] = info
    return RankPlan(ordered, spectra.total_params, policy)


def _budget_layers(candidates, costs, budget, settings, weights) -> dict[str, LayerPlan]:
    ranks = allocate_budget(candidates, costs, budget, settings, weights)
    return {n: _guarded(ranks[n], s, settings, "budget") if ranks[n] is not None
            else LayerPlan(list(s.shape), None,
                           "budget allows dense: its rank would pass the break-even guard")
            for n, s in candidates.items()}


def _loss_layers(candidates, costs, budget, settings, scores, measure, complete, info):
    dense = sum(c.dense for c in costs.values())
    ranks, tables, found = loss_allocation(candidates, scores, dense - budget, settings, measure,
                                           complete)
    info.update(found)
    layers = {n: LayerPlan(list(s.shape), None, "not scored by the probe (kept dense)")
              for n, s in candidates.items() if n not in ranks}
    for name, rank in ranks.items():
        s = candidates[name]
        layers[name] = LayerPlan(list(s.shape), rank, None if rank else "least loss: dense",
                                 s.energy_at(rank) if rank else None, tables[name])
    return layers


def _plan_layers(spectra: Spectra, settings: PlanSettings, weights: dict[str, float],
                 forced_dense: dict[str, str], latency=None,
                 matmul_names: set[str] | None = None, loss=None) -> dict[str, LayerPlan]:
    layers: dict[str, LayerPlan] = {}
    candidates: dict[str, Spectrum] = {}
    for name, s in spectra.matrices.items():
        reason = forced_dense.get(name) or _candidate_reason(name, s, settings)
        if reason:
            layers[name] = LayerPlan(list(s.shape), None, reason)
        else:
            candidates[name] = s
    if settings.param_ratio is not None:
        costs = {n: Cost(s.rows + s.cols, 0.0, s.rows * s.cols) for n, s in candidates.items()}
        fixed = spectra.total_params - sum(s.rows * s.cols for s in candidates.values())
        budget = settings.param_ratio * spectra.total_params - fixed
        if loss is not None:
            layers.update(_loss_layers(candidates, costs, budget, settings, *loss))
        else:
            layers.update(_budget_layers(candidates, costs, budget, settings, weights))
        return layers
    if settings.latency_ratio is not None:
        if latency is None:
            raise LowrankError("latency_ratio needs latency measurements (the plan stage "
                               "takes them; make_plan needs latency=LatencyTable)")
        matmuls = {n: s for n, s in candidates.items() if is_matmul(n, matmul_names)}
        for name in set(candidates) - set(matmuls):
            layers[name] = LayerPlan(list(candidates[name].shape), None,
                                     "not a matmul: factoring cannot save time")
        costs = {n: latency_cost(latency, s, settings) for n, s in matmuls.items()}
        budget = settings.latency_ratio * sum(c.dense for c in costs.values())
        layers.update(_budget_layers(matmuls, costs, budget, settings, weights))
        return layers
    for name, s in candidates.items():
        if settings.energy is not None:
            rank, why = s.rank_for_energy(settings.energy), f"{settings.energy:.0%} energy"
        elif settings.rank is not None:
            rank, why = min(settings.rank, s.rows, s.cols), "rank"
        else:
            rank, why = math.ceil(settings.rank_fraction * min(s.rows, s.cols)), "rank"
        if rank is not None:
            rank = round_rank(rank, s, settings.multiple)
        layers[name] = _guarded(rank, s, settings, why)
    return layers


# --------------------------------------------------------------------------------------------
# The pipeline stage


@dataclass(frozen=True)
class PlanStageSettings(PlanSettings):
    plan_file: str | None = None  # re-apply this (edited) plan instead of a policy
    # "float32" | "int8": the precision of an export onnxruntime's optimizer fuses (--optimize
    # sets it): keep each attention's Q/K/V/output projections dense, so it fuses into one op,
    # when the whole model runs faster that way on this CPU at latency_tokens (16 and 2048 when
    # empty), measured (lowrank.stages.fusion). None: no check.
    attention_fusion: str | None = None

    def __post_init__(self):
        if self.attention_fusion not in (None, *PRECISIONS):
            raise InputError(f"attention_fusion must be float32 or int8, got "
                             f"{self.attention_fusion!r}")
        if self.plan_file is None:
            super().__post_init__()
        elif any(getattr(self, p) is not None for p in POLICIES):
            raise InputError("a plan file and a rank policy exclude each other; give one")


def _run(ctx: Context, settings: PlanStageSettings, spectra: Spectra,
              sensitivity=None, scores=None, calibrate=None) -> RankPlan:
    if settings.plan_file:
        return apply_plan(read_plan_file(Path(settings.plan_file)), spectra, settings.plan_file)
    policy = {f.name: getattr(settings, f.name) for f in fields(PlanSettings)}
    weights = layer_weights(sensitivity, spectra) if sensitivity else None
    latency, matmuls = None, None
    if settings.latency_tokens or settings.latency_ratio is not None:
        latency = LatencyTable.for_machine(ctx.cache_dir, settings.latency_threads)
        matmuls = ctx.models.linear_weight_names()

    probed = ScoreSettings.of(scores) if scores else None  # how the scores probed
    # Loaded once, and the pending candidates measured once, for every plan made below (the
    # latency and attention-fusion checks plan again)
    done: dict = {}

    def probe_batch():
        if "probe" not in done:
            done["probe"] = probe_data(ctx.checkpoint, probed, calibrate, ctx.models.factory)
        return done["probe"]

    def measure(plans):  # the loss allocation's joint check
        return measure_joint(ctx.checkpoint, probed, calibrate, plans, probe=probe_batch())

    def complete(partial):  # the candidates the scores left pending, when a plan needs them
        if "complete" not in done:
            with ctx.track("measured candidates", pending_count(partial)) as advance:
                done["complete"] = measure_pending(ctx.checkpoint, partial, probed, calibrate,
                                                   on_step=advance, probe=probe_batch())
        return done["complete"]

    def plan_for(dense=None):
        return make_plan(spectra, PlanSettings(**policy), weights, latency, matmuls, scores,
                         measure, dense, complete)

    plan = plan_for()
    if settings.attention_fusion and ctx.models.runnable:
        with ctx.track("attention fusion", 1) as advance:  # export, optimize and time twice
            plan = keep_attention_fused(plan, plan_for, ctx.models, settings.latency_tokens
                                        or FUSION_TOKENS, settings.latency_threads,
                                        settings.attention_fusion)
            advance("timed")
    for name, why in ctx.models.kept_dense().items():  # after the policy: budgets count them
        if name in plan.layers:
            plan.layers[name] = LayerPlan(plan.layers[name].shape, None, why)
    if latency is not None:
        latency.save()
    if weights:
        plan.policy["sensitivity_weights"] = {n: round(w, 4) for n, w in weights.items()}
    return plan


register_stage(Stage(
    "plan", ("analyze",), PlanStageSettings, _run,
    save=json_saver("plan.json", RankPlan.to_json),
    load=json_loader("plan.json", plan_from_json),
    emit=json_saver("plan.json", RankPlan.to_json),
    uses=("sensitivity", "scores", "calibrate"),
    machine=lambda settings: (machine_key(settings.latency_threads)
                              if settings.latency_tokens or settings.latency_ratio
                              or settings.attention_fusion else None),
))
