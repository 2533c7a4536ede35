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

Writes reports/decoder-smollm2.json and reports/decoder-smollm2.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from transformers import AutoTokenizer

import lowrank
from lowrank.generate import OnnxLM, TorchLM, decoder_fidelity, lockstep, onnx_session
from lowrank.io.samples import DEFAULT_EVALUATION, read_calibration_text
from lowrank.models import load_dense
from lowrank.stages.export import export_onnx
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
    paths = {"dense": dense_path, "compressed": out / "onnx" / "model.onnx",
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
    Path("reports/decoder-smollm2.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("greedy", "bytes", "int8")}, indent=1))
    for r in result["latency"]["results"]:
        print(r["model"], r["phase"], r["p50_ms"], r["p90_ms"])


if __name__ == "__main__":
    main()
