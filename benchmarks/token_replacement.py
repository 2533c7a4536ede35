"""Token replacement in recovery (RecoverSettings.replace_share: each step, that share of the
batch's real tokens replaced by tokens of the same batch, for teacher and student alike): the
default command with `--recover lora` (3 minutes) otherwise, calibrated and trained on Debian
lines 10000-12000, scored like probe_size.py on python_docs paragraphs (another source) and
held-out Debian lines (the training text's source). The options after --method measure other
ways of widening or regularizing the training (reports/token-replacement.md,
reports/recovery-method.md).

    python benchmarks/token_replacement.py minilm 0 0.15 0.3 0.5 [--seeds 0 1] [--steps N]
        [--method auto|lora|orthogonal|factors]   (default lora: the rows of the report)
        [--draw batch|vocabulary] [--pooled-weight W] [--student-dropout]
    python benchmarks/token_replacement.py smollm2 0 0.15 [--cache-dir DIR]

--steps trains a fixed number of steps instead of 3 minutes: rows then differ by the share and
the seed alone, not by how fast the machine ran. --draw vocabulary draws the replacements from
every ordinary token of the tokenizer instead of the batch (patched in here; the product draws
from the batch). --pooled-weight sets RecoverSettings.pooled_weight (an encoder's loss plus W ×
(1 − cosine) of the mean-pooled last hidden states; default 0). --student-dropout turns the
student's dropout on in its training steps (patched in here; recovery runs it in eval mode).

One JSON line per seed and share, with recovery's steps. The stages before recovery come from a
stage cache that every row shares; recovery itself runs again for each row.
"""

from __future__ import annotations

import argparse
import json

import torch
from probe_size import MODELS, parse_with_setup, recovery_row

from lowrank.stages.recover import METHODS


def draw_from_vocabulary(tokenizer) -> None:
    """Recovery's token replacement patched to draw from every ordinary token of ``tokenizer``
    (not special, not BERT's [unused*]) rather than from the batch: whether tokens the training
    text never has help on another source's text."""
    from lowrank.stages import recover

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

    recover.replace_tokens = replace_tokens


def student_dropout() -> None:
    """Recovery patched so that the student runs in training mode (dropout on) whenever
    gradients are on: its training steps, not the held-back batch's measurements."""
    from lowrank.stages import recover

    attach = recover.add_adapters_

    def dropout_while_training(module, _args):
        module.train(torch.is_grad_enabled())

    def add_adapters_(model, settings):
        trainable = attach(model, settings)
        model.register_forward_pre_hook(dropout_while_training)
        return trainable

    recover.add_adapters_ = add_adapters_


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=MODELS)
    ap.add_argument("shares", nargs="+", type=float)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--steps", type=int)
    ap.add_argument("--method", default="lora", choices=METHODS)
    ap.add_argument("--draw", default="batch", choices=("batch", "vocabulary"))
    ap.add_argument("--pooled-weight", type=float, default=0.0)
    ap.add_argument("--student-dropout", action="store_true")
    args, context = parse_with_setup(ap)
    with context as setup:
        if args.draw == "vocabulary":
            draw_from_vocabulary(setup[1])
        if args.student_dropout:
            student_dropout()
        for seed in args.seeds:
            for share in args.shares:
                row = {"model": args.model, "method": args.method, "replace_share": share,
                       "draw": args.draw, "pooled_weight": args.pooled_weight,
                       "student_dropout": args.student_dropout, "seed": seed, "steps": args.steps}
                row.update(recovery_row(args.model, setup, args.method, {
                    "replace_share": share, "seed": seed, "steps": args.steps,
                    "pooled_weight": args.pooled_weight}))
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
