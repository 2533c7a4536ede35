"""Token replacement in recovery (RecoverSettings.replace_share: each step, that share of the
batch's real tokens replaced by tokens of the same batch, for teacher and student alike): the
default command with `--recover lora` (3 minutes) otherwise, calibrated and trained on Debian
lines 10000-12000, scored like probe_size.py on python_docs paragraphs (another source) and
held-out Debian lines (the training text's source).

    python benchmarks/token_replacement.py minilm 0 0.15 0.3 0.5 [--seeds 0 1] [--steps N]
        [--method auto|lora|orthogonal|factors]   (default lora: the rows of the report)
    python benchmarks/token_replacement.py smollm2 0 0.15 [--cache-dir DIR]

--steps trains a fixed number of steps instead of 3 minutes: rows then differ by the share and
the seed alone, not by how fast the machine ran.

One JSON line per seed and share, with recovery's steps. The stages before recovery come from a
stage cache that every row shares; recovery itself runs again for each row.
"""

from __future__ import annotations

import argparse
import json

import torch
from probe_size import MODELS, parse_with_setup, recovery_row

from lowrank.stages.recover import METHODS


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=MODELS)
    ap.add_argument("shares", nargs="+", type=float)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--steps", type=int)
    ap.add_argument("--method", default="lora", choices=METHODS)
    args, context = parse_with_setup(ap)
    with context as setup:
        for seed in args.seeds:
            for share in args.shares:
                row = {"model": args.model, "method": args.method, "replace_share": share,
                       "seed": seed, "steps": args.steps}
                row.update(recovery_row(args.model, setup, args.method, {
                    "replace_share": share, "seed": seed, "steps": args.steps}))
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
