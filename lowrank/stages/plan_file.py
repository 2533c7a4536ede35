"""The plan artifact and its file: :class:`RankPlan`, ``plan.json`` as ``lowrank plan`` writes it
and ``--plan FILE`` reads it back (:func:`apply_plan` validates it against a checkpoint)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..io.files import atomic_write_text, check_format, read_json_file
from .analyze import Spectra

PLAN_FORMAT, PLAN_VERSION = "lowrank.plan", 1


@dataclass
class LayerPlan:
    shape: list[int]
    rank: int | None  # None: keep dense
    reason: str | None = None  # why it stays dense
    energy: float | None = None  # expected fraction of spectral energy kept at ``rank``
    scores: dict | None = None  # loss allocation: loss per candidate rank (None: not measured)

    def params(self) -> int:
        m, n = self.shape[0], math.prod(self.shape[1:])
        return m * n if self.rank is None else self.rank * (m + n)


@dataclass
class RankPlan:
    layers: dict[str, LayerPlan]
    total_params: int  # the whole checkpoint, dense
    policy: dict = field(default_factory=dict)
    format_version: int = PLAN_VERSION

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
            if p.scores is not None:
                entry["scores"] = p.scores
            layers[name] = entry
        after = self.params_after
        return {
            "format": PLAN_FORMAT,
            "version": self.format_version,
            "policy": self.policy,
            "params": {"before": self.total_params, "after": after,
                       "ratio": round(after / self.total_params, 6)},
            "layers": layers,
        }


def save_plan(plan, path: Path) -> None:
    """Write a :class:`RankPlan` to ``path`` (through a temporary file)."""
    atomic_write_text(path, json.dumps(plan.to_json(), indent=2) + "\n")


def read_plan_file(path: Path) -> dict:
    data = read_json_file(path, "plan file")
    if not isinstance(data, dict) or not isinstance(data.get("layers"), dict):
        raise InputError(f"{path}: not a plan file (no \"layers\" object)")
    if "format" in data:  # hand-written plans may give only "layers"
        check_format(data, PLAN_FORMAT, PLAN_VERSION, path)
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


def plan_from_json(data: dict) -> RankPlan:
    layers = {n: LayerPlan(e["shape"], e["rank"], e.get("reason"), e.get("energy"), e.get("scores"))
              for n, e in data["layers"].items()}
    return RankPlan(layers, data["params"]["before"], data["policy"], data["version"])
