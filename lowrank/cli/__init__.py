"""``lowrank`` command line: one small module per command over library calls, output through
rich (:mod:`.console`).

Exit codes: 0 ok, 1 lowrank error (also a failed read/write: disk full, permission denied),
2 usage, 3 bad input, 4 validation failed, 5 gate failed, 130 interrupted, 143 terminated.
Errors are one line on stderr; ``LOWRANK_DEBUG=1`` shows full tracebacks.
"""

from __future__ import annotations

import os
import sys

import click
from rich.markup import escape

from ..errors import LowrankError, OptionError, first_line
from ..pipeline.runner import Terminated
from ..stages.report import describe
from ..version import __version__
from .analyze import analyze_command
from .bench import bench_command
from .compress import compress_command, run_command
from .console import err, one_line, show_warnings
from .export import export_command
from .gate import gate_command
from .generate import generate_command
from .options import flag
from .plan import plan_command
from .sample import sample_command


class LowrankGroup(click.Group):
    """Maps library errors to one line on stderr and an exit code; no traceback unless
    LOWRANK_DEBUG=1."""

    def invoke(self, ctx):
        debug = os.environ.get("LOWRANK_DEBUG") == "1"
        show_warnings()
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except OptionError as e:
            raise click.UsageError(e.describe(flag)) from e
        except LowrankError as e:
            if debug:
                raise
            for result in getattr(e, "results", []):  # a failed gate: every check, one line each
                err.print(escape(describe(result)), highlight=False)
            err.print(f"[red]error:[/] {escape(one_line(str(e)))}", highlight=False)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            err.print("interrupted")
            _exit_now(130)
        except Terminated as e:
            err.print(str(e))
            _exit_now(128 + e.signum)
        except OSError as e:  # the system refused a read or write: disk full, permission denied
            if debug:
                raise
            where = f"{e.filename}: " if e.filename else ""
            what = e.strerror or str(e) or type(e).__name__
            err.print(f"[red]error:[/] {escape(one_line(where + what))}", highlight=False)
            ctx.exit(1)
        except Exception as e:  # a bug or an unforeseen input: still one line
            if debug:
                raise
            what = escape(one_line(f"{type(e).__name__}: {first_line(e)}"))
            err.print(f"[red]internal error:[/] {what} (rerun with LOWRANK_DEBUG=1 for the "
                      f"traceback)", highlight=False)
            ctx.exit(1)


def _exit_now(code: int) -> None:
    """Exit after an interrupt without joining per-matrix worker threads still inside a task
    (Python cannot stop them; the run has already unwound and removed its scratch files)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@click.group(cls=LowrankGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lowrank")
def main():
    """Turn dense checkpoints into low-rank ones: analyze, plan, compress."""


for command in (analyze_command, plan_command, compress_command, run_command, export_command,
                bench_command, gate_command, generate_command, sample_command):
    main.add_command(command)
