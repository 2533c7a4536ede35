"""One input basis shared by projections that read the same input (q, k, v; gate, up) against
the default command's per-matrix factors, on a causal LM, at the parameters the default plan
gives each group.

reports/fused-vs-split.md measured that one rank-R factorization of a stacked matrix [q; k; v]
loses less whitened output energy than the parts factored one by one at equal parameters: one
B spends the input side once. Whether that carries over end to end is measured here. The
default command compresses the model (training-free); then, per decoder layer and group whose
plan factors at least one member:

- split: each factored member whitened-SVD factored at its plan rank (the default's factors
  before compensation, for a like-for-like comparison);
- shared: the stacked group at the one rank R with R·(sum of outs + in) <= the parameters the
  plan spends on the group (dense members included), whitened by the group's input Gram;
- shared, all factored: shared only where the plan factors every member, split elsewhere.

Each is scored against the dense model on python_docs paragraphs and held-out Debian lines
(calibration: Debian lines 10000-12000; benchmarks/quality_lm.py).

    python benchmarks/shared_basis.py [--model DIR] [--ratio 0.85] [--paragraphs 100]

Writes --out.json and --out.md (default reports/shared-basis).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from against_default import default_run, write_report
from quality_lm import ROOT
from sampled_calibration import evaluation_texts, rounded_scores

GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


def whitened(w: torch.Tensor, root: torch.Tensor, rank: int) -> torch.Tensor:
    """U_r·U_rᵀ·W for U the left singular vectors of W·L: the whitened rank-r reconstruction."""
    u = torch.linalg.svd(w @ root, full_matrices=False)[0][:, :rank]
    return u @ (u.T @ w)


def variant(dense_sd: dict, compressed_sd: dict, layers: dict, stats, shared: str | None,
            num_layers: int) -> tuple[dict, int]:
    """The compressed state dict with each group refactored; shared: None | "any" | "all"."""
    from lowrank.weighting import psd_root

    sd, shared_groups = dict(compressed_sd), 0
    for i in range(num_layers):
        for block, parts in GROUPS:
            names = [f"model.layers.{i}.{block}.{p}.weight" for p in parts]
            ranks = [layers.get(n, {}).get("rank") for n in names]
            if all(r is None for r in ranks):
                continue
            ws = [dense_sd[n].double() for n in names]
            root = psd_root(stats.grams[names[0]].double())  # the members read the same input
            out, cols = sum(w.shape[0] for w in ws), ws[0].shape[1]
            spent = sum(w.numel() if r is None else r * sum(w.shape) for w, r in zip(ws, ranks))
            rank = spent // (out + cols)
            if shared and rank * (out + cols) < out * cols and (
                    shared == "any" or all(r is not None for r in ranks)):
                shared_groups += 1
                fitted = whitened(torch.cat(ws), root, rank).split([w.shape[0] for w in ws])
            else:
                fitted = [w if r is None else whitened(w, root, r) for w, r in zip(ws, ranks)]
            sd.update({n: w.float() for n, w in zip(names, fitted)})
    return sd, shared_groups


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/root/.cache/smollm2-135m")
    ap.add_argument("--ratio", type=float, default=0.85)
    ap.add_argument("--paragraphs", type=int, default=100)
    ap.add_argument("--out", default=str(ROOT / "reports" / "shared-basis"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    from transformers import AutoTokenizer

    from lowrank.io.checkpoint import LazyTensors
    from lowrank.models import load_dense
    from lowrank.stages.factored import read_lowrank_config, reconstruct_dense

    texts = evaluation_texts(args.paragraphs)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dense = load_dense(args.model).eval()
    dense_sd = dense.state_dict()
    rows = []
    with default_run(args.model, args.ratio) as (summary, out, stats):
        config = read_lowrank_config(out)
        compressed_sd = reconstruct_dense(dict(LazyTensors.open(out)), config)
    for label, shared in (("default", "default"), ("split", None), ("shared", "any"),
                          ("shared, all factored", "all")):
        sd, groups = ((compressed_sd, 0) if shared == "default" else
                      variant(dense_sd, compressed_sd, config["layers"], stats, shared,
                              dense.config.num_hidden_layers))
        model = load_dense(args.model).eval()
        model.load_state_dict(sd, strict=False)
        model.tie_weights()
        rows.append({"variant": label, "shared_groups": groups,
                     **rounded_scores(model, dense, tokenizer, texts)})
        print(json.dumps(rows[-1]), flush=True)
    write_report(args.out, f"One input basis per group (q, k, v; gate, up) on "
                 f"{Path(args.model).name}", ("groups shared", "shared_groups"), rows,
                 model=args.model, ratio=args.ratio, param_ratio=summary["param_ratio"],
                 compress_s=summary["compress_s"], paragraphs=args.paragraphs)


if __name__ == "__main__":
    main()
