"""Quality of a compressed causal LM (issue 11): the default `lowrank compress` command (and any
variants of it) at several parameter ratios, scored against the dense model on text from
another source than the calibration text.

- Calibration (and recovery) text: lines 10000-12000 of ../shared/data/debian_descriptions.txt.
- Evaluation text (never calibrated or trained on): the first N paragraphs of
  ../shared/data/python_docs.txt, max 128 tokens each.
- Columns: perplexity ratio to dense, next-token top-1 agreement with dense, KL(dense ‖ compressed)
  per token, each stage's wall time; and a greedy-generation check (64 new tokens on 5 chat
  prompts): the fraction of repeated 4-grams next to the dense model's, and how many of the
  first 32 greedy tokens equal dense's (good perplexity with degenerate text is a known failure
  of SVD compressors).

    python benchmarks/quality_lm.py [--model DIR] [--ratios 0.95 0.85 0.7] [--paragraphs N]
        [--variants NAME=FLAGS ...]   e.g. default= 'lora=--recover lora'

Each variant is the default command plus FLAGS (empty: the default command itself). Writes
--out.json and --out.md (default reports/quality-smollm2).
"""

from __future__ import annotations

import argparse
import datetime
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
CALIBRATION = ("debian_descriptions.txt", 10000, 12000)
PROMPTS = [
    "Explain what a Python list comprehension is.",
    "Write a short note about the history of the Debian project.",
    "What is the difference between a process and a thread?",
    "Give three tips for writing readable code.",
    "Describe how a hash table works.",
]


def score(model, dense, tokenizer, texts, max_length=128, batch=8) -> dict:
    """NLL per real token of both models, KL(dense ‖ model) per token, top-1 agreement."""
    nll = dense_nll = kl = agree = 0.0
    count = 0
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            b = tokenizer(texts[i:i + batch], return_tensors="pt", padding=True, truncation=True,
                          max_length=max_length)
            mask = b["attention_mask"][:, 1:].bool()
            target = b["input_ids"][:, 1:][mask]
            logp = model(**b).logits[:, :-1][mask].float().log_softmax(-1)
            ref = dense(**b).logits[:, :-1][mask].float().log_softmax(-1)
            nll -= float(logp.gather(-1, target[:, None]).sum())
            dense_nll -= float(ref.gather(-1, target[:, None]).sum())
            kl += float((ref.exp() * (ref - logp)).sum())
            agree += float((logp.argmax(-1) == ref.argmax(-1)).sum())
            count += int(mask.sum())
    return {"nll": nll / count, "dense_nll": dense_nll / count, "kl": kl / count,
            "top1_agreement": agree / count, "tokens": count}


def greedy(model, tokenizer, new_tokens=64) -> list[list[int]]:
    out = []
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, return_tensors="pt")
        ids = getattr(ids, "input_ids", ids)  # transformers 5 returns a BatchEncoding
        with torch.inference_mode():
            seq = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new_tokens, pad_token_id=tokenizer.eos_token_id)
        out.append(seq[0, ids.shape[1]:].tolist())
    return out


def repeated_ngrams(seqs: list[list[int]], n: int = 4) -> float:
    """Fraction of n-grams that already occurred earlier in the same continuation."""
    repeated = total = 0
    for s in seqs:
        grams = [tuple(s[i:i + n]) for i in range(len(s) - n + 1)]
        repeated += len(grams) - len(set(grams))
        total += len(grams)
    return repeated / max(total, 1)


def same_prefix(a: list[int], b: list[int], n: int = 32) -> int:
    k = 0
    while k < min(n, len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def compress(model: str, out: Path, ratio: float, calibration: Path, flags: str,
             cache: str | None = None) -> dict:
    """Run the compress command; ``cache``: lowrank's stage cache to share between rows (their
    stage times then say "cached"), else none."""
    cmd = [sys.executable, "-c", "from lowrank.cli import main; main()", "compress", model,
           str(out), "--param-ratio", str(ratio), "--calibration", str(calibration),
           *(["--cache-dir", cache] if cache else ["--no-cache"]), *shlex.split(flags)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(proc.returncode)
    manifest = json.loads((out / "manifest.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    return {"compress_s": round(wall, 1), "param_ratio": plan["params"]["ratio"],
            "stages_s": {s["stage"]: s.get("seconds") for s in manifest.get("stages", [])},
            "cached": [s["stage"] for s in manifest.get("stages", []) if s.get("cached")],
            "dense_layers": sum(1 for e in plan["layers"].values() if e["rank"] is None)}


def markdown(result: dict) -> str:
    lines = [
        f"# {Path(result['model']).name} quality by parameter ratio (issue 11)", "",
        f"Measured {result['date']} with `{result['command']}`.", "",
        f"- Calibration (and recovery) text: {result['calibration']}.",
        (f"- Evaluation text (another source, never calibrated on): {result['evaluation']}; "
        f"dense perplexity {result['dense_ppl']:.1f}."),
        ("- Greedy check: 64 new tokens on 5 chat prompts; repeated 4-grams (dense: "
        f"{result['dense_repeated_4grams']:.3f}) and greedy tokens equal to dense's among the "
        "first 32 (mean over prompts)."), "",
        ("| variant | flags | params kept | ppl / dense | top-1 agreement | KL (nats/token) "
        "| repeated 4-grams | greedy = dense (of 32) | compress s | stages s |"),
        "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["stages_s"].items() if v)
        lines.append(
            f"| {r['variant']} | `{r['flags'] or '(default)'}` | {r['param_ratio']:.1%} "
            f"| {r['ppl_ratio']:.2f}× | {r['top1_agreement']:.3f} | {r['kl']:.3f} "
            f"| {r['repeated_4grams']:.3f} | {r['greedy_same_prefix']:.1f} | {r['compress_s']:.0f} "
            f"| {stages} |")
    lines += ["", ("Wall times depend on what else the machine ran (2 cores); quality numbers are "
              "deterministic.")]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/root/.cache/smollm2-135m")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.95, 0.85, 0.7])
    ap.add_argument("--variants", nargs="+", default=["default="])
    ap.add_argument("--paragraphs", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "reports" / "quality-smollm2"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    from transformers import AutoTokenizer

    import lowrank
    from lowrank.models import load_dense

    texts = [t for t in (DATA / "python_docs.txt").read_text().splitlines() if t.strip()]
    texts = texts[:args.paragraphs]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dense = load_dense(args.model).eval()
    dense_greedy = greedy(dense, tokenizer)
    rows, dense_nll = [], None
    with tempfile.TemporaryDirectory() as tmp:
        name, start, stop = CALIBRATION
        calib = Path(tmp) / "calibration.txt"
        calib.write_text("\n".join((DATA / name).read_text().splitlines()[start:stop]) + "\n")
        for ratio in args.ratios:
            for variant in args.variants:
                label, _, flags = variant.partition("=")
                out = Path(tmp) / f"{label}-{ratio}"
                row = {"variant": label, "flags": flags, "ratio": ratio,
                       **compress(args.model, out, ratio, calib, flags)}
                model = lowrank.load(out).eval()
                s = score(model, dense, tokenizer, texts)
                dense_nll = s["dense_nll"]
                ids = greedy(model, tokenizer)
                row.update(ppl=math.exp(s["nll"]), ppl_ratio=math.exp(s["nll"] - dense_nll),
                           top1_agreement=s["top1_agreement"], kl=s["kl"],
                           repeated_4grams=repeated_ngrams(ids),
                           greedy_same_prefix=sum(map(same_prefix, ids, dense_greedy)) / len(ids),
                           sample_continuation=tokenizer.decode(ids[0]))
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "sample_continuation"}),
                      flush=True)
                del model
    result = {
        "model": args.model, "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/quality_lm.py " + shlex.join(sys.argv[1:]),
        "calibration": f"{CALIBRATION[0]} lines {CALIBRATION[1]}-{CALIBRATION[2]}",
        "evaluation": f"python_docs.txt first {args.paragraphs} paragraphs, max 128 tokens",
        "dense_ppl": math.exp(dense_nll), "dense_repeated_4grams": repeated_ngrams(dense_greedy),
        "dense_sample_continuation": tokenizer.decode(dense_greedy[0]), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # e.g. --out /tmp/new/name
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(args.out + ".md").write_text(markdown(result))


if __name__ == "__main__":
    main()
