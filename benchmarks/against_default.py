"""What benchmarks/shared_basis.py and benchmarks/hybrid_embedding.py share: one run of the
default `lowrank compress` command (training-free, calibrated on quality_lm's Debian lines) with
its stage cache, and their JSON + markdown report of variants scored against the dense model on
sampled_calibration's two sources (python_docs paragraphs, held-out Debian lines)."""

from __future__ import annotations

import contextlib
import datetime
import json
import shlex
import sys
import tempfile
from pathlib import Path

from quality_lm import CALIBRATION, DATA, compress
from sampled_calibration import HELD_OUT


@contextlib.contextmanager
def default_run(model: str, ratio: float):
    """The default command at ``ratio``, in a temporary directory for the ``with`` block:
    (compress's summary, its output directory, the calibrate stage's statistics)."""
    from lowrank.stages.calibrate import load_stats

    with tempfile.TemporaryDirectory() as tmp:
        name, start, stop = CALIBRATION
        calib, out, cache = Path(tmp) / "calibration.txt", Path(tmp) / "out", Path(tmp) / "cache"
        calib.write_text("\n".join((DATA / name).read_text().splitlines()[start:stop]) + "\n")
        summary = compress(model, out, ratio, calib, "", str(cache))
        yield summary, out, load_stats(next((cache / "calibrate").iterdir()))


def write_report(out: str, title: str, extra: tuple[str, str], rows: list[dict], **facts) -> None:
    """``out``.json (``facts``, the command, the texts, ``rows``) and ``out``.md: a table with
    column ``extra`` = (header, row key) after the variant's name."""
    script = Path(sys.argv[0]).name
    result = {"date": datetime.date.today().isoformat(),
              "command": shlex.join(["python", f"benchmarks/{script}", *sys.argv[1:]]),
              "calibration": f"{CALIBRATION[0]} lines {CALIBRATION[1]}-{CALIBRATION[2]}",
              "held_out": f"{HELD_OUT[0]} lines {HELD_OUT[1]}-{HELD_OUT[2]}", **facts,
              "rows": rows}
    Path(out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    header, key = extra
    lines = [f"# {title}", "",
             (f"Measured {result['date']} with `{result['command']}` (its docstring says what "
              f"each row is). Calibration: {result['calibration']}; evaluation: the first "
              f"{facts['paragraphs']} python_docs paragraphs (another source) and "
              f"{result['held_out']} (held out)."), "",
             (f"| variant | {header} | python_docs ppl / dense | top-1 | KL | held-out Debian "
              "top-1 | KL |"), "|---|---|---|---|---|---|---|"]
    for r in rows:
        p, d = r["python_docs"], r["debian"]
        lines.append(f"| {r['variant']} | {r[key]} | {p['ppl_ratio']:.3f}× | "
                     f"{p['top1_agreement']:.3f} | {p['kl']:.3f} | {d['top1_agreement']:.3f} | "
                     f"{d['kl']:.3f} |")
    Path(out + ".md").write_text("\n".join(lines) + "\n")
