"""The temperature the calibration top-up is sampled at (tried, not adopted): SmolLM2, the
default command otherwise, scored like sampled_calibration.py (python_docs, another source;
held-out Debian lines, the calibration text's source). The product samples at temperature 1;
this script swaps the sampler's draw for one whose temperature goes linearly from T0 at the
first new token to T1 at token N and stays there (a schedule like self-calibration's, Williams
et al., NAACL 2025: a hot start for varied openings; T0 = T1 is a constant temperature).

    python benchmarks/top_up_temperature.py T0,T1,N,SAMPLED_SEED [...] [--ratio 0.85]

One JSON line per variant: perplexity / dense, top-1 agreement, KL on each text.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from quality_lm import CALIBRATION
from sampled_calibration import evaluation_texts, lines_of, rounded_scores


def scheduled_draw(draw: Callable, t0: float, t1: float, steps: int) -> Callable:
    """InverseCdfDraw.__call__ (``draw``) with the temperature at new token i set to
    t0 + (t1 − t0)·i/steps first, t1 from token ``steps`` on."""
    def call(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        i = input_ids.shape[1] - 1  # new tokens so far (every row starts from one token)
        self.temperature = t1 if i >= steps else t0 + (t1 - t0) * i / steps
        return draw(self, input_ids, scores)
    return call


def main():
    from transformers import AutoTokenizer

    import lowrank
    from lowrank import sample_text
    from lowrank.models import load_dense
    from lowrank.pipeline.runner import run_pipeline
    from lowrank.pipeline.spec import compress_spec

    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="+", help="T0,T1,N,SAMPLED_SEED")
    ap.add_argument("--ratio", type=float, default=0.85)
    ap.add_argument("--model", default="/root/.cache/smollm2-135m")
    args = ap.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dense = load_dense(args.model).eval()
    evaluation = evaluation_texts()
    draw = sample_text.InverseCdfDraw.__call__
    for variant in args.variants:
        t0, t1, steps, seed = variant.split(",")
        sample_text.InverseCdfDraw.__call__ = scheduled_draw(draw, float(t0), float(t1),
                                                             int(steps))
        with tempfile.TemporaryDirectory() as tmp:
            calibration = Path(tmp) / "debian.txt"
            calibration.write_text("\n".join(lines_of(*CALIBRATION)) + "\n")
            spec = compress_spec(plan={"param_ratio": args.ratio},
                                 calibration_file=str(calibration),
                                 calibration={"sampled_seed": int(seed)})
            run_pipeline(spec, args.model, Path(tmp) / "out")
            model = lowrank.load(Path(tmp) / "out").eval()
            row = {"ratio": args.ratio, "t0": float(t0), "t1": float(t1), "steps": int(steps),
                   "sampled_seed": int(seed)}
            row.update(rounded_scores(model, dense, tokenizer, evaluation))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
