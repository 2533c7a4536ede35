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
import json
from pathlib import Path

import torch
from against_default import default_run, write_report
from quality_lm import ROOT
from sampled_calibration import evaluation_texts, rounded_scores


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

    texts = evaluation_texts(args.paragraphs)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dense = load_dense(args.model).eval()
    total = sum(p.numel() for p in dense.parameters())  # a tied pair counts once
    embedding = dense.get_input_embeddings().weight.detach()
    rows, cols = embedding.shape

    def scored(model, label, param_ratio):
        result = {"variant": label, "param_ratio": param_ratio,
                  **rounded_scores(model, dense, tokenizer, texts)}
        print(json.dumps(result), flush=True)
        return result

    with default_run(args.model, args.ratio) as (summary, out, stats):
        results = [scored(lowrank.load(out).eval(), f"default command at {args.ratio}",
                          round(summary["param_ratio"], 4))]
    counts = stats.token_counts["model.embed_tokens.weight"].double()
    for cell in args.grid:
        kept, rank = map(int, cell.split(","))
        model = load_dense(args.model).eval()
        with torch.no_grad():
            model.get_input_embeddings().weight.copy_(hybrid(embedding, counts, kept, rank))
        params = total - rows * cols + kept * cols + rank * (rows + cols)
        results.append(scored(model, f"hybrid embedding, {kept} rows exact, rank {rank}",
                              round(params / total, 4)))
    write_report(args.out, f"A hybrid tied embedding on {Path(args.model).name}",
                 ("params kept", "param_ratio"), results, model=args.model,
                 tokens_seen=int((counts > 0).sum()), vocabulary=rows,
                 paragraphs=args.paragraphs)


if __name__ == "__main__":
    main()
