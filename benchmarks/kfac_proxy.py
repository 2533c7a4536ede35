"""Whitening variants on SmolLM2-135M with a uniform cut (issue 11 items 2, 3): every decoder
Linear factored at rank 0.6 x its break-even rank (embedding/LM head dense), factors from one
weighting at a time (whiten; kfac at shrinkage 0.01 / 0.05 / 0.2), statistics with every token
("keep") or without each sequence's first ("skip-first"), and kfac with the real next tokens.
Scored as KL(dense || cut) per token and top-1 agreement on the first 30 python_docs paragraphs
(max 128 tokens). Calibration: the first 64 lines of benchmarks/calibration_text.py's file (Debian descriptions
lines 10000-12000), 128 tokens. Prints one JSON row per variant as it finishes.

    PYTHONPATH=. python benchmarks/kfac_proxy.py
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from lowrank.linalg import factorize_matrix
from lowrank.stages.calibrate import CalibrateSettings, collect_stats
from calibration_text import calibration_file  # a module beside this script

MODEL = "/root/.cache/smollm2-135m"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(MODEL)
    calib = calibration_file().read_text().splitlines()[:64]
    texts = [t for t in (DATA / "python_docs.txt").read_text().splitlines() if t.strip()][:30]
    batch = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=128)
    mask = batch["attention_mask"].bool()
    with torch.inference_mode():
        ref = model(**batch).logits[mask].float().log_softmax(-1)
    params = dict(model.named_parameters())
    names = [n for n in params if n.startswith("model.layers.") and n.endswith("proj.weight")]
    orig = {n: params[n].detach().clone() for n in names}

    def evaluate(stats, shrinkage):
        stats.settings = dataclasses.replace(stats.settings, kfac_shrinkage=shrinkage)
        stats.memo.clear()
        with torch.no_grad():
            for n in names:
                w = orig[n]
                r = int(0.6 * w.shape[0] * w.shape[1] / sum(w.shape))
                A, B, _, _ = factorize_matrix(w, r, "gram",
                                              weighting=stats.weighting(n, w.shape[1]))
                params[n].copy_(A @ B)
            out = model(**batch).logits[mask].float().log_softmax(-1)
            for n in names:
                params[n].copy_(orig[n])
        kl = float((ref.exp() * (ref - out)).sum(-1).mean())
        return kl, float((ref.argmax(-1) == out.argmax(-1)).float().mean())

    rows = []
    for label, outliers, labels in (("keep", "keep", "sampled"),
                                    ("skip-first", "skip-first", "sampled"),
                                    ("keep-real", "keep", "real")):
        start = time.perf_counter()
        stats = collect_stats(model, tok, calib, CalibrateSettings(
            method="kfac", outliers=outliers, kfac_labels=labels, batch_size=16))
        print(f"stats {label}: {time.perf_counter() - start:.0f}s", flush=True)
        variants = ([("kfac", 0.05)] if labels == "real"
                    else [("whiten", 0.0)] + [("kfac", s) for s in (0.01, 0.05, 0.2)])
        for method, s in variants:
            stats.settings = dataclasses.replace(stats.settings, method=method)
            kl, top1 = evaluate(stats, s)
            rows.append({"stats": label, "method": method, "shrinkage": s, "kl": kl,
                         "top1": top1})
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
