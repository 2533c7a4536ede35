"""Measured-loss allocation: each matrix picks one candidate (a rank, or dense) so that the
parameter budget is met and the summed end-to-end loss is least — a multiple-choice knapsack,
solved exactly by dynamic programming over the parameters saved.

Scores come from :mod:`lowrank.stages.scores` (each matrix alone). Losses compound across
layers, so after solving, the plan is re-solved once with each matrix's score taken *given the
others' choices* (the cross terms of the second-order estimate), and both plans are run jointly
on the probe batch: the one with the lower measured loss wins, and the plan records both.

A candidate whose loss the scores left pending (None: the input embedding's below its largest,
:func:`lowrank.stages.probe.measure_pending`) counts at the lower bound the monotone scores
give it, the loss of the next measured rank above. Both plans solved that way that keep its
matrix dense are the plans the measured losses would give (no plan's loss can fall when bounds
become measured values, and these plans hold none of them), so its candidates are measured only
when one of the plans factors it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..errors import LowrankError
from .allocate import round_rank
from .analyze import Spectrum

# Savings are counted in units of required/RESOLUTION parameters (1 when that is coarser),
# rounded down, so a solution always meets the budget and loses at most 1/RESOLUTION of it.
RESOLUTION = 20000


def solve_mck(groups: dict[str, list[tuple[int, float]]], required: int,
              resolution: int = RESOLUTION) -> dict[str, int]:
    """Choose one option (saving ≥ 0, loss) per group with Σ saving ≥ ``required`` and the least
    Σ loss; returns the chosen option's index per group. Exact when savings are integers and
    ``required`` <= ``resolution``; otherwise exact on savings rounded down to the unit."""
    unit = max(1, math.ceil(required / resolution)) if required > 0 else 1
    need = max(0, math.ceil(required / unit))
    dp = np.full(need + 1, np.inf)  # dp[x]: least loss saving >= x units (x = need: need or more)
    dp[0] = 0.0
    steps = []  # per group: (choice per state, predecessor per state)
    for options in groups.values():
        best = np.full(need + 1, np.inf)
        choice = np.full(need + 1, -1, dtype=np.int32)
        prev = np.arange(need + 1)
        for i, (saving, loss) in enumerate(options):
            s = min(int(saving) // unit, need)
            cand = dp + loss
            # Moving from state x to min(x + s, need): plain shift below `need`, the rest pile up.
            if s == 0:
                src, dst = np.arange(need + 1), np.arange(need + 1)
                better = cand < best
                best[better], choice[better], prev[better] = cand[better], i, src[better]
                continue
            lo = cand[:need + 1 - s]
            dst = np.arange(s, need + 1)
            top = need - s + int(np.argmin(cand[need - s:]))  # best source reaching `need`
            values, sources = lo.copy(), np.arange(need + 1 - s)
            values[-1], sources[-1] = cand[top], top
            better = values < best[dst]
            best[dst[better]] = values[better]
            choice[dst[better]] = i
            prev[dst[better]] = sources[better]
        dp = best
        steps.append((choice, prev))
    if not np.isfinite(dp[need]):
        raise LowrankError("the parameter budget is out of reach with the candidate ranks")
    chosen, state = {}, need
    for name, (choice, prev) in zip(reversed(list(groups)), reversed(steps)):
        chosen[name] = int(choice[state])
        state = int(prev[state])
    return {name: chosen[name] for name in groups}


def _options(s: Spectrum, entry: dict,
             settings) -> list[tuple[int | None, int, float | None, int]]:
    """(rank or None, parameters saved, score (None: pending), column in the scores' samples)
    per candidate."""
    options = [(None, 0, 0.0, -1)]
    seen = set()
    for col, (rank, score) in enumerate(zip(entry["ranks"], entry["scores"])):
        r = round_rank(rank, s, settings.multiple)
        if r >= settings.guard * s.break_even or r in seen:
            continue
        seen.add(r)
        options.append((r, s.rows * s.cols - r * (s.rows + s.cols),
                        None if score is None else float(score), col))
    return options


def _monotone(values: list[float | None]) -> list[float]:
    """A lower rank drops a superset of directions: never score it below a higher rank (the
    estimate is sampled; without this, noise would buy savings beyond the budget). None
    (pending) gets the lower bound this gives it."""
    out = [0.0 if v is None else v for v in values]
    for i in range(len(out) - 2, 0, -1):  # options: dense, then ranks ascending
        out[i] = max(out[i], out[i + 1])
    return out


def _solve(options: dict[str, list], scores: dict[str, list[float]], required: int) -> dict:
    groups = {n: [(opt[1], score) for opt, score in zip(options[n], _monotone(scores[n]))]
              for n in options}
    return solve_mck(groups, required)


def _samples(directions: dict, options: dict, choice: dict) -> dict[str, np.ndarray]:
    """Per matrix, the per-sequence samples of its chosen candidate (zeros when dense)."""
    out = {}
    for name, i in choice.items():
        col = options[name][i][3]
        rows = np.asarray(directions[name])
        out[name] = rows[:, col] if col >= 0 else np.zeros(rows.shape[0])
    return out


def _solve_both(candidates: dict[str, Spectrum], scores: dict, required: int, settings):
    """The options, the scores alone, the first plan and the one refined by cross terms."""
    matrices, directions = scores["matrices"], scores["directions"]
    options = {n: _options(s, matrices[n], settings) for n, s in candidates.items()
               if n in matrices}
    alone = {n: [opt[2] for opt in opts] for n, opts in options.items()}
    first = _solve(options, alone, required)
    # Cross terms given the first plan: the joint estimate Σ_s (Σ_m a_sm)² changes by
    # (R + a)² − R² when matrix m moves to candidate a, R the others' sum (clipped at 0: noise).
    chosen = _samples(directions, options, first)
    joint = sum(chosen.values())
    given = {}
    for name, opts in options.items():
        rest = joint - chosen[name]
        rows = np.asarray(directions[name])
        given[name] = [None if score is None else 0.0 if col < 0 else
                       max(0.0, float(((rest + rows[:, col]) ** 2 - rest ** 2).sum()))
                       for _, _, score, col in opts]
    return options, alone, first, _solve(options, given, required)


def loss_allocation(candidates: dict[str, Spectrum], scores: dict, required: float, settings,
                    measure: Callable[[list[dict[str, int]]], list[float]] | None = None,
                    complete: Callable[[dict], dict] | None = None):
    """Ranks (None: dense) for ``candidates`` saving at least ``required`` parameters with the
    least estimated loss, after one compounding refinement (module docstring).

    ``complete(scores)`` gives the scores with their pending candidates measured, when a plan
    needs them (:func:`lowrank.stages.probe.measure_pending`).
    Returns ``(ranks, tables, info)``: tables holds each scored matrix's candidate scores
    ({rank: loss or None (not measured), "dense": 0}) for the plan file, info the solver's and
    the check's numbers.
    """
    required = math.ceil(required)
    options, alone, first, refined = _solve_both(candidates, scores, required, settings)
    factored_pending = [n for n, opts in options.items() if any(o[2] is None for o in opts)
                        and (opts[first[n]][0] is not None or opts[refined[n]][0] is not None)]
    if factored_pending:
        if complete is None:
            raise LowrankError(f"the plan would factor {factored_pending[0]}, whose candidates "
                               f"are not all measured: pass complete= "
                               f"(lowrank.stages.probe.measure_pending)")
        scores = complete(scores)
        options, alone, first, refined = _solve_both(candidates, scores, required, settings)
    directions = scores["directions"]

    def describe(choice):
        samples = _samples(directions, options, choice)
        return {"sum_of_scores": sum(alone[n][i] for n, i in choice.items()),
                "second_order_joint": float((sum(samples.values()) ** 2).sum()),
                "params_saved": sum(options[n][i][1] for n, i in choice.items())}

    info = {"solver": "multiple-choice knapsack, dynamic programming over parameters saved",
            "required_saving": required, "first": describe(first),
            "refined": describe(refined), "chosen": "first"}
    unmeasured = {n: [o[0] for o in opts if o[2] is None] for n, opts in options.items()}
    if any(unmeasured.values()):
        info["not_measured"] = {
            "why": "dense in both plans even at the lower bound of these candidates' losses "
                   "(the loss of the next measured rank above): measuring could not change them",
            **{n: ranks for n, ranks in unmeasured.items() if ranks}}
    plans = [{n: options[n][i][0] for n, i in c.items() if options[n][i][0] is not None}
             for c in (first, refined)]
    final = first
    if measure is not None:
        measured = measure(plans if first != refined else plans[:1])
        info["first"]["measured_joint"] = measured[0]
        info["refined"]["measured_joint"] = measured[-1]
        if measured[-1] < measured[0]:
            final, info["chosen"] = refined, "refined"
        best = info[info["chosen"]]
        if best["sum_of_scores"] > 0:
            info["compounding"] = best["measured_joint"] / best["sum_of_scores"]
    ranks = {n: options[n][i][0] for n, i in final.items()}
    tables = {n: {**{str(o[0]): None if o[2] is None else round(o[2], 8)
                     for o in opts if o[0] is not None}, "dense": 0.0}
              for n, opts in options.items()}
    return ranks, tables, info
