"""`lowrank plan MODEL -o plan.json`: per-matrix ranks as an editable JSON file."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from ..errors import InputError
from ..io.checkpoint import open_checkpoint
from ..pipeline.cache import default_cache_dir
from ..pipeline.runner import execute
from ..pipeline.spec import compress_spec
from ..stages.plan_file import save_plan
from .console import (
    cache_dir_option,
    emit_json,
    json_option,
    model_factory_option,
    out,
    resolve_model,
    rich_track,
)
from .options import PLAN_KEYS, calibration_options, calibration_settings, policy_options, take


@click.command("plan")
@click.argument("model")
@click.option("-o", "--output", "plan_out", required=True, type=click.Path(dir_okay=False),
              help="Where to write the plan JSON.")
@policy_options
@calibration_options
@cache_dir_option
@model_factory_option
@json_option
def plan_command(model, plan_out, cache_dir, json_out, **flags):
    """Write a per-matrix rank plan for MODEL (edit it, then `compress --plan`)."""
    spec = compress_spec(plan=take(flags, *PLAN_KEYS), calibration=calibration_settings(flags),
                         **flags)
    spec.stages = spec.stages[:spec.stages.index("plan") + 1]  # no factorization
    model = resolve_model(model)
    ckpt = open_checkpoint(model)
    if Path(plan_out).resolve() in [Path(model).resolve(), *(f.resolve() for f in ckpt.files)]:
        raise InputError(f"{plan_out}: would overwrite the input")
    run = execute(spec, model, track=rich_track,
                  cache_dir=Path(cache_dir) if cache_dir else default_cache_dir())
    rank_plan = run.artifacts["plan"]
    save_plan(rank_plan, Path(plan_out))
    data = rank_plan.to_json()
    if emit_json(data, json_out):
        return
    table = Table(title="Rank plan")
    for col in ("matrix", "shape", "rank", "energy", "note"):
        table.add_column(col, justify="left" if col in ("matrix", "note") else "right",
                         overflow="fold")
    for name, e in data["layers"].items():
        energy = f"{e['energy']:.3f}" if e.get("energy") is not None else ""
        table.add_row(name, "x".join(map(str, e["shape"])),
                      str(e["rank"]) if e["rank"] is not None else "dense", energy,
                      e.get("reason", ""))
    out.print(table)
    p = data["params"]
    out.print(f"parameters: {p['before']:,} -> {p['after']:,} ({p['ratio']:.1%})")
    out.print(f"plan written to {plan_out}")
