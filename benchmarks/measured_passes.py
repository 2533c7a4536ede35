"""The scores stage's measured passes (the input embedding's candidates, issue 13): the same
losses and their time over the probe lines in file order or batched by length, in float32 or
autocast to bf16 (`scores.measure_dtype`).

Calibrates MODEL on the benchmarks' calibration text (calibration_text.py, untimed), then for
each variant times `lowrank.stages.probe.plan_losses` on the embedding's measured candidates
(every other candidate rank and the last, as the stage measures them) and prints their losses.

    python benchmarks/measured_passes.py [--model DIR]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from calibration_text import calibration_file

DEFAULT_MODEL = "/root/.cache/smollm2-135m"


def main():
    from lowrank.io.checkpoint import open_checkpoint
    from lowrank.stages.calibrate import CalibrateSettings, calibrate
    from lowrank.stages.probe import leading_factors, plan_losses, probe_data, probed_candidates
    from lowrank.stages.scores import ScoreSettings, candidate_ranks

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL)
    args = ap.parse_args()
    ckpt = open_checkpoint(args.model)
    stats = calibrate(ckpt, CalibrateSettings(calibration_file=str(calibration_file())))
    settings = ScoreSettings()
    probe = probe_data(ckpt, settings, stats)
    name = next(n for n, p in probe.model.named_parameters()
                if p is probe.model.get_input_embeddings().weight)
    rows, cols = ckpt.info(name).shape[0], math.prod(ckpt.info(name).shape[1:])
    ranks = candidate_ranks(rows, cols, settings.fractions)
    probed = [ranks[i] for i in probed_candidates(len(ranks))]
    factors = {name: leading_factors(ckpt, name, stats, max(probed))}
    plans = [{name: r} for r in probed]
    print(f"{args.model}: {name}, measured ranks {probed}")
    print("| batches | passes | padded positions | seconds | losses |")
    print("|---|---|---:|---:|---|")
    for label, batches in (("file order", probe.batches), ("by length", probe.by_length)):
        positions = sum(int(mask.numel()) for _, mask in batches)
        for dtype in (torch.float32, torch.bfloat16):
            start = time.perf_counter()
            losses = plan_losses(probe.model, batches, probe.kind, plans, factors.__getitem__,
                                 dtype)
            seconds = time.perf_counter() - start
            print(f"| {label} | {str(dtype).removeprefix('torch.')} | {positions:,} | "
                  f"{seconds:.1f} | {' '.join(f'{v:.4f}' for v in losses)} |", flush=True)


if __name__ == "__main__":
    main()
