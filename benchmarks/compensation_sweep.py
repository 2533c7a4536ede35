"""Compensation's damping and residual share (FactorizeSettings.compensate_damping,
compensate_residual_share) on SmolLM2: the default command otherwise, scored like
sampled_calibration.py (python_docs, another source; held-out Debian lines, the calibration
text's source). Stages the settings do not change come from a stage cache (--cache-dir).

    python benchmarks/compensation_sweep.py SHARE,DAMPING [SHARE,DAMPING ...]
        [--ratio 0.85] [--seed 0] [--no-sampled-text] [--sampled-seed 0] [--sampled-length L]
        [--calibration-tokens N] [--compensate-lines S] [--model DIR] [--cache-dir DIR]

The defaults' own row is 0.6,0.1 (what "auto" gives a topped-up text): with
--calibration-tokens it measures how much of the top-up the quality needs, with
--compensate-lines how many of the calibration file's lines compensation needs (factorize
seconds in each row).

One JSON line per setting: perplexity / dense, top-1 agreement, KL on each text.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from quality_lm import CALIBRATION
from sampled_calibration import evaluation_texts, lines_of, rounded_scores


def main():
    from transformers import AutoTokenizer

    import lowrank
    from lowrank.models import load_dense
    from lowrank.pipeline.runner import run_pipeline
    from lowrank.pipeline.spec import compress_spec

    ap = argparse.ArgumentParser()
    ap.add_argument("settings", nargs="+", help="SHARE,DAMPING")
    ap.add_argument("--ratio", type=float, default=0.85)
    ap.add_argument("--seed", type=int, default=0, help="compress --seed")
    ap.add_argument("--no-sampled-text", action="store_true", help="compress --no-sampled-text")
    ap.add_argument("--sampled-seed", type=int, default=0, help="calibrate.sampled_seed")
    ap.add_argument("--sampled-length", type=int, default=None,
                    help="calibrate.sampled_length (default: the stage's)")
    ap.add_argument("--calibration-tokens", type=int, default=None,
                    help="calibrate.tokens (default: the stage's, 32768)")
    ap.add_argument("--compensate-lines", default="auto",
                    help="factorize.compensate_lines (a share of the file's lines, or auto)")
    ap.add_argument("--model", default="/root/.cache/smollm2-135m")
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "lowrank-sweep")
    args = ap.parse_args()
    lines = args.compensate_lines if args.compensate_lines == "auto" \
        else float(args.compensate_lines)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dense = load_dense(args.model).eval()
    evaluation = evaluation_texts()
    with tempfile.TemporaryDirectory() as tmp:
        # beside the cache, not in tmp: its path is in the calibrate stage's key
        calibration = args.cache_dir / "calibration-debian.txt"
        calibration.parent.mkdir(parents=True, exist_ok=True)
        calibration.write_text("\n".join(lines_of(*CALIBRATION)) + "\n")
        for setting in args.settings:
            share, damping = map(float, setting.split(","))
            spec = compress_spec(plan={"param_ratio": args.ratio},
                                 calibration_file=str(calibration),
                                 calibration={"sampled_text": not args.no_sampled_text,
                                              "sampled_seed": args.sampled_seed,
                                              **({"sampled_length": args.sampled_length}
                                                 if args.sampled_length else {}),
                                              **({"tokens": args.calibration_tokens}
                                                 if args.calibration_tokens else {})},
                                 factorize={"compensate_residual_share": share,
                                            "compensate_damping": damping, "seed": args.seed,
                                            "compensate_lines": lines})
            out = Path(tmp) / f"out-{setting}"
            run_pipeline(spec, args.model, out, cache_dir=args.cache_dir)
            model = lowrank.load(out).eval()
            row = {"ratio": args.ratio, "seed": args.seed, "sampled_text": not args.no_sampled_text,
                   "sampled_seed": args.sampled_seed, "sampled_length": args.sampled_length,
                   "calibration_tokens": args.calibration_tokens,
                   "compensate_lines": args.compensate_lines, "share": share, "damping": damping}
            stages = json.loads((out / "manifest.json").read_text())["stages"]
            row["factorize_seconds"] = next(s["seconds"] for s in stages
                                            if s["stage"] == "factorize")
            row.update(rounded_scores(model, dense, tokenizer, evaluation))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
