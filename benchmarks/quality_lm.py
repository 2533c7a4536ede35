"""Training-free quality of a compressed causal LM (issue 11): `lowrank compress` with the
default (measured-loss) allocation vs --allocation energy, scored on held-out text.

Calibrates on lines 10000-12000 of ../shared/data/debian_descriptions.txt; evaluates on the
first 200 paragraphs of ../shared/data/python_docs.txt (max 128 tokens): perplexity ratio to
dense and next-token top-1 agreement with dense. Writes reports/quality-smollm2.{md,json}.

    python benchmarks/quality_lm.py [--model DIR] [--ratio 0.85] [--paragraphs N]
        [--variants NAME=FLAGS ...]   e.g. default= energy="--allocation energy"
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def score(model, tokenizer, texts, max_length=128, batch=8):
    """(mean NLL per token, logits argmax per real position) on ``texts``."""
    nll, count, argmax = 0.0, 0, []
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            b = tokenizer(texts[i:i + batch], return_tensors="pt", padding=True, truncation=True,
                          max_length=max_length)
            logits = model(**b).logits[:, :-1].float()
            target, mask = b["input_ids"][:, 1:], b["attention_mask"][:, 1:].bool()
            logp = logits.log_softmax(-1).gather(-1, target[..., None]).squeeze(-1)
            nll -= float(logp[mask].sum())
            count += int(mask.sum())
            argmax.append(logits.argmax(-1)[mask])
    return nll / count, torch.cat(argmax)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/root/.cache/smollm2-135m")
    ap.add_argument("--ratio", type=float, default=0.85)
    # Each variant is the default command plus FLAGS (empty: the default command itself).
    ap.add_argument("--variants", nargs="+", default=["default=", "energy=--allocation energy"])
    ap.add_argument("--paragraphs", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "reports" / "quality-smollm2"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    from transformers import AutoTokenizer

    import lowrank
    from lowrank.models import load_dense

    texts = [t for t in (DATA / "python_docs.txt").read_text().splitlines() if t.strip()][:args.paragraphs]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # The dense scores, kept between runs (the same model, texts and tokenizer).
    cached = Path(args.out + f"-dense-{args.paragraphs}.pt")
    if cached.exists():
        dense_nll, dense_top = torch.load(cached)
    else:
        dense_nll, dense_top = score(load_dense(args.model), tokenizer, texts)
        torch.save((dense_nll, dense_top), cached)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calibration.txt"
        calib.write_text("\n".join(
            (DATA / "debian_descriptions.txt").read_text().splitlines()[10000:12000]) + "\n")
        for variant in args.variants:
            name, _, flags = variant.partition("=")
            out = Path(tmp) / name
            cmd = [sys.executable, "-c", "from lowrank.cli import main; main()", "compress",
                   args.model, str(out), "--param-ratio", str(args.ratio), "--calibration",
                   str(calib), "--no-cache", *shlex.split(flags)]
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            wall = time.perf_counter() - start
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(proc.returncode)
            manifest = json.loads((out / "manifest.json").read_text())
            plan = json.loads((out / "plan.json").read_text())
            nll, top = score(lowrank.load(out), tokenizer, texts)
            rows.append({
                "variant": name, "flags": flags, "param_ratio": plan["params"]["ratio"],
                "ppl": math.exp(nll), "ppl_ratio": math.exp(nll - dense_nll),
                "top1_agreement": float((top == dense_top).float().mean()),
                "compress_s": round(wall, 1),
                "stages_s": {s["stage"]: s.get("seconds") for s in manifest.get("stages", [])},
                "loss_allocation": plan["policy"].get("loss_allocation"),
                "embedding_rank": plan["layers"].get("model.embed_tokens.weight", {}).get("rank"),
                "dense_layers": sum(1 for e in plan["layers"].values() if e["rank"] is None),
            })
            print(json.dumps(rows[-1]), flush=True)
    result = {"model": args.model, "paragraphs": args.paragraphs, "dense_ppl": math.exp(dense_nll), "ratio": args.ratio,
              "calibration": "debian_descriptions.txt lines 10000-12000",
              "evaluation": f"python_docs.txt first {args.paragraphs} paragraphs, max 128 tokens", "rows": rows}
    names = "-".join(v.partition("=")[0] for v in args.variants)
    Path(args.out + f"-{names}.json").write_text(
        json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
