"""Calibration and whitening cost against plain forward passes (issue 13, item 3).

    PYTHONPATH=. python benchmarks/calibration_speed.py [--model minilm|PATH] [--samples 64]
        [--repeats 3] [--bf16] [--full]

Times, medians of ``--repeats`` (this machine is shared: other jobs make single runs noisy):
- ``forward``: the model over the calibration batches under inference_mode, no hooks;
- ``calibrate``: :func:`collect_stats` over the same batches (hooks + float64 Grams);
- ``whitening_per_call`` / ``whitening_memo``: every G^½ analyze and factorize ask for, made per
  call (before) or through the run's memo (after); ``--full`` also times analyze + factorize.
With ``--bf16``: the Grams under CPU bf16 autocast against fp32 (relative Frobenius difference)
and what that does to the whitened factors (output error measured with the fp32 Gram).
Runs against whichever lowrank is on PYTHONPATH (the before/after comparison runs it twice).
Prints the report as one JSON line after each measurement (the last line is the whole report).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lowrank.cli.console import resolve_model
from lowrank.io.checkpoint import open_checkpoint
from lowrank.io.samples import model_batches, read_calibration
from lowrank.linalg import factorize_matrix, matrix_view
from lowrank.models import Models
from lowrank.stages.analyze import analyze
from lowrank.stages.calibrate import ActivationStats, CalibrateSettings, collect_stats
from lowrank.stages.factorize import factorize
from lowrank.stages.plan import PlanSettings, make_plan
from lowrank.weighting import make_weighting


def emit(report: dict) -> None:
    """The report so far, one JSON line (flushed: a run cut short still says what it measured)."""
    print(json.dumps(report), flush=True)


def timed(fn, repeats):
    """Medians of wall and process CPU seconds (CPU time is what this process used: other jobs
    on a shared machine stretch the wall time, much less the CPU time)."""
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"wall_s": round(statistics.median(walls), 3),
            "cpu_s": round(statistics.median(cpus), 3),
            "wall_runs_s": [round(t, 3) for t in walls]}, result


def forward(model, tokenizer, data, settings):
    with torch.inference_mode():
        for inputs, _ in model_batches(data, tokenizer, settings.batch_size, settings.max_length):
            model(**inputs)


def output_error(w, A, B, g):
    """tr((W − AB) G (W − AB)ᵀ) / tr(W G Wᵀ): the layer's relative output error on the data."""
    d = w.double() - A.double() @ B.double()
    return float(((d @ g) * d).sum() / ((w.double() @ g) * w.double()).sum())


def bf16_check(model, tokenizer, data, settings, stats, ckpt, repeats, limit=12):
    """bf16 autocast calibration: its Gram error, and the factor output error of the first
    ``limit`` layers at a quarter of their rank."""
    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return collect_stats(model, tokenizer, data, settings)

    timing, low = timed(run, repeats)
    gram_diff = max(float((low.grams[n] - g).norm() / g.norm()) for n, g in stats.grams.items())
    factor = []
    for name, g in list(stats.grams.items())[:limit]:
        w = matrix_view(ckpt.get(name))
        rank = max(1, min(w.shape) // 4)
        errs = []
        for s in (stats, low):
            A, B, _, _ = factorize_matrix(w, rank, "gram", weighting=make_weighting(name, s))
            errs.append(output_error(w, A, B, g))
        factor.append((errs[1] / errs[0] - 1, name))
    worst = max(factor)
    return {"calibrate": timing, "max_gram_rel_diff": gram_diff,
            "max_output_error_increase": worst[0], "worst_layer": worst[1],
            "median_output_error_increase": statistics.median(f for f, _ in factor)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--full", action="store_true", help="also time analyze + factorize")
    args = parser.parse_args()
    torch.manual_seed(0)
    ckpt = open_checkpoint(resolve_model(args.model))
    settings = CalibrateSettings(samples=args.samples)
    data = read_calibration(None, args.samples)
    model, tokenizer = Models(ckpt).runnable_model()
    tokens = sum(int(m.sum()) for _, m in model_batches(data, tokenizer, settings.batch_size,
                                                        settings.max_length))
    report = {"model": str(ckpt.path), "samples": args.samples, "tokens": tokens,
              "threads": torch.get_num_threads()}
    forward(model, tokenizer, data, settings)  # warm-up
    report["forward"], _ = timed(lambda: forward(model, tokenizer, data, settings), args.repeats)
    emit(report)
    report["calibrate"], stats = timed(lambda: collect_stats(model, tokenizer, data, settings),
                                       args.repeats)
    report["calibrate_over_forward_cpu"] = round(report["calibrate"]["cpu_s"]
                                                 / report["forward"]["cpu_s"], 2)

    def whitening(memo: bool):
        """Every G^½ that analyze and factorize ask for: each matrix twice."""
        fresh = ActivationStats.from_tensors(stats.to_tensors(), stats.tokens, stats.samples,
                                             stats.settings)  # a new run: no G^½ known yet
        for _ in ("analyze", "factorize"):
            for name, g in fresh.grams.items():
                if memo:
                    fresh.weighting(name, g.shape[0])
                else:
                    make_weighting(name, fresh, cols=g.shape[0])

    emit(report)
    report["whitening_per_call"], _ = timed(lambda: whitening(False), args.repeats)
    emit(report)
    if hasattr(ActivationStats, "whitening_factor"):
        report["whitening_memo"], _ = timed(lambda: whitening(True), args.repeats)
    emit(report)
    if args.full:
        def analyze_factorize():
            fresh = ActivationStats.from_tensors(stats.to_tensors(), stats.tokens,
                                                 stats.samples, stats.settings)
            spectra = analyze(ckpt, stats=fresh)
            factorize(ckpt, make_plan(spectra, PlanSettings(param_ratio=0.6)), stats=fresh)

        report["analyze+factorize"], _ = timed(analyze_factorize, args.repeats)
    if args.bf16:
        report["bf16"] = bf16_check(model, tokenizer, data, settings, stats, ckpt,
                                    args.repeats)
    emit(report)


if __name__ == "__main__":
    main()
