"""Global rank allocation under a budget (parameters, or measured milliseconds): each matrix
keeps the singular values worth the most normalized energy per unit of cost."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import LowrankError
from .analyze import Spectrum


@dataclass(frozen=True)
class Cost:
    """What a matrix costs: ``base + unit·r`` factored at rank r, ``dense`` unfactored — in
    parameters (unit m + n, base 0, dense mn) or in measured milliseconds."""

    unit: float
    base: float
    dense: float

    def at(self, rank: int | None) -> float:
        return self.dense if rank is None else self.base + self.unit * rank


def latency_cost(latency, s: Spectrum, settings) -> Cost:
    """Milliseconds of matrix ``s`` as a Linear on this CPU: dense, and a line through two
    factored ranks (¼ and ½ of break-even) — factored time grows linearly with the rank."""
    tokens = max(settings.latency_tokens or (2048,))
    r1 = max(1, math.floor(s.break_even / 4))
    r2 = max(r1 + 1, math.floor(s.break_even / 2))
    t1, t2 = (latency.ms(s.rows, s.cols, r, tokens) for r in (r1, r2))
    unit = max((t2 - t1) / (r2 - r1), 1e-9)
    return Cost(unit, max(t1 - unit * r1, 0.0), latency.ms(s.rows, s.cols, None, tokens))


def _ranks_at(threshold: float, candidates: dict[str, Spectrum], costs: dict[str, Cost],
              settings, weights: dict[str, float]):
    """Each candidate keeps the singular values whose weighted normalized energy per unit of
    cost (w · σ² / ‖W‖² / unit) is at least ``threshold``; None = dense (past the guard)."""
    ranks = {}
    for name, s in candidates.items():
        scale = costs[name].unit * (s.total_energy or 1.0) / weights.get(name, 1.0)
        r = sum(1 for v in s.singular_values if v * v / scale >= threshold)
        r = round_rank(max(r, 1), s, settings.multiple)
        ranks[name] = None if costs[name].at(r) >= settings.guard * costs[name].dense else r
    return ranks


def _total(ranks: dict, costs: dict[str, Cost]) -> float:
    return sum(costs[n].at(r) for n, r in ranks.items())


def allocate_budget(candidates: dict[str, Spectrum], costs: dict[str, Cost], budget: float,
                    settings, weights: dict[str, float]) -> dict[str, int | None]:
    """Ranks (None: dense) meeting ``budget`` (parameters or milliseconds of the candidates),
    losing the least normalized spectral energy per unit of cost saved: bisect a global
    threshold, then spend the leftover budget greedily. ``settings``: the plan's
    :class:`~lowrank.stages.plan.PlanSettings`."""
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
    return ranks


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


def round_rank(rank: int, s: Spectrum, multiple: int) -> int:
    return min(max(multiple, math.ceil(rank / multiple) * multiple), min(s.rows, s.cols))


def slower_factored(latency, s: Spectrum, rank: int, tokens_list) -> str | None:
    """Why rank-``rank`` factors of ``s`` do not pay on this CPU, or None when they are faster
    than dense at every token count."""
    for tokens in tokens_list:
        dense, factored = latency.ms(s.rows, s.cols, None, tokens), latency.ms(s.rows, s.cols, rank, tokens)
        if factored >= dense:
            return (f"factored is not faster on this CPU: {factored:.3f} ms vs dense "
                    f"{dense:.3f} ms at {tokens} tokens")
    return None


def is_matmul(name: str, matmul_names: set[str] | None) -> bool:
    return name in matmul_names if matmul_names is not None else "embed" not in name
