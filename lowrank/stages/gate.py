"""Gate: goals on a ``report.json`` -> pass/fail, for CI.

A goal names a metric, a type and a value (Olive's goal types). Each metric has the compressed
model's value and the dense baseline it is resolved against:

- ``threshold``: the value itself must reach ``value`` (≥ for higher-is-better metrics, ≤ else);
- ``min-improvement`` / ``max-degradation``: the change from the baseline, in the metric's
  direction, must be at least / at most ``value``;
- ``percent-min-improvement`` / ``percent-max-degradation``: the same in percent of the baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ..errors import GateFailed, InputError
from ..pipeline.stage import Stage, json_loader, json_saver, register_stage

GOAL_TYPES = ("threshold", "min-improvement", "max-degradation", "percent-min-improvement",
              "percent-max-degradation")


def _latency(report: dict, model: str) -> list[dict]:
    return [r for r in report["latency"]["results"] if r["model"] == model]


def _largest_point(report: dict, model: str) -> dict:
    return max(_latency(report, model), key=lambda r: (r["batch"] * r["sequence"], r["batch"]))


# name -> (higher is better, value(report), baseline(report)); a KeyError means "not measured".
METRICS: dict[str, tuple[bool, Callable[[dict], float], Callable[[dict], float]]] = {
    "cosine": (True, lambda r: r["fidelity"]["cosine"], lambda r: 1.0),
    "knn10": (True, lambda r: r["fidelity"]["knn10_overlap"], lambda r: 1.0),
    "perplexity": (False, lambda r: r["fidelity"]["perplexity"],
                   lambda r: r["fidelity"]["perplexity_dense"]),
    "params": (False, lambda r: r["params"]["after"], lambda r: r["params"]["before"]),
    "param_ratio": (False, lambda r: r["params"]["ratio"], lambda r: 1.0),
    "size_bytes": (False, lambda r: r["bytes"]["after"], lambda r: r["bytes"]["before"]),
    "onnx_max_abs_diff": (False, lambda r: max(v["max_abs_diff"] for v in r["export"]["validation"]),
                          lambda r: 0.0),
    # Latency: compressed vs dense ONNX at the largest measured batch x sequence point.
    "latency_p50_ms": (False, lambda r: _largest_point(r, "compressed")["p50_ms"],
                       lambda r: _largest_point(r, "dense")["p50_ms"]),
    # The smallest speedup over the whole grid: "never slower" is min-speedup 1.
    "speedup": (True, lambda r: min(p["compressed"] for p in r["latency"]["speedup"]),
                lambda r: 1.0),
    "int8_size_ratio": (False, lambda r: r["int8"]["bytes"] / r["export"]["bytes"], lambda r: 1.0),
}


@dataclass(frozen=True)
class Goal:
    metric: str
    type: str
    value: float

    def __post_init__(self):
        if self.metric not in METRICS:
            raise InputError(f"unknown gate metric {self.metric!r} (known: {', '.join(METRICS)})")
        if self.type not in GOAL_TYPES:
            raise InputError(f"unknown goal type {self.type!r} for {self.metric} "
                             f"(known: {', '.join(GOAL_TYPES)})")


@dataclass(frozen=True)
class GateSettings:
    """The ``[gate]`` table of a pipeline file: ``cosine = {type = "threshold", value = 0.95}``."""

    goals: dict = field(default_factory=dict)
    allow_missing: bool = False

    def __post_init__(self):
        self.parsed()  # a typo in a goal fails before any work

    def parsed(self) -> list[Goal]:
        goals = []
        for metric, spec in self.goals.items():
            if not isinstance(spec, dict) or set(spec) != {"type", "value"}:
                raise InputError(f"[gate] {metric}: expected {{type = \"...\", value = N}}")
            goals.append(Goal(metric, spec["type"], float(spec["value"])))
        return goals


def check(report: dict, goals: list[Goal], allow_missing: bool = False) -> list[dict]:
    """One result per goal: value, baseline, the bound it had to meet, passed (None: missing)."""
    results = []
    for goal in goals:
        higher, value_of, baseline_of = METRICS[goal.metric]
        try:
            value, baseline = float(value_of(report)), float(baseline_of(report))
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            if not allow_missing:
                raise InputError(f"gate: metric {goal.metric} was not measured in this report "
                                 f"(missing {e}); run the stage that measures it, or pass "
                                 f"--allow-missing") from e
            results.append({"metric": goal.metric, "type": goal.type, "value": None,
                            "passed": None})
            continue
        sign = 1 if higher else -1
        change = sign * (value - baseline)  # > 0 is better
        if goal.type == "threshold":
            passed = sign * (value - goal.value) >= 0
        elif goal.type.startswith("percent-"):
            pct = 100 * change / abs(baseline) if baseline else float("inf") * (change or 1)
            passed = pct >= goal.value if goal.type.endswith("improvement") else -pct <= goal.value
        else:
            passed = change >= goal.value if goal.type.endswith("improvement") else -change <= goal.value
        results.append({"metric": goal.metric, "type": goal.type, "goal": goal.value,
                        "value": value, "baseline": baseline, "passed": bool(passed)})
    return results


def raise_if_failed(results: list[dict], hint: str = "", attach: bool = False) -> None:
    """:class:`GateFailed` (exit 5) naming the failed metrics, when any goal failed; with
    ``attach`` the results ride along so the CLI prints every check."""
    failed = [r for r in results if r["passed"] is False]
    if failed:
        raise GateFailed(f"gate failed: {len(failed)} of {len(results)} checks ("
                         + ", ".join(r["metric"] for r in failed) + f"){hint}",
                         results if attach else None)


# Checked by run_pipeline on the finished report; the stage only validates the goals early.
register_stage(Stage(
    "gate", (), GateSettings, lambda ctx, settings: settings.parsed(),
    save=json_saver("goals.json", lambda goals: [asdict(g) for g in goals]),
    load=json_loader("goals.json", lambda goals: [Goal(**g) for g in goals]),
))
