"""`lowrank gate REPORT`: check a report.json against goals; exit 5 when one is missed."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from ..stages.gate import Goal, check, raise_if_failed
from ..stages.report import describe, read_report
from .console import emit_json, json_option, out


@click.command("gate")
@click.argument("report_path", metavar="REPORT", type=click.Path(dir_okay=False))
@click.option("--min-cosine", type=float, help="Held-out cosine to dense at least this.")
@click.option("--min-knn", type=float, help="kNN@10 overlap at least this.")
@click.option("--max-param-ratio", type=float, help="Kept fraction of parameters at most this.")
@click.option("--min-speedup", type=float, help="ONNX speedup over dense at every measured point.")
@click.option("--max-perplexity-ratio", type=float, help="Perplexity at most this x dense.")
@click.option("--max-int8-size-ratio", type=float, help="int8 file at most this x the fp32 file.")
@click.option("--goal", "goals", multiple=True, metavar="METRIC:TYPE:VALUE",
              help="Any goal, e.g. latency_p50_ms:percent-min-improvement:20 (repeatable).")
@click.option("--allow-missing", is_flag=True, help="Skip goals whose metric was not measured.")
@json_option
def gate_command(report_path, min_cosine, min_knn, max_param_ratio, min_speedup,
                 max_perplexity_ratio, max_int8_size_ratio, goals, allow_missing, json_out):
    """Check REPORT (a report.json) against goals: exit 0 when all pass, 5 when one fails,
    3 when the report is missing or corrupt or a metric was not measured."""
    parsed = [Goal(m, "threshold", v) for m, v in (
        ("cosine", min_cosine), ("knn10", min_knn), ("param_ratio", max_param_ratio),
        ("speedup", min_speedup), ("int8_size_ratio", max_int8_size_ratio)) if v is not None]
    if max_perplexity_ratio is not None:
        parsed.append(Goal("perplexity", "percent-max-degradation",
                           100 * (max_perplexity_ratio - 1)))
    for text in goals:
        metric, _, rest = text.partition(":")
        kind, _, value = rest.rpartition(":")
        try:
            parsed.append(Goal(metric, kind, float(value)))
        except ValueError as e:
            raise click.UsageError(f"--goal {text}: expected METRIC:TYPE:VALUE") from e
    if not parsed:
        raise click.UsageError("give at least one goal (--min-cosine, --goal, ...)")
    report = read_report(Path(report_path))
    results = check(report, parsed, allow_missing)
    json_only = emit_json(results, json_out)  # stdout then holds the JSON alone
    if not json_only:
        for result in results:
            out.print(escape(describe(result)), highlight=False)
    raise_if_failed(results)
    if not json_only:
        out.print(f"gate passed: {len(results)} checks")
