"""`lowrank analyze MODEL`: the singular-value spectrum of every weight matrix."""

from __future__ import annotations

import click
from rich.table import Table

from ..device import resolve_device
from ..io.checkpoint import open_checkpoint
from ..linalg import SVD_METHODS
from ..stages.analyze import AnalyzeSettings, analyze, matrix_infos
from .console import (
    device_option,
    emit_json,
    executor_option,
    json_option,
    out,
    resolve_model,
    rich_track,
    workers_option,
)


@click.command("analyze")
@click.argument("model")
@json_option
@click.option("--method", type=click.Choice(SVD_METHODS), default="auto", show_default=True,
              help="gram (float64 Gram eigenvalues), exact (LAPACK SVD), randomized (top-k), "
              "or auto: gram up to --exact-max-dim, randomized above.")
@click.option("--exact-max-dim", type=int, default=AnalyzeSettings.exact_max_dim,
              show_default=True, help="auto: the whole spectrum up to this min(m, n); "
              "randomized top-k above.")
@workers_option
@executor_option
@device_option
def analyze_command(model, json_out, method, exact_max_dim, workers, executor, device):
    """Singular-value spectrum of every weight matrix of MODEL."""
    ckpt = open_checkpoint(resolve_model(model))
    settings = AnalyzeSettings(method=method, exact_max_dim=exact_max_dim)
    with rich_track("analyze", len(matrix_infos(ckpt))) as advance:
        spectra = analyze(ckpt, settings, advance, workers=workers, executor=executor,
                          device=resolve_device(device))
    rows = [s.summary() for s in spectra.matrices.values()]
    if emit_json({"model": str(ckpt.path), "total_params": spectra.total_params,
                   "matrices": rows}, json_out):
        return
    table = Table(title=f"Spectra of {ckpt.path}", show_lines=False)
    for col in ("matrix", "shape", "stable rank", "r@90%", "r@95%", "r@99%", "break-even",
                "saved@95%"):
        table.add_column(col, justify="left" if col == "matrix" else "right",
                         overflow="fold" if col == "matrix" else "ellipsis")
    for r in rows:
        ranks = r["rank_at_energy"]
        saved = r["params_saved_at_energy"]["0.95"]
        table.add_row(r["name"], "x".join(map(str, r["matrix"])),
                      f"{r['stable_rank']:.1f}" if r["finite"] else "NaN/Inf",
                      *[str(ranks[k]) if ranks[k] is not None else "-"
                        for k in ("0.90", "0.95", "0.99")],
                      str(r["break_even_rank"]),
                      f"{saved:,}" if saved is not None and saved > 0 else "none")
    matrix_params = sum(r["params"] for r in rows)
    out.print(table)
    out.print(f"{len(rows)} matrices, {matrix_params:,} of {spectra.total_params:,} parameters "
              f"({matrix_params / spectra.total_params:.1%}) are in matrices.")
