"""Plan files on disk: ``plan.json`` as ``lowrank plan`` writes it and ``--plan FILE`` reads it
back (:func:`lowrank.stages.plan.apply_plan` validates it against a checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from ..io.files import atomic_write_text, check_format, read_json_file

PLAN_FORMAT, PLAN_VERSION = "lowrank.plan", 1


def save_plan(plan, path: Path) -> None:
    """Write a :class:`~lowrank.stages.plan.RankPlan` to ``path`` (through a temporary file)."""
    atomic_write_text(path, json.dumps(plan.to_json(), indent=2) + "\n")


def read_plan_file(path: Path) -> dict:
    data = read_json_file(path, "plan file")
    if not isinstance(data, dict) or not isinstance(data.get("layers"), dict):
        raise InputError(f"{path}: not a plan file (no \"layers\" object)")
    if "format" in data:  # hand-written plans may give only "layers"
        check_format(data, PLAN_FORMAT, PLAN_VERSION, path)
    return data
