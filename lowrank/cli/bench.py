"""`lowrank bench A.onnx [B.onnx ...]`: onnxruntime CPU latency, the first model the baseline."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from ..stages.report import LATENCY_HEAD, latency_rows
from ..timing import BenchSettings, bench
from .console import emit_json, json_option, out, rich_track


@click.command("bench")
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--batch", "batches", type=int, multiple=True, help="Batch sizes (default 1, 16).")
@click.option("--seq", "sequences", type=int, multiple=True,
              help="Sequence lengths (default 16, 128).")
@click.option("--runs", type=int, default=30, show_default=True, help="Timed runs per round.")
@click.option("--warmup", type=int, default=5, show_default=True, help="Untimed runs per process.")
@click.option("--rounds", type=int, default=3, show_default=True,
              help="Processes per model and point, alternating between models.")
@click.option("--threads", type=int, default=2, show_default=True, help="intra-op threads.")
@json_option
def bench_command(models, batches, sequences, runs, warmup, rounds, threads, json_out):
    """Latency of one or more ONNX MODELS on onnxruntime CPU; the first is the baseline."""
    settings = BenchSettings(tuple(batches) or (1, 16), tuple(sequences) or (16, 128), runs,
                             warmup, rounds, threads)
    names = {}
    for path in models:
        name = Path(path).parent.name + "/" + Path(path).name if len(models) > 1 else Path(path).name
        names[name if name not in names else path] = Path(path)
    with rich_track("bench", len(settings.batches) * len(settings.sequences)) as advance:
        result = bench(names, settings, advance)
    if emit_json(result, json_out):
        return
    table = Table(title=f"Latency: {result['machine']['cpu']}, {threads} threads")
    for col in LATENCY_HEAD:
        table.add_column(col, justify="left" if col == "model" else "right")
    for row in latency_rows({"latency": result}):
        table.add_row(*row)
    out.print(table)
