"""ONNX export of a causal LM with its KV cache, in Optimum's ``text-generation-with-past``
layout, so onnxruntime generates at one token per call instead of rerunning the whole prefix.

One merged decoder: inputs ``input_ids``, ``attention_mask`` (batch, past + new tokens),
``position_ids``, ``past_key_values.N.key``/``.value`` (batch, kv heads, past length, head dim);
outputs ``logits`` and ``present.N.key``/``.value`` (the cache after this call). The first step
feeds a past of length 0: the TorchScript exporter, traced with a non-empty past, keeps the past
axis symbolic and concatenating an empty past is exact, so no separate no-past decoder is
needed (Optimum's older split into decoder + decoder-with-past was for exporters that could not).

Validation: the encoder rule (:func:`.export.validate_onnx`) on the no-past call, then greedy
decoding with the ONNX cache against PyTorch with transformers' DynamicCache
(:func:`lowrank.generate.lockstep`) on a few prompts: token for token, a difference allowed only
at a near tie.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ValidationError
from ..generate import (
    OnnxLM,
    TorchLM,
    cache_argument,
    cache_feeds,
    is_decoder_session,
    lockstep,
    onnx_session,
    returned_cache,
)
from ..models import is_causal_lm

# Greedy check: prompts of these lengths (random token ids), this many new tokens each.
PROMPT_LENGTHS = (5, 9, 16)
NEW_TOKENS = 16


def takes_cache(model: nn.Module, inputs=None) -> bool:
    """A causal LM that takes token ids and a transformers cache (not a wrapper without one)."""
    return (inputs is None and is_causal_lm(model) and hasattr(model, "config")
            and cache_argument(model) is not None)


def cache_layout(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a transformers config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


class _WithPast(nn.Module):
    """Flat tensors in and out around a transformers cache: the exporter sees only tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.layers = model, cache_layout(model.config)[0]
        self.argument = cache_argument(model)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, **{self.argument: cache}, use_cache=True)
        layers = returned_cache(out).layers
        return (out.logits, *[t for layer in layers for t in (layer.keys, layer.values)])


def decoder_names(layers: int) -> tuple[list[str], list[str], dict]:
    """Input names, output names and dynamic axes of the Optimum layout."""
    kv = [f"{i}.{k}" for i in range(layers) for k in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids", *(f"past_key_values.{n}" for n in kv)]
    outputs = ["logits", *(f"present.{n}" for n in kv)]
    new = {0: "batch_size", 1: "sequence_length"}
    axes = {"input_ids": new, "position_ids": new, "logits": new,
            "attention_mask": {0: "batch_size", 1: "past_sequence_length + sequence_length"}}
    axes |= {n: {0: "batch_size", 2: "past_sequence_length"} for n in inputs[3:]}
    axes |= {n: {0: "batch_size", 2: "past_sequence_length + sequence_length"} for n in outputs[1:]}
    return inputs, outputs, axes


def write_decoder(model: nn.Module, path: Path, opset: int, seed: int = 0) -> tuple[list, list]:
    """Trace ``model`` with a cache into ``path``; returns (input names, output names)."""
    layers, kv_heads, head_dim = cache_layout(model.config)
    inputs, outputs, axes = decoder_names(layers)
    generator = torch.Generator().manual_seed(seed)
    batch, seq, past = 2, 3, 4  # a non-empty past, so the traced graph has the concatenation
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    positions = torch.arange(past, past + seq).expand(batch, seq)
    cache = [torch.randn(batch, kv_heads, past, head_dim, generator=generator)
             for _ in range(2 * layers)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter, not user-facing
        torch.onnx.export(_WithPast(model).eval(), (ids, mask, positions, *cache), str(path),
                          input_names=inputs, output_names=outputs, dynamic_axes=axes,
                          opset_version=opset, dynamo=False,
                          # keep initializer names, so check_factors can find every factor
                          do_constant_folding=False)
    return inputs, outputs


def no_past_feeds(session, shape) -> dict:
    """A decoder's extra inputs for a plain call on ``shape`` (batch, tokens): positions 0..
    and an empty cache; nothing for other graphs."""
    if not is_decoder_session(session):
        return {}
    positions = np.broadcast_to(np.arange(shape[1], dtype=np.int64), shape).copy()
    return {"position_ids": positions, **cache_feeds(session, shape[0], 0)}


def random_prompts(vocab: int, seed: int, lengths=PROMPT_LENGTHS) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def validate_generation(model: nn.Module, path: Path, prompts: list[list[int]],
                        new_tokens: int = NEW_TOKENS, tie_tol: float = 2e-2,
                        raise_on_failure: bool = True) -> list[dict]:
    """Greedy decoding with the ONNX decoder's cache vs PyTorch's, per prompt (token ids).

    Raises:
        ValidationError: a prompt's tokens differ beyond a near tie (``raise_on_failure``).
    """
    reference, candidate = TorchLM(model), OnnxLM(onnx_session(path))
    entries = [lockstep(reference, candidate, p, new_tokens, tie_tol) for p in prompts]
    bad = next((e for e in entries if not e["ok"]), None)
    if bad and raise_on_failure:
        raise ValidationError(
            f"{path}: greedy decoding with the ONNX cache differs from PyTorch's after "
            f"{bad['match_length']} of {new_tokens} tokens (prompt of {bad['prompt_length']} "
            f"tokens): PyTorch prefers its token by {bad['gap']:.3g} nats (> {tie_tol:g})")
    return entries
