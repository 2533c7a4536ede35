"""Sequential statistics: each layer's calibration inputs computed with upstream layers already
factored, so a layer's factors correct for the error that reaches it (as GPTQ and SVD-LLM do).

Layers are processed in groups in execution order: the blocks of the model's largest
``nn.ModuleList`` (the transformer layers), anything before the first block (embeddings), and
anything after the last. Each group costs one forward pass over the calibration text
(:func:`sequential_factors`, ``--sequential``).

Compensation (:mod:`lowrank.stages.compensate`, the default with calibration) goes further.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..io.samples import model_batches
from ..models import Models
from ..naming import module_name
from ..nn.swap import blocks_prefix, swap_lowrank_
from .calibrate import ActivationStats, collect_stats, seq2seq_inputs
from .calibration_text import calibration_data


def execution_groups(model: nn.Module, inputs: dict, names: list[str]) -> list[list[str]]:
    """Weight names grouped by block and sorted by when their module first runs."""
    order: dict[str, int] = {}
    handles = []

    def first_call(name):
        def hook(module, args):  # returns None: the inputs pass unchanged
            order.setdefault(name, len(order))
        return hook

    for name in names:
        module = model.get_submodule(module_name(name))
        handles.append(module.register_forward_pre_hook(first_call(name)))
    try:
        with torch.inference_mode():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    prefix = blocks_prefix(model)

    def group_of(name: str) -> str:
        if prefix and name.startswith(prefix + "."):
            return prefix + "." + name[len(prefix) + 1:].split(".")[0]
        return name  # outside the blocks: a group of its own

    groups: dict[str, list[str]] = {}
    never = len(order)  # modules that did not run go last, in name order
    for name in sorted(names, key=lambda n: (order.get(n, never), n)):
        groups.setdefault(group_of(name), []).append(name)
    return list(groups.values())


def input_features(models: Models, stats: ActivationStats, name: str) -> int:
    """The number of input features of weight ``name``: its Gram's size."""
    info = models.checkpoint.info(name)
    # a Conv1D weight is stored (in, out): its inputs have shape[0] features
    return info.shape[0] if name in stats.transposed else math.prod(info.shape[1:])


def sequential_factors(models: Models, ranks: dict[str, int], stats: ActivationStats,
                       factor: Callable) -> dict:
    """Factor the weights in ``ranks`` group by group, recollecting statistics before each group
    on the partly factored model. ``factor(name, weighting) -> (A, B, result)`` does one layer;
    returns {name: (A, B, result)}."""
    model, tokenizer, data = calibration_data(models, stats.settings, warn=False,
                                              sampled=stats.sampled_lines)
    first_batch, mask = next(model_batches(data, tokenizer, 1, stats.settings.max_length))
    first_batch = seq2seq_inputs(model, first_batch, mask)
    results = {}
    for i, group in enumerate(execution_groups(model, first_batch, list(ranks))):
        # The first group sees the dense model's inputs: the statistics we already have.
        current = stats if i == 0 else collect_stats(model, tokenizer, data, stats.settings,
                                                     only=set(group))
        for name in group:
            features = input_features(models, stats, name)
            A, B, result = factor(name, current.weighting(name, features))
            fqn = module_name(name)
            swap_lowrank_(model, {fqn: A.shape[1]}, {fqn: (A, B)},
                          {fqn: result.split} if result.split else None)
            results[name] = (A, B, result)
    return results
