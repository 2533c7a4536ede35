"""The benchmarks' calibration (and recovery) text: `sed -n 10000,12000p
../shared/data/debian_descriptions.txt` (lines 10000-12000 counted from 1, as the README's
commands write it), written once to a file because the CLI takes a path. Evaluation uses
../shared/data/python_docs.txt (another source). quality_lm.py and latency_optimized.py slice
the same range counted from 0 (one line later), as their reports say."""

from __future__ import annotations

import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LINES = (10000, 12000)  # first and last line, counted from 1


def calibration_file() -> Path:
    path = Path(tempfile.gettempdir()) / f"lowrank-debian-{LINES[0]}-{LINES[1]}.txt"
    if not path.exists():
        lines = (DATA / "debian_descriptions.txt").read_text().splitlines()[LINES[0] - 1:LINES[1]]
        path.write_text("\n".join(lines) + "\n")
    return path
