"""Calibration lines packed into longer samples (CalibrateSettings.pack: the last share of the
lines joined into samples of up to max_length tokens): the default command otherwise,
calibrated on Debian lines 10000-12000 (one-line package descriptions, ~14 tokens each), scored
like probe_size.py on python_docs paragraphs (another source, long) and held-out Debian lines
(the calibration text's source, short).

    python benchmarks/calibration_packing.py minilm 0 0.25 0.5 [--ratios 0.4 0.5 0.6]
    python benchmarks/calibration_packing.py smollm2 0 0.25 0.5 [--ratios 0.85]
        [--cache-dir DIR]

One JSON line per ratio and share. Rows of one share share its calibration and analysis (a
stage cache; --cache-dir keeps it for a rerun).
"""

from __future__ import annotations

import argparse
import json

import torch
from probe_size import MODELS, parse_with_setup, run_row


def main():
    from lowrank.pipeline.spec import compress_spec

    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=MODELS)
    ap.add_argument("shares", nargs="+", type=float)
    ap.add_argument("--ratios", nargs="+", type=float)
    args, setup = parse_with_setup(ap)
    with setup as (model, tokenizer, dense, cache, calibration):
        for ratio in args.ratios or [MODELS[args.model]]:
            for share in args.shares:
                spec = compress_spec(plan={"param_ratio": ratio},
                                     calibration_file=str(calibration),
                                     calibration={"pack": share})
                row = {"model": args.model, "ratio": ratio, "pack": share}
                row.update(run_row(args.model, model, spec, cache, dense, tokenizer))
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
