"""Estimate the time and memory to compress a 70B checkpoint from per-matrix costs measured here.

Measures, single-threaded (as every lowrank task runs, see lowrank.parallel), each kernel the
solvers lowrank picks by default (issue 13) are made of, and turns it into a rate:

- the float64 Gram matrix of the short side (``lowrank.linalg.gram_matrix``, 2·k²·N FLOPs for a
  k × N matrix) on a SIZE × 2·SIZE matrix: GFLOP/s;
- ``eigvalsh`` and ``eigh`` of a SIZE × SIZE float64 Gram: seconds / SIZE³ (scaled as k³);
- the randomized factorization above ``exact_max_dim`` (rank SIZE/4 of a SIZE × SIZE matrix,
  error pass included) with the cost model (2·niter + 2)·m·n·q, q = r + oversample.

The Llama-2-70B shapes (80 blocks of q/o 8192×8192, k/v 1024×8192, gate/up 28672×8192, down
8192×28672; embedding and LM head 32000×8192) are then costed: analysis is the Gram plus
``eigvalsh`` for every matrix (``auto`` uses the Gram up to min(m, n) = 8192, so all of them);
factorization at a 50% parameter budget (rank = half the break-even rank) is the Gram, ``eigh``
and two rank-r passes (projection, error) for k/v (min(m, n) ≤ 2048), the randomized solver
for the rest. Peak memory per task is W in fp32 plus two k × k float64 matrices (the Gram and
the eigensolver's copy) for Gram tasks, measured bytes per element held for randomized ones.

    .venv/bin/python benchmarks/estimate_70b.py [--size 2048] [--workers 64]

Writes reports/estimate-70b.md and .json. A model, not a measurement of a 70B run: it ignores
disk throughput (reading 140 GB of bf16 and writing ~70 GB takes minutes on NVMe), calibration
(forward passes; data-free here) and assumes tasks scale linearly over workers (they are
independent; lowrank keeps 2 × workers in flight). Eigensolver time is scaled from SIZE to k
as k³: LAPACK's tridiagonal reduction is memory-bound, so at k = 8192 it may run slower per FLOP.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NITER, OVERSAMPLE = 4, 10

MEASURE = """
import json, resource, sys, time, torch
from lowrank.linalg import factorize_matrix, gram_matrix
torch.set_num_threads(1)
size, what = int(sys.argv[1]), sys.argv[2]
g = torch.Generator().manual_seed(0)
cols = 2 * size if what == "gram" else size
w = torch.randn(size, 64, generator=g) @ torch.randn(64, cols, generator=g) / 8
w += 0.5 * torch.randn(size, cols, generator=g)
gram = gram_matrix(w) if what in ("eigvalsh", "eigh") else None
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if what == "gram":
    gram_matrix(w)
elif what == "eigvalsh":
    torch.linalg.eigvalsh(gram)
elif what == "eigh":
    torch.linalg.eigh(gram)
else:
    factorize_matrix(w, size // 4, "randomized", seed=0)
seconds = time.perf_counter() - t
extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
print(json.dumps({"seconds": seconds, "extra_bytes": extra, "base_bytes": base * 1024}))
"""


def randomized_flops(m: int, n: int, q: int) -> float:
    return (2 * NITER + 2) * m * n * q


def measure(size: int, what: str) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(size), what], capture_output=True,
                         text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "reports")
    args = ap.parse_args()
    s = args.size
    runs = {what: measure(s, what) for what in ("gram", "eigvalsh", "eigh", "randomized")}
    gram_rate = 2 * s * s * (2 * s) / runs["gram"]["seconds"]  # float64 GEMM FLOP/s
    per_k3 = {what: runs[what]["seconds"] / s**3 for what in ("eigvalsh", "eigh")}
    random_rate = randomized_flops(s, s, s // 4 + OVERSAMPLE) / runs["randomized"]["seconds"]
    # Randomized tasks' memory scales with the elements held: W (fp32) plus the m×q, n×q sketches.
    bytes_per_element = runs["randomized"]["extra_bytes"] / (s * s + 2 * s * (s // 4 + OVERSAMPLE))

    shapes = {"q_proj": (8192, 8192), "k_proj": (1024, 8192), "v_proj": (1024, 8192),
              "o_proj": (8192, 8192), "gate_proj": (28672, 8192), "up_proj": (28672, 8192),
              "down_proj": (8192, 28672)}
    matrices = [shape for _ in range(80) for shape in shapes.values()]
    matrices += [(32000, 8192), (32000, 8192)]
    analyze_s = factor_s = peak = 0.0
    old = {"analyze": 0.0, "factor": 0.0}  # the solvers before issue 13, at the same rates
    for m, n in matrices:
        k, big, be = min(m, n), max(m, n), m * n // (m + n)
        r = be // 2
        if k <= 2048:  # exact SVD then, costed at the randomized rate as the old model did
            old["analyze"] += 4 * m * n * k / random_rate
            old["factor"] += 4 * m * n * k / random_rate
        else:
            old["analyze"] += randomized_flops(m, n, be + OVERSAMPLE) / random_rate
            old["factor"] += randomized_flops(m, n, r + OVERSAMPLE) / random_rate
        gram_s = 2 * k * k * big / gram_rate
        gram_bytes = 4 * m * n + 2 * 8 * k * k
        analyze_s += gram_s + per_k3["eigvalsh"] * k**3
        peak = max(peak, gram_bytes)
        if k <= 2048:  # factorize's default exact_max_dim: Gram + eigh + projection + error
            factor_s += gram_s + per_k3["eigh"] * k**3 + 2 * (2 * r * m * n) / gram_rate
        else:
            factor_s += randomized_flops(m, n, r + OVERSAMPLE) / random_rate
            peak = max(peak, bytes_per_element * (m * n + (m + n) * (r + OVERSAMPLE)))
    params = sum(m * n for m, n in matrices)
    core_hours = (analyze_s + factor_s) / 3600
    base = runs["gram"]["base_bytes"]
    result = {
        "measured": {"size": s, **runs, "gram_gflops": round(gram_rate / 1e9, 2),
                     "eigvalsh_s_per_k3": per_k3["eigvalsh"], "eigh_s_per_k3": per_k3["eigh"],
                     "randomized_gflops": round(random_rate / 1e9, 2),
                     "bytes_per_element_held": round(bytes_per_element, 2)},
        "model": "Llama-2-70B shapes", "matrices": len(matrices), "matrix_params": params,
        "analyze_core_hours": round(analyze_s / 3600, 2),
        "factor_core_hours": round(factor_s / 3600, 2),
        "core_hours": round(core_hours, 2), "workers": args.workers,
        "wall_hours_with_workers": round(core_hours / args.workers, 3),
        "peak_bytes_per_task": round(peak), "torch_base_bytes": base,
        "before_issue_13_same_rates": {f"{k}_core_hours": round(v / 3600, 2)
                                       for k, v in old.items()},
        "before_issue_13_report": {"analyze_core_hours": 64, "factor_core_hours": 24,
                                   "core_hours": 88},
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "estimate-70b.json").write_text(json.dumps(result, indent=2) + "\n")
    per_task_gb = (peak + base) / 1e9
    e8 = {w: per_k3[w] * 8192**3 for w in per_k3}
    md = f"""# Estimate: compressing a 70B checkpoint

`.venv/bin/python benchmarks/estimate_70b.py --size {s} --workers {args.workers}` — a cost model
fed with single-thread measurements on this machine (shared with other jobs: rates are noisy),
not a 70B run. Redone for issue 13's solvers: spectra from the float64 Gram's `eigvalsh` (was:
randomized top-k to the break-even rank).

Measured, one thread: Gram of a {s}×{2 * s} matrix {runs['gram']['seconds']:.2f} s
= {gram_rate / 1e9:.1f} GFLOP/s (float64); `eigvalsh` / `eigh` of a {s}×{s} Gram
{runs['eigvalsh']['seconds']:.2f} / {runs['eigh']['seconds']:.2f} s (scaled as k³: at k = 8192
{e8['eigvalsh']:.0f} / {e8['eigh']:.0f} s); randomized rank-{s // 4} factorization of {s}×{s}
{runs['randomized']['seconds']:.2f} s = {random_rate / 1e9:.1f} GFLOP/s.

Llama-2-70B shapes ({len(matrices)} matrices, {params / 1e9:.1f}B parameters), data-free, 50%
parameter budget:

| | core-hours | wall hours on {args.workers} workers | old solvers, same rates (core-hours) |
|---|---|---|---|
| analyze (all singular values: Gram + eigvalsh) | {analyze_s / 3600:.1f} | {analyze_s / 3600 / args.workers:.2f} | {old['analyze'] / 3600:.1f} (randomized top half) |
| factorize | {factor_s / 3600:.1f} | {factor_s / 3600 / args.workers:.2f} | {old['factor'] / 3600:.1f} |
| total | {core_hours:.1f} | {core_hours / args.workers:.2f} | {sum(old.values()) / 3600:.1f} |

The last column costs the solvers used before issue 13 with this run's measured rates, so the
comparison does not depend on the machine's load; the previous report (idle machine, 4096×4096
measurements) gave 64 + 24 = 88 core-hours.

Memory: a Gram task holds W in fp32 (the largest, 32000×8192, ~1 GB) and two 8192×8192 float64
matrices (1 GB): about **{per_task_gb:.1f} GB per worker** including torch
({base / 1e6:.0f} MB); the driver streams the output and holds no more than 2 × workers
results. A {args.workers}-worker run wants ~{per_task_gb * args.workers:.0f} GB across the
machines (Ray nodes with `--executor ray`, or one large host with `--workers`).
"""
    (args.out_dir / "estimate-70b.md").write_text(md)
    print(md)

if __name__ == "__main__":
    main()
