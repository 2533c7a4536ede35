"""Massive activations in a causal LM's Linear inputs (issue 11 item 3): for each Linear, the
share of its input Gram's trace (Σ‖x‖² over real tokens) held by each sequence's first token, and
the largest token's ‖x‖² over the median. Prints the Linears where the first tokens hold > 5%.

    python benchmarks/outliers_lm.py [--model DIR] [--lines 64]
    (calibration text: Debian descriptions lines 10000-12000, benchmarks/calibration_text.py)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from calibration_text import calibration_file  # a module beside this script


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/root/.cache/smollm2-135m")
    ap.add_argument("--text", default=str(calibration_file()))
    ap.add_argument("--lines", type=int, default=64)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    lines = Path(args.text).read_text().splitlines()[:args.lines]
    batch = tokenizer(lines, return_tensors="pt", padding=True, truncation=True, max_length=128)
    mask = batch["attention_mask"].bool()
    first = torch.zeros_like(mask)
    first[torch.arange(mask.shape[0]), mask.int().argmax(1)] = True
    found = {}

    def hook(name):
        def record(module, inputs):
            norms = inputs[0].detach().double().pow(2).sum(-1)
            real = norms[mask]
            found[name] = (float(norms[first].sum() / real.sum()),
                           float(real.max() / real.median()))
        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not model.get_output_embeddings():
            module.register_forward_pre_hook(hook(name))
    with torch.inference_mode():
        model(**batch)
    print(f"{int(mask.sum())} real tokens, {mask.shape[0]} first tokens")
    for name, (share, ratio) in found.items():
        if share > 0.05:
            print(f"{name:40s} first-token share of tr G {share:.3f}  max/median ‖x‖² {ratio:.0f}")
    print(f"mean first-token share over {len(found)} Linears: "
          f"{sum(v[0] for v in found.values()) / len(found):.3f}")


if __name__ == "__main__":
    main()
