"""A hybrid tied embedding on a causal LM: the K rows of the tokens most frequent in the
calibration text kept exact, every other row projected on a rank-r basis (A = E·Bᵀ, B the top
r right singular vectors of the other rows, weighted by sqrt(count + 0.1) like the embedding's
default weighting), the rest of the model dense. Would it free parameters more cheaply than the
default plan's cut of the Linears? Compared with the default command at --ratio (training-free),
both scored against the dense model on python_docs paragraphs and held-out Debian lines
(calibration: Debian lines 10000-12000; benchmarks/quality_lm.py).

    python benchmarks/hybrid_embedding.py [--model DIR] [--ratio 0.85] [--grid 4096,128 ...]

Writes --out.json and --out.md (default reports/hybrid-embedding).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import sys
import tempfile
from pathlib import Path

import torch
from quality_lm import CALIBRATION, DATA, ROOT, compress, score
from shared_basis import HELD_OUT


def hybrid(weight: torch.Tensor, counts: torch.Tensor, kept: int, rank: int) -> torch.Tensor:
    """The embedding with its ``kept`` most counted rows exact, the others on a rank basis."""
    w = weight.double()
    exact = counts.argsort(descending=True)[:kept]
    others = (counts + 0.1).sqrt()
    others[exact] = 0
    basis = torch.linalg.svd(w * others[:, None], full_matrices=False)[2][:rank]
    out = w @ basis.T @ basis
    out[exact] = w[exact]
    return out.to(weight.dtype)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/root/.cache/smollm2-135m")
    ap.add_argument("--ratio", type=float, default=0.85)
    ap.add_argument("--paragraphs", type=int, default=100)
    ap.add_argument("--grid", nargs="+", default=["4096,128", "8192,128", "4096,256"])
    ap.add_argument("--out", default=str(ROOT / "reports" / "hybrid-embedding"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    from transformers import AutoTokenizer

    import lowrank
    from lowrank.models import load_dense
    from lowrank.stages.calibrate import load_stats

    texts = {"python_docs": [t for t in (DATA / "python_docs.txt").read_text().splitlines()
                             if t.strip()][:args.paragraphs],
             "debian_held_out": [t for t in (DATA / HELD_OUT[0]).read_text().splitlines()[
                 HELD_OUT[1]:HELD_OUT[2]] if t.strip()]}
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dense = load_dense(args.model).eval()
    total = sum(p.numel() for p in dense.parameters())  # a tied pair counts once
    embedding = dense.get_input_embeddings().weight.detach()
    rows, cols = embedding.shape

    def scored(model, label, param_ratio):
        row = {"variant": label, "param_ratio": param_ratio}
        for source, lines in texts.items():
            s = score(model, dense, tokenizer, lines)
            row[source] = {"ppl_ratio": math.exp(s["nll"] - s["dense_nll"]),
                           "top1_agreement": s["top1_agreement"], "kl": s["kl"]}
        print(json.dumps(row), flush=True)
        return row

    with tempfile.TemporaryDirectory() as tmp:
        name, start, stop = CALIBRATION
        calib, out, cache = Path(tmp) / "calibration.txt", Path(tmp) / "out", Path(tmp) / "cache"
        calib.write_text("\n".join((DATA / name).read_text().splitlines()[start:stop]) + "\n")
        compressed = compress(args.model, out, args.ratio, calib, "", str(cache))
        results = [scored(lowrank.load(out).eval(), f"default command at {args.ratio}",
                          compressed["param_ratio"])]
        stats = load_stats(next((cache / "calibrate").iterdir()))
    counts = stats.token_counts["model.embed_tokens.weight"].double()
    for cell in args.grid:
        kept, rank = map(int, cell.split(","))
        model = load_dense(args.model).eval()
        with torch.no_grad():
            model.get_input_embeddings().weight.copy_(hybrid(embedding, counts, kept, rank))
        params = total - rows * cols + kept * cols + rank * (rows + cols)
        results.append(scored(model, f"hybrid embedding, {kept} rows exact, rank {rank}",
                              round(params / total, 4)))
    result = {"model": args.model, "date": datetime.date.today().isoformat(),
              "command": shlex.join(["python", "benchmarks/hybrid_embedding.py", *sys.argv[1:]]),
              "tokens_seen": int((counts > 0).sum()), "vocabulary": rows,
              "calibration": f"{CALIBRATION[0]} lines {CALIBRATION[1]}-{CALIBRATION[2]}",
              "evaluation": (f"python_docs.txt first {args.paragraphs} paragraphs; "
                             f"{HELD_OUT[0]} lines {HELD_OUT[1]}-{HELD_OUT[2]}"), "rows": results}
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# A hybrid tied embedding on {Path(args.model).name}", "",
             (f"Measured {result['date']} with `{result['command']}` (its docstring says what "
              f"each row is). The calibration text uses {result['tokens_seen']} of the "
              f"{rows} tokens. Evaluation: {result['evaluation']}; calibration: "
              f"{result['calibration']}."), "",
             ("| variant | params kept | python_docs ppl / dense | top-1 | KL | held-out Debian "
              "top-1 | KL |"), "|---|---|---|---|---|---|---|"]
    for r in results:
        p, d = r["python_docs"], r["debian_held_out"]
        lines.append(f"| {r['variant']} | {r['param_ratio']:.3f} | {p['ppl_ratio']:.3f}× | "
                     f"{p['top1_agreement']:.3f} | {p['kl']:.3f} | {d['top1_agreement']:.3f} | "
                     f"{d['kl']:.3f} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
