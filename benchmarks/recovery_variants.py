"""Variants of recovery measured against its defaults: the default command with `--recover
METHOD` otherwise (default factors, what `auto` trains for an encoder), calibrated and trained on
Debian lines 10000-12000, scored like probe_size.py on python_docs paragraphs (another source)
and held-out Debian lines (the training text's source).

    python benchmarks/recovery_variants.py minilm default vocabulary-draws student-dropout \\
        last-layer-loss pooled:0.3 pooled:1 [--steps 600] [--method factors] [--seeds 0]

Variants (the product has the first three only as these patches, which no row outlives):
- vocabulary-draws: token replacement draws from every ordinary token of the tokenizer (not
  special, not BERT's [unused*]) instead of the batch: tokens the training text never has;
- student-dropout: the student in training mode (dropout on) whenever gradients are on, its
  training steps (recovery runs it in eval mode);
- last-layer-loss: an encoder's loss on the last hidden states only, not the mean over layers;
- pooled:W: RecoverSettings.pooled_weight W (plus W × (1 − cosine) of the mean-pooled last
  hidden states; default 0);
- default: none of these.

--steps (default 600) trains a fixed number of steps, so rows differ by the variant alone, not by
how fast the machine ran. One JSON line per seed and variant; the stages before recovery come
from a stage cache that every row shares, recovery runs again for each row.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import types
from unittest import mock

import torch
from probe_size import MODELS, parse_with_setup, recovery_row

from lowrank.stages import recover
from lowrank.stages.recover import METHODS


def vocabulary_draws(tokenizer):
    """A replace_tokens that draws from every ordinary token of ``tokenizer``."""
    special = set(tokenizer.all_special_ids)
    pool = torch.tensor(sorted(i for token, i in tokenizer.get_vocab().items()
                               if i not in special and not token.startswith("[unused")))

    def replace_tokens(inputs, mask, share, keep, generator):
        ids = inputs.get("input_ids")
        if not share or ids is None or mask is None:
            return inputs
        hit = mask & ~torch.isin(ids, keep) & (torch.rand(ids.shape, generator=generator) < share)
        drawn = pool[torch.randint(len(pool), (int(hit.sum()),), generator=generator)]
        return {**inputs, "input_ids": ids.masked_scatter(hit, drawn)}

    return mock.patch.object(recover, "replace_tokens", replace_tokens)


def student_dropout():
    """An add_adapters_ that also puts the student in training mode whenever gradients are on."""
    attach = recover.add_adapters_

    def dropout_while_training(module, _args):
        module.train(torch.is_grad_enabled())

    def add_adapters_(model, settings):
        trainable = attach(model, settings)
        model.register_forward_pre_hook(dropout_while_training)
        return trainable

    return mock.patch.object(recover, "add_adapters_", add_adapters_)


def last_layer_loss():
    """A distillation_loss that compares an encoder's last hidden states only."""
    loss = recover.distillation_loss

    def distillation_loss(student_out, teacher_out, mask, kind, pooled_weight=0.0):
        if kind == "hidden":
            student_out = types.SimpleNamespace(hidden_states=student_out.hidden_states[-1:])
            teacher_out = types.SimpleNamespace(hidden_states=teacher_out.hidden_states[-1:])
        return loss(student_out, teacher_out, mask, kind, pooled_weight)

    return mock.patch.object(recover, "distillation_loss", distillation_loss)


# {variant: its patch, given the tokenizer}
PATCHES = {"vocabulary-draws": vocabulary_draws,
           "student-dropout": lambda _: student_dropout(),
           "last-layer-loss": lambda _: last_layer_loss()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=MODELS)
    ap.add_argument("variants", nargs="+", help=f"default, {', '.join(PATCHES)} or pooled:W")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--method", default="factors", choices=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    args, context = parse_with_setup(ap)
    for variant in args.variants:
        weight = variant.partition("pooled:")[2]
        if variant not in ("default", *PATCHES) and not weight.replace(".", "", 1).isdigit():
            ap.error(f"unknown variant {variant!r}")
    with context as setup:
        for seed in args.seeds:
            for variant in args.variants:
                settings = {"seed": seed, "steps": args.steps}
                if variant.startswith("pooled:"):
                    settings["pooled_weight"] = float(variant.split(":", 1)[1])
                row = {"model": args.model, "method": args.method, "variant": variant,
                       "seed": seed, "steps": args.steps}
                patch = PATCHES.get(variant, lambda _: contextlib.nullcontext())
                with patch(setup[1]):
                    row.update(recovery_row(args.model, setup, args.method, settings))
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
