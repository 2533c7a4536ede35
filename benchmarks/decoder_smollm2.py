"""SmolLM2-135M as an ONNX decoder with a KV cache: dense vs low-rank (vs int8).

Takes a `lowrank compress MODEL OUT --export onnx --int8 --evaluate` output OUT (its onnx/ and
onnx-int8/ decoders), exports the dense model the same way, then:

- greedy decoding of 32 tokens on 5 real prompts, ONNX decoder with its cache vs PyTorch with
  DynamicCache, for dense and compressed (`lowrank.generate.lockstep`);
- int8 fidelity of the compressed int8 decoder against fp32 PyTorch (compressed): top-1
  agreement on held-out text and greedy match lengths (`lowrank.generate.decoder_fidelity`);
- prefill (batch 1 × 128) and per-token decode (batch 1, past 128 → 1 token) latency of dense,
  compressed and compressed-int8 (`lowrank.timing.bench`).

    python benchmarks/decoder_smollm2.py MODEL OUT [--runs 10] [--rounds 2] [--threads 2]

Writes reports/decoder-smollm2.json and reports/decoder-smollm2.md, with issue 12's targets
checked: decode ≥ 1.25× and int8 decode ≥ 2× faster than the dense export, prefill never slower,
greedy output equal to PyTorch's for 32 tokens on 5 prompts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from transformers import AutoTokenizer

import lowrank
from lowrank.generate import OnnxLM, TorchLM, decoder_fidelity, lockstep, onnx_session
from lowrank.io.samples import DEFAULT_EVALUATION, read_calibration_text
from lowrank.models import load_dense
from lowrank.stages.export import export_onnx
from lowrank.stages.int8 import quantize_int8
from lowrank.timing import BenchSettings, bench

PROMPTS = ["The capital of France is", "Once upon a time, there was a little",
           "def fibonacci(n):", "The three primary colors are",
           "In machine learning, a low-rank approximation"]


def greedy(model, path, tokenizer, n):
    reference, candidate = TorchLM(model), OnnxLM(onnx_session(path))
    return [lockstep(reference, candidate, tokenizer(p)["input_ids"], n, 0.0) for p in PROMPTS]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    out = Path(args.out)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dense, compressed = load_dense(args.model), lowrank.load(out)
    dense_path = out / "dense-onnx" / "model.onnx"
    if not dense_path.is_file():
        export_onnx(dense, dense_path)
    dense_int8 = out / "dense-onnx-int8" / "model.onnx"
    if not dense_int8.is_file():
        dense_int8.parent.mkdir(exist_ok=True)
        quantize_int8(dense_path, dense_int8)
    paths = {"dense": dense_path, "dense-int8": dense_int8,
             "compressed": out / "onnx" / "model.onnx",
             "compressed-int8": out / "onnx-int8" / "model.onnx"}
    result = {"model": args.model, "output": str(out), "prompts": PROMPTS,
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "greedy": {"dense": greedy(dense, paths["dense"], tokenizer, args.tokens),
                         "compressed": greedy(compressed, paths["compressed"], tokenizer,
                                              args.tokens)},
              "bytes": {k: p.stat().st_size for k, p in paths.items()}}
    texts = read_calibration_text(DEFAULT_EVALUATION, 32, warn=False)
    result["int8"] = decoder_fidelity(compressed, paths["compressed-int8"], tokenizer, texts,
                                      args.tokens)
    settings = BenchSettings((1,), (128,), args.runs, 3, args.rounds, args.threads)
    result["latency"] = bench(paths, settings)
    result["params_ratio"] = json.loads((out / "plan.json").read_text())["params"]["ratio"]
    result["command"] = "python benchmarks/decoder_smollm2.py " + " ".join(sys.argv[1:])
    Path("reports/decoder-smollm2.json").write_text(json.dumps(result, indent=2))
    Path("reports/decoder-smollm2.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    p50 = {(r["model"], r["phase"]): r["p50_ms"] for r in result["latency"]["results"]}
    m, s = result["latency"]["machine"], result["latency"]["settings"]
    lines = [f"# SmolLM2-135M at {result['params_ratio']:.0%} of its parameters: ONNX decoder "
             "with a KV cache (issue 12)", "",
             f"`{result['command']}` on `{result['output']}` — {m['cpu']}, "
             f"{s['intra_threads']} intra-op threads, onnxruntime {m['onnxruntime']}, "
             f"{result['date']}. p50 of {s['rounds']} processes × {s['runs']} runs, models "
             "alternating. Prefill: batch 1 × 128 tokens; decode: one token after 128 cached.", "",
             "| model | file MB | prefill p50 ms | decode p50 ms | prefill vs dense "
             "| decode vs dense |", "|---|---:|---:|---:|---:|---:|"]
    for name, size in result["bytes"].items():
        pre, dec = p50[(name, "prefill")], p50[(name, "decode")]
        lines.append(f"| {name} | {size / 1e6:.1f} | {pre:.2f} | {dec:.2f} "
                     f"| {p50[('dense', 'prefill')] / pre:.2f}× "
                     f"| {p50[('dense', 'decode')] / dec:.2f}× |")
    speed = {n: p50[("dense", "decode")] / p50[(n, "decode")] for n in result["bytes"]}
    prefill = p50[("dense", "prefill")] / p50[("compressed", "prefill")]
    greedy = {k: [g["match_length"] for g in v] for k, v in result["greedy"].items()}
    full = all(g["match_length"] == g["tokens"] for v in result["greedy"].values() for g in v)
    lines += ["", "Targets (issue 12):",
              f"- decode ≥ 1.25× dense: {speed['compressed']:.2f}× — "
              f"{'met' if speed['compressed'] >= 1.25 else 'not met'}",
              f"- int8 decode ≥ 2× dense: {speed['compressed-int8']:.2f}× — "
              f"{'met' if speed['compressed-int8'] >= 2 else 'not met'}",
              f"- prefill never slower than dense: {prefill:.2f}× — "
              f"{'met' if prefill >= 1 else 'not met'}",
              f"- greedy ONNX (with cache) = PyTorch, match lengths: {greedy} — "
              f"{'met' if full else 'not met'}",
              "", f"int8 fidelity (compressed int8 vs fp32 PyTorch): {json.dumps(result['int8'])}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
