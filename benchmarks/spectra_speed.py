"""Time the spectrum and factor solvers lowrank can use, one thread (as every lowrank task runs,
see lowrank.parallel), on random fp32 matrices (low rank + noise, like trained weights).

Spectra: ``exact`` = ``torch.linalg.svdvals``; ``gram`` = :func:`lowrank.linalg.gram_svdvals`
(float64 Gram + ``eigvalsh``); ``randomized`` = the top break-even-rank values by
``torch.svd_lowrank`` (what analysis computes above ``exact_max_dim``). Factors at rank
min(m, n)/4: :func:`lowrank.linalg.truncated_svd` with each method. Each time is the median of 3
runs, or a single run when the first takes over ``--single-above`` seconds (noted), to keep the
whole script near two minutes on a shared machine.

    .venv/bin/python benchmarks/spectra_speed.py [--shapes 2048x8192 ...] [--methods gram ...]

Writes reports/spectra-speed.md (or ``--out``). Not a test.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

from lowrank.linalg import gram_svdvals, randomized_svd, residual_norm2, squared_norm, truncated_svd

ROOT = Path(__file__).resolve().parent.parent
SPECTRA = ("1024x4096", "2048x2048", "2048x8192", "4096x4096")
FACTORS = ("2048x2048", "4096x4096")
METHODS = ("exact", "gram", "randomized")
EXACT_FACTORS_MAX = 2048  # exact SVD with vectors above this takes minutes: not timed


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "CPU"


def test_matrix(m: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(m, 64, generator=g) @ torch.randn(64, n, generator=g) / 8
    return w + 0.5 * torch.randn(m, n, generator=g)


def timed(fn, single_above: float):
    """(median seconds, runs, last result)."""
    times, result = [], None
    for _ in range(3):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
        if times[0] > single_above:
            break
    return statistics.median(times), len(times), result


def fmt(seconds: float, runs: int) -> str:
    return f"{seconds:.2f}" + ("" if runs == 3 else " (1 run)")


def top_values(w: torch.Tensor, k: int) -> torch.Tensor:
    return randomized_svd(w, k, 10, 4, seed=0)[1]


def spectra_rows(shapes, methods, single_above):
    rows = []
    for shape in shapes:
        m, n = map(int, shape.split("x"))
        w, k = test_matrix(m, n), math.floor(m * n / (m + n))
        solvers = {"exact": partial(torch.linalg.svdvals, w), "gram": partial(gram_svdvals, w),
                   "randomized": partial(top_values, w, k)}
        got = {name: timed(solvers[name], single_above) for name in METHODS if name in methods}
        cells = [fmt(*got[name][:2]) if name in got else "–" for name in METHODS]
        speedup, diffs = "–", ["–", "–"]
        if "exact" in got:
            ref = got["exact"][2].double()[:k]
            diffs = [f"{float(((got[name][2].double()[:k] - ref).abs() / ref).max()):.1e}"
                     if name in got else "–" for name in ("gram", "randomized")]
            if "gram" in got:
                speedup = f"{got['exact'][0] / got['gram'][0]:.1f}×"
        rows.append(f"| {m}×{n} | {k} | " + " | ".join([*cells, speedup, *diffs]) + " |")
        print(rows[-1], flush=True)
    return rows


def factor_rows(shapes, methods, single_above):
    rows = []
    for shape in shapes:
        m, n = map(int, shape.split("x"))
        w, r = test_matrix(m, n), min(m, n) // 4
        norm2 = squared_norm(w)
        cells = []
        for method in METHODS:
            if method not in methods or (method == "exact" and min(m, n) > EXACT_FACTORS_MAX):
                cells.append("not timed")
                continue
            seconds, runs, (U, S, Vh) = timed(partial(truncated_svd, w, r, method), single_above)
            err = math.sqrt(residual_norm2(w, U * S, Vh) / norm2)
            cells.append(f"{fmt(seconds, runs)} s, error {err:.6f}")
        rows.append(f"| {m}×{n} | {r} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SPECTRA))
    parser.add_argument("--factor-shapes", nargs="*", default=list(FACTORS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--single-above", type=float, default=10.0)
    parser.add_argument("--out", default=str(ROOT / "reports" / "spectra-speed.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    spectra = spectra_rows(args.shapes, args.methods, args.single_above)
    factors = factor_rows(args.factor_shapes, args.methods, args.single_above)
    command = " ".join([".venv/bin/python benchmarks/spectra_speed.py", *sys.argv[1:]])
    lines = [
        "# Spectra and factors: exact SVD vs float64 Gram vs randomized",
        "",
        (f"`{command}` — one thread "
         f"(`torch.set_num_threads(1)`), torch {torch.__version__}, {cpu_name()}"
         f"; fp32 matrices rank 64 + noise; median of 3 runs (1 when a run takes over "
         f"{args.single_above:.0f} s). Total {time.perf_counter() - started:.0f} s."),
        "",
        "## Spectra (seconds)",
        "",
        ("exact = `torch.linalg.svdvals` (all values); gram = `gram_svdvals` (all values, "
         "float64 Gram + `eigvalsh`); randomized = top-k by `torch.svd_lowrank` (oversample 10, "
         "niter 4), k = the break-even rank. The difference columns are the largest relative "
         "difference of the top-k values from the fp32 exact ones (whose own relative error is "
         "about ε₃₂·σ₁/σ_i: most of the gram difference is the fp32 SVD's rounding)."),
        "",
        "| matrix | k | exact | gram | randomized | exact / gram | gram diff | randomized diff |",
        "|---|---|---|---|---|---|---|---|",
        *spectra,
        "",
        "## Factors at rank min(m, n)/4 (seconds, relative error ‖W − U·S·Vh‖/‖W‖)",
        "",
        ("`truncated_svd(w, r, method)`; exact = `torch.linalg.svd`, gram = `gram_svd` "
         "(float64 Gram + `eigh`, then one projection pass), randomized = `torch.svd_lowrank`."),
        "",
        "| matrix | rank | exact | gram | randomized |",
        "|---|---|---|---|---|",
        *factors,
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
