"""Estimate the time and memory to compress a 70B checkpoint from per-matrix costs measured here.

Measures, single-threaded (as every lowrank task runs, see lowrank.parallel), the randomized SVD
lowrank uses above ``exact_max_dim``: analysis (top-k spectrum, k = the break-even rank
mn/(m+n)) and factorization (rank r at a 50% parameter budget) on a SIZE×SIZE matrix, and
converts each to a throughput in FLOP/s with the randomized SVD's cost model
(2·niter + 2)·m·n·q, q = k + oversample. The 70B shapes (Llama-2-70B: 80 blocks of q/o
8192×8192, k/v 1024×8192, gate/up 28672×8192, down 8192×28672; embedding and LM head
32000×8192) are then costed with the same model; matrices with min(m, n) ≤ 2048 (k/v) use exact
SVD and are costed at the same throughput with 4·m·n·min(m, n) FLOPs. Peak memory per task is
measured on the same matrix and scaled with the elements held (W in fp32, the m×q and n×q
sketches).

    .venv/bin/python benchmarks/estimate_70b.py [--size 4096] [--workers 64]

Writes reports/estimate-70b.md and .json. A model, not a measurement of a 70B run: it ignores
disk throughput (reading 140 GB of bf16 and writing ~70 GB takes minutes on NVMe) and assumes
tasks scale linearly over workers (they are independent; lowrank keeps 2 × workers in flight).
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
from lowrank.linalg import factorize_matrix
from lowrank.stages.analyze import AnalyzeSettings, analyze_matrix
torch.set_num_threads(1)
size, what = int(sys.argv[1]), sys.argv[2]
g = torch.Generator().manual_seed(0)
w = torch.randn(size, 64, generator=g) @ torch.randn(64, size, generator=g) / 8
w += 0.5 * torch.randn(size, size, generator=g)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if what == "analyze":
    analyze_matrix("w", w, AnalyzeSettings(exact_max_dim=0))
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
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "reports")
    args = ap.parse_args()
    s = args.size
    analyze_run, factor_run = measure(s, "analyze"), measure(s, "factor")
    k = s // 2  # break-even rank of a square matrix
    analyze_rate = randomized_flops(s, s, k + OVERSAMPLE) / analyze_run["seconds"]
    factor_rate = randomized_flops(s, s, s // 4 + OVERSAMPLE) / factor_run["seconds"]
    # Memory per task scales with the elements held: W (fp32) plus the m×q and n×q sketches.
    held = s * s + 2 * s * (k + OVERSAMPLE)
    bytes_per_element = max(analyze_run["extra_bytes"], factor_run["extra_bytes"]) / held

    shapes = {"q_proj": (8192, 8192), "k_proj": (1024, 8192), "v_proj": (1024, 8192),
              "o_proj": (8192, 8192), "gate_proj": (28672, 8192), "up_proj": (28672, 8192),
              "down_proj": (8192, 28672)}
    matrices = [shape for _ in range(80) for shape in shapes.values()]
    matrices += [(32000, 8192), (32000, 8192)]
    analyze_s = factor_s = 0.0
    peak = 0.0
    for m, n in matrices:
        be = m * n // (m + n)
        if min(m, n) <= 2048:
            cost = 4 * m * n * min(m, n)
            analyze_s += cost / analyze_rate
            factor_s += cost / factor_rate
            peak = max(peak, bytes_per_element * m * n * 2)
            continue
        analyze_s += randomized_flops(m, n, be + OVERSAMPLE) / analyze_rate
        factor_s += randomized_flops(m, n, be // 2 + OVERSAMPLE) / factor_rate
        peak = max(peak, bytes_per_element * (m * n + (m + n) * (be + OVERSAMPLE)))
    params = sum(m * n for m, n in matrices)
    core_hours = (analyze_s + factor_s) / 3600
    result = {
        "measured": {"size": s, "analyze": analyze_run, "factor": factor_run,
                     "analyze_gflops": round(analyze_rate / 1e9, 1),
                     "factor_gflops": round(factor_rate / 1e9, 1),
                     "bytes_per_element_held": round(bytes_per_element, 2)},
        "model": "Llama-2-70B shapes", "matrices": len(matrices), "matrix_params": params,
        "analyze_core_hours": round(analyze_s / 3600, 1),
        "factor_core_hours": round(factor_s / 3600, 1),
        "core_hours": round(core_hours, 1), "workers": args.workers,
        "wall_hours_with_workers": round(core_hours / args.workers, 2),
        "peak_bytes_per_task": round(peak), "torch_base_bytes": analyze_run["base_bytes"],
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "estimate-70b.json").write_text(json.dumps(result, indent=2) + "\n")
    per_task_gb = (peak + analyze_run["base_bytes"]) / 1e9
    md = f"""# Estimate: compressing a 70B checkpoint

`.venv/bin/python benchmarks/estimate_70b.py --size {s} --workers {args.workers}` — a cost model fed
with single-thread measurements on this machine, not a 70B run.

Measured on a {s}×{s} fp32 matrix, one thread: analysis (randomized top-{k}) {analyze_run['seconds']:.1f} s
= {result['measured']['analyze_gflops']} GFLOP/s; factorization (randomized rank {s // 4})
{factor_run['seconds']:.1f} s = {result['measured']['factor_gflops']} GFLOP/s; peak memory above
what the process held before the task (torch and the matrix), {analyze_run['base_bytes'] / 1e6:.0f} MB: {bytes_per_element:.1f} bytes per element held.

Llama-2-70B shapes ({len(matrices)} matrices, {params / 1e9:.1f}B parameters), 50% parameter budget:

| | core-hours | wall hours on {args.workers} workers |
|---|---|---|
| analyze (spectra to the break-even rank) | {analyze_s / 3600:.0f} | {analyze_s / 3600 / args.workers:.1f} |
| factorize | {factor_s / 3600:.0f} | {factor_s / 3600 / args.workers:.1f} |
| total | {core_hours:.0f} | {core_hours / args.workers:.1f} |

Memory: each task holds one matrix (the largest, 28672×8192 or 32000×8192, is ~1 GB in fp32)
plus its sketches: about **{per_task_gb:.1f} GB per worker** including torch; the driver streams
the output and holds no more than 2 × workers results. A {args.workers}-worker run therefore
wants ~{per_task_gb * args.workers:.0f} GB across the machines, spread over Ray nodes
(`--executor ray`) or one large host (`--workers`).
"""
    (args.out_dir / "estimate-70b.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
