"""Recovery's method (RecoverSettings.method: LoRA adapters, orthogonal adapters or the factors
themselves): the default command with `--recover METHOD` (3 minutes) otherwise, calibrated and
trained on Debian lines 10000-12000, scored like probe_size.py on python_docs paragraphs
(another source) and held-out Debian lines (the training text's source).

    python benchmarks/recovery_method.py minilm lora factors factors:1e-3 orthogonal [--seeds 0 1]
    python benchmarks/recovery_method.py smollm2 factors lora [--cache-dir DIR]
    python benchmarks/recovery_method.py minilm factors --batch-size 16
    python benchmarks/recovery_method.py smollm2 lora lora:3e-4 --loss hidden

A variant is METHOD or METHOD:LR (default: the measured learning rate of that method and model
kind); --batch-size sets every row's training batch (default: recovery's, 32), --loss its
loss (default: by model kind, RecoverSettings.loss). One JSON line
per seed and variant, with recovery's steps. The stages before recovery come from a stage cache
that every row shares; recovery itself runs again for each row.
"""

from __future__ import annotations

import argparse
import json

import torch
from probe_size import MODELS, parse_with_setup, recovery_row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=MODELS)
    ap.add_argument("variants", nargs="+", help="METHOD or METHOD:LR")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--loss", choices=("hidden", "logits", "outputs"),
                    help="recovery's loss (default: by model kind)")
    args, context = parse_with_setup(ap)
    with context as setup:
        for seed in args.seeds:
            for variant in args.variants:
                method, _, lr = variant.partition(":")
                row = {"model": args.model, "method": method, "lr": float(lr) if lr else None,
                       "seed": seed, "batch_size": args.batch_size,
                       **({"loss": args.loss} if args.loss else {})}
                recover = {"seed": seed, **({"lr": float(lr)} if lr else {}),
                           **({"batch_size": args.batch_size} if args.batch_size else {}),
                           **({"loss": args.loss} if args.loss else {})}
                row.update(recovery_row(args.model, setup, method, recover))
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
