"""Attention-aware weighting of the query and key projections (tried, not adopted): SmolLM2,
the default command otherwise, its plan fixed; scored like sampled_calibration.py (python_docs,
another source; held-out Debian lines, the calibration text's source).

Compensation fits q_proj and k_proj to the dense outputs with every output channel weighted
alike, but an error in a query channel only moves the attention logits through the key channel
it multiplies. With rotary embeddings, a logit is Σ over the rotation planes (i, i + d/2) of
a 2-D dot product of the rotated query and key, and rotations keep each plane's norm, so on
average over positions a query error in plane i costs in proportion to the key's energy in
that plane (and a key error to the query's, summed over the query heads of its group). Those
energies come from the statistics already collected: W_k·G·W_kᵀ with G the input Gram that
q, k and v share. This script factors the compensated q/k targets two-sided (lowrank's ``kfac``
weighting: the whitening on the input side, diag(√(e + eps·mean e)) on the output side)
instead of whitened only; ``keys-centered`` takes the covariance around the mean input (means
from a dense pass over the first 256 calibration lines), since a logit error common to every
key of a query changes no attention weight.

    python benchmarks/attention_weighting.py none keys,0.05 keys,0.5 keys-centered,0.05
        [--ratio 0.85] [--cache-dir DIR]
    python benchmarks/attention_weighting.py --planes

One JSON line per variant: perplexity / dense, top-1 agreement, KL on each text. Stages before
factorize come from the stage cache, so every variant factors the same plan. ``--planes``
prints how alike queries' and keys' plane energies are (the correlation of their logs, per key
head): when they are alike, the weighting mostly repeats what whitening already favours.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from quality_lm import CALIBRATION
from sampled_calibration import evaluation_texts, lines_of, rounded_scores

SHARED_STAGES = ("calibrate", "analyze", "scores", "plan")


def plane_energy(cov: torch.Tensor, heads: int) -> torch.Tensor:
    """Per head and channel, the mean energy of its rotation plane (i, i + d/2: transformers'
    rotate_half pairing), from an output covariance (heads·d square)."""
    energy = cov.diagonal().reshape(heads, -1)
    half = energy.shape[1] // 2
    plane = (energy[:, :half] + energy[:, half:]) / 2
    return torch.cat([plane, plane], 1)


def input_means(model_dir: str, tokenizer, lines: int = 256) -> dict[str, torch.Tensor]:
    """Mean input of every q_proj over the first ``lines`` calibration lines (dense, float32)."""
    from lowrank.models import load_dense

    model = load_dense(model_dir).eval()
    sums, count = {}, 0

    def keep(name):
        def hook(module, args):
            x = args[0].detach().double()
            sums[name] = sums.get(name, 0) + x.reshape(-1, x.shape[-1]).sum(0)
        return hook
    for name, module in model.named_modules():
        if name.endswith("self_attn.q_proj"):
            module.register_forward_pre_hook(keep(name + ".weight"))
    with torch.no_grad():
        for text in lines_of(*CALIBRATION)[:lines]:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=128)
            model(**ids)
            count += ids["input_ids"].shape[1]
    return {name: s / count for name, s in sums.items()}


def output_sides(ckpt, stats, config: dict, eps: float, means=None) -> dict[str, torch.Tensor]:
    """{q_proj / k_proj weight name: diagonal output-side factor} for every attention layer."""
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    group = heads // kv_heads
    sides = {}
    for q in [n for n in stats.grams if n.endswith("self_attn.q_proj.weight")]:
        k = q.replace("q_proj", "k_proj")
        gram = stats.grams[q].double() / stats.tokens  # q, k and v share this input
        if means is not None:
            gram = gram - torch.outer(means[q], means[q])
        wq, wk = ckpt.get(q).double(), ckpt.get(k).double()
        keys = plane_energy(wk @ gram @ wk.T, kv_heads)
        queries = plane_energy(wq @ gram @ wq.T, heads)
        for name, energy in ((q, keys.repeat_interleave(group, 0)),
                             (k, queries.reshape(kv_heads, group, -1).sum(1))):
            energy = energy.flatten().clamp(min=0)
            sides[name] = torch.diag((energy + eps * energy.mean()).sqrt())
    return sides


def plane_correlation(ckpt, stats, config: dict) -> dict:
    """Over key heads (median, min, max): the correlation between the log plane energies of the
    keys and of the queries of their group, and the share of the keys' energy in their 4 largest
    planes."""
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    found, top4 = [], []
    for q in [n for n in stats.grams if n.endswith("self_attn.q_proj.weight")]:
        gram = stats.grams[q].double()
        wq, wk = ckpt.get(q).double(), ckpt.get(q.replace("q_proj", "k_proj")).double()
        keys = plane_energy(wk @ gram @ wk.T, kv_heads)
        queries = plane_energy(wq @ gram @ wq.T, heads).reshape(kv_heads, heads // kv_heads, -1)
        found += [float(torch.corrcoef(torch.stack([k.log(), q.log()]))[0, 1])
                  for k, q in zip(keys, queries.sum(1))]
        planes = keys[:, :keys.shape[1] // 2]
        top4 += (planes.topk(4, dim=1).values.sum(1) / planes.sum(1)).tolist()

    def spread(values):
        values = torch.tensor(values)
        return {"median": round(float(values.median()), 3), "min": round(float(values.min()), 3),
                "max": round(float(values.max()), 3)}
    return {"log_energy_correlation": spread(found), "key_top4_plane_share": spread(top4),
            "key_heads": len(found)}


def main():
    from transformers import AutoTokenizer

    import lowrank
    from lowrank.models import load_dense
    from lowrank.pipeline.runner import run_pipeline
    from lowrank.pipeline.spec import compress_spec
    from lowrank.stages import factorize
    from lowrank.weighting import Weighting

    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="*", help="none | keys,EPS | keys-centered,EPS")
    ap.add_argument("--planes", action="store_true", help="only the plane-energy correlation")
    ap.add_argument("--ratio", type=float, default=0.85)
    ap.add_argument("--model", default="/root/.cache/smollm2-135m")
    ap.add_argument("--cache-dir", help="stage cache (default: a temporary one)")
    args = ap.parse_args()
    config = json.loads((Path(args.model) / "config.json").read_text())
    if args.planes:
        from lowrank.io.checkpoint import open_checkpoint
        from lowrank.stages.calibrate import CalibrateSettings, calibrate

        with tempfile.TemporaryDirectory() as tmp:
            text = Path(tmp) / "debian.txt"
            text.write_text("\n".join(lines_of(*CALIBRATION)) + "\n")
            ckpt = open_checkpoint(args.model)
            stats = calibrate(ckpt, CalibrateSettings(calibration_file=str(text)))
            print(json.dumps({"planes": plane_correlation(ckpt, stats, config)}))
        return
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dense = load_dense(args.model).eval()
    evaluation = evaluation_texts()
    compensated = factorize.compensated_factors
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache_dir or Path(tmp) / "cache")
        calibration = Path(tmp) / "debian.txt"
        calibration.write_text("\n".join(lines_of(*CALIBRATION)) + "\n")
        means = None
        for variant in args.variants:
            kind, _, eps = variant.partition(",")
            if kind == "keys-centered" and means is None:
                means = input_means(args.model, tokenizer)

            def weighted(models, ranks, stats, factor, *rest, kind=kind, eps=eps,
                         centered=means if kind == "keys-centered" else None, **kw):
                sides = {} if kind == "none" else output_sides(
                    models.checkpoint, stats, config, float(eps), centered)

                def factor_two_sided(name, weighting, matrix=None):
                    if name in sides and weighting is not None and weighting.kind == "whiten":
                        weighting = Weighting("kfac", weighting.factor, sides[name])
                    return factor(name, weighting, matrix)
                return compensated(models, ranks, stats, factor_two_sided, *rest, **kw)
            factorize.compensated_factors = weighted
            for entry in cache.glob("*"):  # factorize and later stages run again
                if entry.name not in SHARED_STAGES:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            spec = compress_spec(plan={"param_ratio": args.ratio},
                                 calibration_file=str(calibration))
            out = Path(tmp) / "out"
            run_pipeline(spec, args.model, out, cache_dir=cache, overwrite=True)
            row = {"ratio": args.ratio, "variant": variant}
            row.update(rounded_scores(lowrank.load(out).eval(), dense, tokenizer, evaluation))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
