"""What a recovery step costs: recovery's training (lowrank.stages.recover.distill, a fixed
number of steps) on the default command's training-free output, calibrated and trained on
Debian lines 10000-12000, as the code is and with its two step-speed choices undone:

- ``autograd-kl``: a causal LM's logits KL through autograd's log_softmax + kl_div, instead of
  lowrank.stages.distillation.LogitsKL's one fused pass;
- ``flash-attention``: the trained passes on torch's default CPU attention kernel (flash
  attention) instead of the math kernel (lowrank.device.trained_attention);
- ``both``: both undone (what recovery did before).

    python benchmarks/recovery_step.py smollm2 [--ratio 0.7] [--steps 12] [--repeats 3]
    python benchmarks/recovery_step.py minilm

The variants alternate within each repeat; each row is one run's tokens/s (real tokens per
second of training, RecoveryLog.tokens_per_second) and its last loss. One JSON line per run,
then the median tokens/s of each variant.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
from pathlib import Path
from unittest import mock

import torch
from probe_size import MODELS, parse_with_setup
from torch import nn


def autograd_kl(student_out, teacher_out, mask, kind, pooled_weight=0.0):
    """What distillation_loss computed for logits before LogitsKL (other kinds unchanged)."""
    from lowrank.stages.distillation import distillation_loss

    if kind != "logits":
        return distillation_loss(student_out, teacher_out, mask, kind, pooled_weight)
    s, t = (x[mask].float() for x in (student_out.logits, teacher_out.logits))
    return nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True,
                                reduction="batchmean")


def patches(variant: str) -> list:
    from lowrank.stages import recover

    kl = mock.patch.object(recover, "distillation_loss", autograd_kl)
    flash = mock.patch.object(recover, "trained_attention",
                              lambda device: contextlib.nullcontext())
    return {"default": [], "autograd-kl": [kl], "flash-attention": [flash],
            "both": [kl, flash]}[variant]


VARIANTS = ("default", "autograd-kl", "flash-attention", "both")


def main():
    import lowrank
    from lowrank.pipeline.runner import run_pipeline
    from lowrank.pipeline.spec import compress_spec
    from lowrank.stages.recover import RecoverSettings, distill

    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=MODELS)
    ap.add_argument("--ratio", type=float)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args, setup = parse_with_setup(ap)
    ratio = args.ratio or MODELS[args.model]
    with setup as (model, tokenizer, dense, cache, calibration):
        out = cache / f"training-free-{ratio}"
        if not out.exists():
            run_pipeline(compress_spec(plan={"param_ratio": ratio},
                                       calibration_file=str(calibration)),
                         model, out, cache_dir=cache)
        factored = lowrank.load(out)
        lines = [t for t in Path(calibration).read_text().splitlines() if t.strip()]
        speeds = {v: [] for v in args.variants}
        for repeat in range(args.repeats):
            for variant in args.variants:
                with contextlib.ExitStack() as stack:
                    for patch in patches(variant):
                        stack.enter_context(patch)
                    log = distill(copy.deepcopy(factored), dense, tokenizer, lines,
                                  RecoverSettings(steps=args.steps))
                row = {"model": args.model, "ratio": ratio, "variant": variant,
                       "repeat": repeat, "steps": log.steps, "method": log.settings.method,
                       "pass_dtype": log.pass_dtype,
                       "tokens_per_second": log.to_json()["tokens_per_second"],
                       "last_loss": round(log.losses[-1], 4)}
                speeds[variant].append(row["tokens_per_second"])
                print(json.dumps(row), flush=True)
        print(json.dumps({"model": args.model, "ratio": ratio, "median_tokens_per_second": {
            v: statistics.median(s) for v, s in speeds.items()}}), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
