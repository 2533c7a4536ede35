"""Recovery within a time budget on SmolLM2-135M (issue 11 item 5): recovery variants on one
cached training-free compression, scored on held-out text against the dense model.

Calibration and recovery training: benchmarks/calibration_text.py (lines 10000-12000 of
../shared/data/debian_descriptions.txt); evaluation: the first N paragraphs of
../shared/data/python_docs.txt (another source), max 128 tokens, scored as
benchmarks/quality_lm.py does (perplexity ratio to dense, next-token top-1 agreement).
Each variant is `lowrank compress MODEL OUT --param-ratio R --calibration CALIB --recover lora
FLAGS` with a shared --cache-dir: the stages before recover come from the cache (run the
training-free command first), so `recover_s` is the recover stage's own wall time.

    python benchmarks/recovery_minutes.py --ratio 0.85 --variants 'e2e=--recover-mode end-to-end'
        'block=--recover-mode blockwise' [--paragraphs 100] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibration_text import calibration_file  # a module beside this script
from quality_lm import DATA, score  # a script beside this one


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/root/.cache/smollm2-135m")
    ap.add_argument("--ratio", type=float, default=0.85)
    ap.add_argument("--calibration", default=str(calibration_file()))
    ap.add_argument("--variants", nargs="+", required=True)
    ap.add_argument("--paragraphs", type=int, default=100)
    ap.add_argument("--cache-dir", default="/tmp/recov/cache")
    ap.add_argument("--out", default="/tmp/recov/bench")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from transformers import AutoTokenizer

    import lowrank
    from lowrank.models import load_dense

    texts = [t for t in (DATA / "python_docs.txt").read_text().splitlines()
             if t.strip()][:args.paragraphs]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    cached = Path(args.out + f"-dense-{args.paragraphs}.pt")
    cached.parent.mkdir(parents=True, exist_ok=True)
    if cached.exists():
        dense_nll, dense_top = torch.load(cached)
    else:
        dense_nll, dense_top = score(load_dense(args.model), tokenizer, texts)
        torch.save((dense_nll, dense_top), cached)
    for variant in args.variants:
        name, _, flags = variant.partition("=")
        out = Path(f"{args.out}-{args.ratio}-{name}")
        cmd = [sys.executable, "-c", "from lowrank.cli import main; main()", "compress",
               args.model, str(out), "--param-ratio", str(args.ratio), "--calibration",
               args.calibration, "--cache-dir", args.cache_dir, "--overwrite", "--json",
               str(out) + ".json", *shlex.split(flags)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            continue
        report = json.loads(Path(str(out) + ".json").read_text())
        nll, top = score(lowrank.load(out), tokenizer, texts)
        rec = report.get("recovery", {})
        row = {"variant": name, "flags": flags, "ratio": args.ratio,
               "ppl_ratio": round(math.exp(nll - dense_nll), 3),
               "top1_agreement": round(float((top == dense_top).float().mean()), 3),
               "wall_s": round(wall, 1),
               "stages_s": {s["stage"]: s.get("seconds") for s in report.get("stages", [])},
               **{k: rec.get(k) for k in ("mode", "steps", "block_steps", "tokens_per_second",
                                          "seconds", "heldout_loss_before",
                                          "heldout_loss_after")}}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
