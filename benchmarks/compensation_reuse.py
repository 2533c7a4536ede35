"""Compensation with and without reusing the outputs of modules an earlier pass finished
(lowrank.stages.blockwise.FinishedOutputs): SmolLM2's default calibrated command, the stages
before factorize computed once and cached, then factorize run alternately with reuse on and
off (its cache entry removed before each run), all in this process. Prints the factorize
stage's seconds, the seconds inside compensation's block passes, and whether the factors are
the same bytes.

    python benchmarks/compensation_reuse.py [--runs 2] [--ratio 0.85] [--model DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from quality_lm import CALIBRATION
from sampled_calibration import lines_of


def main():
    from lowrank.pipeline.runner import run_pipeline
    from lowrank.pipeline.spec import compress_spec
    from lowrank.stages import blockwise

    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2, help="runs with reuse on, and as many off")
    ap.add_argument("--ratio", type=float, default=0.85)
    ap.add_argument("--model", default="/root/.cache/smollm2-135m")
    args = ap.parse_args()
    reusing = blockwise.FinishedOutputs.reusing
    no_reuse = (lambda self, pending, keep=True: contextlib.nullcontext())
    in_passes = [0.0]

    def timed(inner):
        @contextlib.contextmanager
        def passes(self, pending, keep=True):
            start = time.perf_counter()
            with inner(self, pending, keep):
                yield
            in_passes[0] += time.perf_counter() - start
        return passes

    rows, factors = {"on": [], "off": []}, {}
    with tempfile.TemporaryDirectory() as tmp:
        calibration = Path(tmp) / "debian.txt"
        calibration.write_text("\n".join(lines_of(*CALIBRATION)) + "\n")
        spec = compress_spec(plan={"param_ratio": args.ratio}, calibration_file=str(calibration))
        cache = Path(tmp) / "cache"
        for i, mode in enumerate(["on", "off"] * args.runs):
            blockwise.FinishedOutputs.reusing = timed(reusing if mode == "on" else no_reuse)
            shutil.rmtree(cache / "factorize", ignore_errors=True)
            in_passes[0] = 0.0
            out = Path(tmp) / f"out-{i}"
            run_pipeline(spec, args.model, out, cache_dir=cache)
            manifest = json.loads((out / "manifest.json").read_text())
            seconds = {r["stage"]: r["seconds"] for r in manifest["stages"]}
            row = {"reuse": mode, "factorize_s": seconds["factorize"],
                   "passes_s": round(in_passes[0], 1)}
            rows[mode].append(row)
            print(json.dumps(row), flush=True)
            factors.setdefault(mode, (out / "model.safetensors").read_bytes())
    print(json.dumps({
        "same_factors": factors["on"] == factors["off"],
        **{f"{mode}_median": {key: statistics.median(r[key] for r in rows[mode])
                              for key in ("factorize_s", "passes_s")} for mode in rows}}))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
