"""Rank planning: policies -> :class:`RankPlan`, a JSON file users can read, edit and re-apply.

Keys are tensor names (``encoder.layer.0.attention.self.query.weight``); a layer whose rank is
``null`` stays dense, with the reason recorded.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import InputError, LowrankError
from .spectrum import Spectra, Spectrum

POLICIES = ("energy", "rank", "rank_fraction", "param_ratio", "latency_ratio")
# Tensors a low-rank module can replace: a module's ``weight`` (Linear, Embedding, Conv) and the
# recurrent weights of LSTM/GRU/RNN (lowrank.layers.LowRankRNN); ``in_proj_weight`` and other
# parameters used outside a module's own weight stay dense.
FACTORABLE = re.compile(r"(^|\.)(weight|weight_(ih|hh)_l\d+(_reverse)?)$")


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
    # saves little and costs a second matmul (slower on CPUs, see DESIGN.md).
    guard: float = 0.8
    multiple: int = 1  # round ranks up to a multiple of this (SIMD/tile-friendly shapes)
    min_numel: int = 4096  # smaller matrices stay dense: nothing worth saving
    include: tuple[str, ...] = ()  # glob patterns on tensor names; empty = all
    exclude: tuple[str, ...] = ()
    # Keep a Linear dense when its factors are not faster than dense on this CPU at every one
    # of these token counts (batch × sequence), by a cached microbenchmark (lowrank.latency).
    latency_tokens: tuple[int, ...] = ()
    latency_threads: int = 2

    def __post_init__(self):
        chosen = [p for p in POLICIES if getattr(self, p) is not None]
        if len(chosen) != 1:
            raise InputError(
                "choose exactly one rank policy: --energy, --rank, --rank-fraction or --param-ratio"
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


@dataclass
class LayerPlan:
    shape: list[int]
    rank: int | None  # None: keep dense
    reason: str | None = None  # why it stays dense
    energy: float | None = None  # expected fraction of spectral energy kept at ``rank``

    def params(self) -> int:
        m, n = self.shape[0], math.prod(self.shape[1:])
        return m * n if self.rank is None else self.rank * (m + n)


@dataclass
class RankPlan:
    layers: dict[str, LayerPlan]
    total_params: int  # the whole checkpoint, dense
    policy: dict = field(default_factory=dict)
    format_version: int = 1

    @property
    def params_after(self) -> int:
        matrices_before = sum(math.prod(p.shape) for p in self.layers.values())
        return self.total_params - matrices_before + sum(p.params() for p in self.layers.values())

    def factored(self) -> dict[str, LayerPlan]:
        return {k: v for k, v in self.layers.items() if v.rank is not None}

    def to_json(self) -> dict:
        layers = {}
        for name, p in self.layers.items():
            entry = {"shape": p.shape, "rank": p.rank}
            if p.reason:
                entry["reason"] = p.reason
            if p.energy is not None:
                entry["energy"] = round(p.energy, 6)
            layers[name] = entry
        after = self.params_after
        return {
            "format": "lowrank.plan",
            "version": self.format_version,
            "policy": self.policy,
            "params": {"before": self.total_params, "after": after,
                       "ratio": round(after / self.total_params, 6)},
            "layers": layers,
        }


def _candidate_reason(name: str, s: Spectrum, settings: PlanSettings) -> str | None:
    """Why a matrix cannot be factored at all, or None if it is a candidate."""
    if settings.include and not any(fnmatch.fnmatchcase(name, p) for p in settings.include):
        return "not included"
    if any(fnmatch.fnmatchcase(name, p) for p in settings.exclude):
        return "excluded"
    if not FACTORABLE.search(name):
        return ("not a module weight (factored: <module>.weight and the weight_ih/weight_hh_l<k> "
                "of LSTM/GRU/RNN)")
    if not s.finite:
        return "contains NaN/Inf; kept as is"
    if min(s.rows, s.cols) < 2:
        return f"a {s.rows}x{s.cols} matrix: rank 1 saves nothing"
    if s.rows * s.cols < settings.min_numel:
        return f"tiny (< {settings.min_numel} elements)"
    return None


def _round_rank(rank: int, s: Spectrum, multiple: int) -> int:
    return min(max(multiple, math.ceil(rank / multiple) * multiple), min(s.rows, s.cols))


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
              matmul_names: set[str] | None = None) -> RankPlan:
    """Choose a rank (or dense) for every matrix of ``spectra`` under ``settings``' policy.

    ``weights`` (tensor name -> factor, default 1) scale each layer's energy in the global
    ``param_ratio`` allocation; :func:`lowrank.sensitivity.layer_weights` measures them.
    With ``settings.latency_tokens`` and a :class:`~lowrank.latency.LatencyTable`, every factored
    matrix in ``matmul_names`` (Linear weights; default: names without "embed") whose factors
    are not faster than dense on this CPU stays dense, and a budget is re-allocated without it.

    Example:
        >>> plan = make_plan(spectra, PlanSettings(param_ratio=0.6))  # doctest: +SKIP
        >>> plan.params_after / plan.total_params  # doctest: +SKIP
        0.5996
    """
    slow: dict[str, str] = {}  # matrices the latency check keeps dense, with the reason
    for _ in range(10):  # each pass can only add to `slow`; a budget settles in a few
        layers = _plan_layers(spectra, settings, weights or {}, slow, latency, matmul_names)
        if not settings.latency_tokens or latency is None:
            break
        newly = {}
        for name, layer in layers.items():
            if layer.rank is None or name in slow:
                continue
            if not _is_matmul(name, matmul_names):
                continue
            s = spectra.matrices[name]
            why = _slower_factored(latency, s, layer.rank, settings.latency_tokens)
            if why:
                newly[name] = why
        if not newly:
            break
        slow.update(newly)
    ordered = {name: layers[name] for name in spectra.matrices}
    policy = {k: v for k, v in asdict(settings).items() if v is not None and v != ()}
    return RankPlan(ordered, spectra.total_params, policy)


def _slower_factored(latency, s: Spectrum, rank: int, tokens_list) -> str | None:
    """Why rank-``rank`` factors of ``s`` do not pay on this CPU, or None when they are faster
    than dense at every token count."""
    for tokens in tokens_list:
        dense, factored = latency.ms(s.rows, s.cols, None, tokens), latency.ms(s.rows, s.cols, rank, tokens)
        if factored >= dense:
            return (f"factored is not faster on this CPU: {factored:.3f} ms vs dense "
                    f"{dense:.3f} ms at {tokens} tokens")
    return None


def _is_matmul(name: str, matmul_names: set[str] | None) -> bool:
    return name in matmul_names if matmul_names is not None else "embed" not in name


def _plan_layers(spectra: Spectra, settings: PlanSettings, weights: dict[str, float],
                 forced_dense: dict[str, str], latency=None,
                 matmul_names: set[str] | None = None) -> dict[str, LayerPlan]:
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
        layers.update(_allocate_budget(candidates, costs, budget, settings, weights))
        return layers
    if settings.latency_ratio is not None:
        if latency is None:
            raise LowrankError("--latency-ratio needs latency measurements (the plan stage "
                               "takes them; make_plan needs latency=LatencyTable)")
        matmuls = {n: s for n, s in candidates.items() if _is_matmul(n, matmul_names)}
        for name in set(candidates) - set(matmuls):
            layers[name] = LayerPlan(list(candidates[name].shape), None,
                                     "not a matmul: factoring cannot save time")
        costs = {n: latency_cost(latency, s, settings) for n, s in matmuls.items()}
        budget = settings.latency_ratio * sum(c.dense for c in costs.values())
        layers.update(_allocate_budget(matmuls, costs, budget, settings, weights))
        return layers
    for name, s in candidates.items():
        if settings.energy is not None:
            rank, why = s.rank_for_energy(settings.energy), f"{settings.energy:.0%} energy"
        elif settings.rank is not None:
            rank, why = min(settings.rank, s.rows, s.cols), "rank"
        else:
            rank, why = math.ceil(settings.rank_fraction * min(s.rows, s.cols)), "rank"
        if rank is not None:
            rank = _round_rank(rank, s, settings.multiple)
        layers[name] = _guarded(rank, s, settings, why)
    return layers


@dataclass(frozen=True)
class Cost:
    """What a matrix costs: ``base + unit·r`` factored at rank r, ``dense`` unfactored — in
    parameters (unit m + n, base 0, dense mn) or in measured milliseconds."""

    unit: float
    base: float
    dense: float

    def at(self, rank: int | None) -> float:
        return self.dense if rank is None else self.base + self.unit * rank


def latency_cost(latency, s: Spectrum, settings: PlanSettings) -> Cost:
    """Milliseconds of matrix ``s`` as a Linear on this CPU: dense, and a line through two
    factored ranks (¼ and ½ of break-even) — factored time grows linearly with the rank."""
    tokens = max(settings.latency_tokens or (2048,))
    r1 = max(1, math.floor(s.break_even / 4))
    r2 = max(r1 + 1, math.floor(s.break_even / 2))
    t1, t2 = (latency.ms(s.rows, s.cols, r, tokens) for r in (r1, r2))
    unit = max((t2 - t1) / (r2 - r1), 1e-9)
    return Cost(unit, max(t1 - unit * r1, 0.0), latency.ms(s.rows, s.cols, None, tokens))


def _ranks_at(threshold: float, candidates: dict[str, Spectrum], costs: dict[str, Cost],
              settings: PlanSettings, weights: dict[str, float]):
    """Each candidate keeps the singular values whose weighted normalized energy per unit of
    cost (w · σ² / ‖W‖² / unit) is at least ``threshold``; None = dense (past the guard)."""
    ranks = {}
    for name, s in candidates.items():
        scale = costs[name].unit * (s.total_energy or 1.0) / weights.get(name, 1.0)
        r = sum(1 for v in s.singular_values if v * v / scale >= threshold)
        r = _round_rank(max(r, 1), s, settings.multiple)
        ranks[name] = None if costs[name].at(r) >= settings.guard * costs[name].dense else r
    return ranks


def _total(ranks: dict, costs: dict[str, Cost]) -> float:
    return sum(costs[n].at(r) for n, r in ranks.items())


def _allocate_budget(candidates, costs, budget, settings, weights) -> dict[str, LayerPlan]:
    """Meet ``budget`` (parameters or milliseconds of the candidates), losing the least
    normalized spectral energy per unit of cost saved: bisect a global threshold, then spend
    the leftover budget greedily."""
    policy = settings.policy
    smallest = _total(_ranks_at(math.inf, candidates, costs, settings, weights), costs)
    if budget < smallest:
        raise LowrankError(
            f"{policy.replace('_', '-')} {getattr(settings, policy)} is out of reach: even rank "
            f"{settings.multiple} everywhere needs more (exclude fewer layers or lower the guard)"
        )
    # Threshold hi keeps the fewest values, lo keeps them all.
    top = max(1.0, *(1 / c.unit for c in costs.values())) if costs else 1.0
    lo, hi = 1e-30, top * (max(1.0, *weights.values()) if weights else 1.0)
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if _total(_ranks_at(mid, candidates, costs, settings, weights), costs) <= budget:
            hi = mid
        else:
            lo = mid
    ranks = _ranks_at(hi, candidates, costs, settings, weights)
    _fill_leftover(ranks, candidates, costs, settings, budget - _total(ranks, costs), weights)
    return {n: _guarded(ranks[n], s, settings, "budget") if ranks[n] is not None
            else LayerPlan(list(s.shape), None,
                           "budget allows dense: its rank would pass the break-even guard")
            for n, s in candidates.items()}


def _fill_leftover(ranks: dict, candidates: dict[str, Spectrum], costs: dict[str, Cost],
                   settings, leftover: float, weights: dict[str, float]):
    """Rank steps are discrete, so bisection stops short of the budget; spend the rest on the
    next singular values with the most energy per unit of cost."""
    step = settings.multiple
    while True:
        best, best_value = None, -1.0
        for name, s in candidates.items():
            r = ranks[name]
            if r is None or costs[name].at(r + step) >= settings.guard * costs[name].dense:
                continue
            cost = step * costs[name].unit
            if cost > leftover or r + step > len(s.singular_values):
                continue
            gain = (weights.get(name, 1.0) * sum(v * v for v in s.singular_values[r:r + step])
                    / (s.total_energy or 1.0))
            if gain / cost > best_value:
                best, best_value = name, gain / cost
        if best is None:
            return
        ranks[best] += step
        leftover -= step * costs[best].unit


# --------------------------------------------------------------------------------------------
# Plan files


def save_plan(plan: RankPlan, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(plan.to_json(), indent=2) + "\n")
    tmp.replace(path)


def read_plan_file(path: Path) -> dict:
    from .checkpoint import read_json_file

    data = read_json_file(path, "plan file")
    if not isinstance(data, dict) or not isinstance(data.get("layers"), dict):
        raise InputError(f"{path}: not a plan file (no \"layers\" object)")
    return data


def apply_plan(data: dict, spectra: Spectra, source: str = "plan") -> RankPlan:
    """Re-apply an (edited) plan file to a checkpoint's spectra, validating every entry.

    Matrices the plan does not list stay dense. Names that match no matrix, ranks that are not
    integers in [1, min(m, n)] and shapes that differ from the checkpoint are errors.
    """
    unknown = [n for n in data["layers"] if n not in spectra.matrices]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise InputError(f"{source}: {len(unknown)} layer(s) match no matrix in the checkpoint: {shown}")
    layers = {}
    for name, s in spectra.matrices.items():
        entry = data["layers"].get(name)
        if entry is None:
            layers[name] = LayerPlan(list(s.shape), None, "not in plan")
            continue
        if not isinstance(entry, dict):
            raise InputError(f"{source}: layer {name}: expected an object with a \"rank\"")
        shape = entry.get("shape")
        if shape is not None and (not isinstance(shape, list) or shape != list(s.shape)):
            raise InputError(f"{source}: layer {name}: shape {shape} but the checkpoint has "
                             f"{list(s.shape)} (was the plan made for another model?)")
        rank, reason = entry.get("rank"), entry.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise InputError(f"{source}: layer {name}: \"reason\" must be a string")
        if rank is None:
            layers[name] = LayerPlan(list(s.shape), None, reason or "dense in plan")
            continue
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(s.rows, s.cols):
            raise InputError(f"{source}: layer {name}: rank {rank!r} must be an integer in "
                             f"[1, {min(s.rows, s.cols)}] or null (dense)")
        if not s.finite:
            raise InputError(f"{source}: layer {name}: holds NaN/Inf and cannot be factored")
        layers[name] = LayerPlan(list(s.shape), rank, energy=s.energy_at(rank))
    policy = data.get("policy") or {}
    if not isinstance(policy, dict):
        raise InputError(f"{source}: \"policy\" must be an object")
    policy = dict(policy, applied_from=source)
    return RankPlan(layers, spectra.total_params, policy)
