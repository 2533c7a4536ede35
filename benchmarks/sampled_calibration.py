"""Calibration text sampled from the model itself (`lowrank sample`) against the user's own
text, on a causal LM: the default `lowrank compress` command calibrated on (1) Debian package
descriptions, (2) text sampled from the dense model, (3) both (the Debian lines, then the
sampled ones; calibration's token budget takes the first 32,768 tokens). Each is scored against
the dense model on text of another source (python_docs paragraphs) and on held-out Debian lines
(the calibration text's own source, lines never calibrated on).

    python benchmarks/sampled_calibration.py [--model DIR] [--ratio 0.85] [--paragraphs 100]
        [--texts debian sampled both] [--flags "--recover lora" ...] [--cache-dir DIR]

Each text is compressed once per --flags string (one row each); --cache-dir lets rows share the
stages their flags do not change (a seed study of recovery trains only recovery again).

Writes --out.json and --out.md (default reports/sampled-calibration).
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
from quality_lm import CALIBRATION, DATA, ROOT, compress, greedy, repeated_ngrams, score

HELD_OUT = ("debian_descriptions.txt", 15000, 15400)  # after the calibration lines, disjoint
TEXTS = {"debian": "Debian lines", "sampled": "sampled from the model",
         "both": "Debian lines, then sampled"}


def lines_of(name: str, start: int, stop: int) -> list[str]:
    return [t for t in (DATA / name).read_text().splitlines()[start:stop] if t.strip()]


def mean_length(continuations: list[list[int]]) -> float:
    """New tokens per greedy continuation (64 unless the model ended its turn early)."""
    return sum(map(len, continuations)) / len(continuations)


def evaluation_texts(paragraphs: int = 100) -> dict[str, list[str]]:
    """The first python_docs paragraphs (another source) and the held-out Debian lines."""
    return {"python_docs": lines_of("python_docs.txt", 0, 10**9)[:paragraphs],
            "debian": lines_of(*HELD_OUT)}


def rounded_scores(model, dense, tokenizer, evaluation: dict[str, list[str]]) -> dict:
    """Perplexity / dense, top-1 agreement and KL on each of ``evaluation``'s texts."""
    row = {}
    for name, texts in evaluation.items():
        s = score(model, dense, tokenizer, texts)
        row[name] = {"ppl_ratio": round(math.exp(s["nll"] - s["dense_nll"]), 3),
                     "top1_agreement": round(s["top1_agreement"], 3), "kl": round(s["kl"], 3)}
    return row


def sample(model: str, path: Path) -> dict:
    cmd = [sys.executable, "-c", "from lowrank.cli import main; main()", "sample", model,
           str(path), "--json", "-"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(proc.returncode)
    return {**json.loads(proc.stdout), "wall_s": round(time.perf_counter() - start, 1)}


def markdown(result: dict) -> str:
    lines = [
        f"# Calibration text sampled from {Path(result['model']).name} itself", "",
        (f"Measured {result['date']} with `{result['command']}` at {result['ratio']:.0%} of "
        f"the parameters, the default command plus each row's flags."), "",
        (f"- Sampled text: `lowrank sample MODEL FILE` (defaults): {result['sampled']['lines']} "
         f"lines, {result['sampled']['tokens']:,} tokens, {result['sampled']['seconds']} s."
         if result["sampled"] else "- No `lowrank sample` file (not asked for)."),
        f"- Debian text: {result['calibration']}.",
        (f"- Scored on python_docs ({result['evaluation']}; dense perplexity "
        f"{result['dense_ppl']['python_docs']:.1f}) and on held-out Debian lines "
        f"({result['held_out']}; dense perplexity {result['dense_ppl']['debian']:.1f})."),
        (f"- Greedy check: repeated 4-grams in up to 64 greedy tokens on 5 chat prompts, and "
         "the mean count of those tokens, the end of turn included (an answer that ends at "
         f"once repeats nothing; dense: {result['dense_repeated_4grams']:.3f}, "
         f"{result.get('dense_greedy_tokens', 64):.0f} tokens)."), "",
        ("| calibration text | flags | python_docs: ppl / dense | top-1 | KL | held-out Debian: "
        "ppl / dense | top-1 | KL | repeated 4-grams | greedy tokens | compress s | stages s |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        p, d = r["python_docs"], r["debian"]
        stages = ", ".join(f"{k} {v:.0f}" + (" (cached)" if k in r.get("cached", ()) else "")
                           for k, v in r["stages_s"].items() if v)
        lines.append(f"| {r['text']} | `{r['flags'] or '(none)'}` | {p['ppl_ratio']:.3f}× "
                     f"| {p['top1_agreement']:.3f} | {p['kl']:.3f} | {d['ppl_ratio']:.3f}× "
                     f"| {d['top1_agreement']:.3f} | {d['kl']:.3f} | {r['repeated_4grams']:.3f} "
                     f"| {r.get('greedy_tokens', 64):.1f} | {r['compress_s']:.0f} | {stages} |")
    lines += ["", ("Quality numbers are deterministic for a given sampled file; wall times depend on "
              "what else the machine ran (2 cores).")]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/root/.cache/smollm2-135m")
    ap.add_argument("--ratio", type=float, default=0.85)
    ap.add_argument("--paragraphs", type=int, default=100)
    ap.add_argument("--texts", nargs="+", choices=TEXTS, default=list(TEXTS))
    ap.add_argument("--flags", nargs="+", default=[""],
                    help="more compress flags: one row per string and text")
    ap.add_argument("--cache-dir", help="lowrank's stage cache, shared by the rows")
    ap.add_argument("--out", default=str(ROOT / "reports" / "sampled-calibration"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    from transformers import AutoTokenizer

    import lowrank
    from lowrank.models import load_dense

    evaluation = evaluation_texts(args.paragraphs)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dense = load_dense(args.model).eval()
    rows, dense_ppl = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        # beside the cache when there is one: the texts' paths are in the calibrate stage's key
        texts = Path(args.cache_dir) if args.cache_dir else Path(tmp)
        texts.mkdir(parents=True, exist_ok=True)
        debian, sampled = texts / "debian.txt", texts / "sampled.txt"
        debian.write_text("\n".join(lines_of(*CALIBRATION)) + "\n")
        both = texts / "both.txt"
        sampled_info = None
        if {"sampled", "both"} & set(args.texts):
            sampled_info = sample(args.model, sampled)
            both.write_text(debian.read_text() + sampled.read_text())
        paths = {"debian": debian, "sampled": sampled, "both": both}
        for text, flags in [(t, f) for t in args.texts for f in args.flags]:
            out = Path(tmp) / f"{text}-{len(rows)}"
            row = {"text": TEXTS[text], "flags": flags,
                   **compress(args.model, out, args.ratio, paths[text], flags, args.cache_dir)}
            model = lowrank.load(out).eval()
            for name, texts in evaluation.items():
                s = score(model, dense, tokenizer, texts)
                dense_ppl[name] = math.exp(s["dense_nll"])
                row[name] = {"ppl_ratio": math.exp(s["nll"] - s["dense_nll"]),
                             "top1_agreement": s["top1_agreement"], "kl": s["kl"],
                             "tokens": s["tokens"]}
            continuations = greedy(model, tokenizer)
            row["repeated_4grams"] = repeated_ngrams(continuations)
            row["greedy_tokens"] = mean_length(continuations)
            row["continuation"] = tokenizer.decode(continuations[0])  # the first prompt's
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model
    dense_continuations = greedy(dense, tokenizer)
    result = {
        "model": args.model, "date": datetime.date.today().isoformat(), "ratio": args.ratio,
        "command": "python benchmarks/sampled_calibration.py " + shlex.join(sys.argv[1:]),
        "sampled": sampled_info,
        "calibration": f"{CALIBRATION[0]} lines {CALIBRATION[1]}-{CALIBRATION[2]}",
        "held_out": f"{HELD_OUT[0]} lines {HELD_OUT[1]}-{HELD_OUT[2]}",
        "evaluation": f"python_docs.txt first {args.paragraphs} paragraphs, max 128 tokens",
        "dense_ppl": dense_ppl, "dense_repeated_4grams": repeated_ngrams(dense_continuations),
        "dense_greedy_tokens": mean_length(dense_continuations),
        "dense_continuation": tokenizer.decode(dense_continuations[0]), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(args.out + ".md").write_text(markdown(result))


if __name__ == "__main__":
    main()
