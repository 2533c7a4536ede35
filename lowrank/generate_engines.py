"""The engines :mod:`lowrank.generate` steps: an ONNX decoder with its KV cache on onnxruntime
(Optimum's ``text-generation-with-past`` layout, :mod:`lowrank.stages.export_decoder`) and a
PyTorch causal LM with transformers' ``DynamicCache``, both batched.

An engine has ``start(prompts)`` (token id lists; returns the next-token logits, batch × vocab)
and ``step(tokens)`` (one new token per row; the same). Prompts of different lengths are padded
on the left, with ``attention_mask`` 0 there and ``position_ids`` counted from each row's first
real token (transformers' convention: cumsum of the mask − 1, 1 on padding), so a row's
logits do not depend on the batch it is in.

ONNX decoder inputs: ``input_ids``, ``attention_mask`` (past + new tokens), ``position_ids``,
``past_key_values.N.key``/``.value`` (batch, kv heads, past length, head dim; length 0 on the
first step); outputs ``logits`` then ``present.N.key``/``.value`` in the same order.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np

from .errors import InputError

PAST = "past_key_values."
PAD = 0  # the id written in padding: any id, since the mask hides it


def is_decoder_session(session) -> bool:
    """Does this onnxruntime session take a KV cache?"""
    return any(i.name.startswith(PAST) for i in session.get_inputs())


def cache_feeds(session, batch: int, past: int, rng=None) -> dict:
    """The cache inputs of ``session`` for ``past`` earlier tokens, shaped from the session's own
    input shapes (kv heads and head dim are fixed numbers there): zeros, or standard normal
    values from ``rng`` (latency runs, where only the shapes matter)."""
    out = {}
    for inp in session.get_inputs():
        if inp.name.startswith(PAST):
            shape = [batch, inp.shape[1], past, inp.shape[3]]
            out[inp.name] = (np.zeros(shape, np.float32) if rng is None
                             else rng.standard_normal(shape).astype(np.float32))
    return out


def step_feeds(ids: np.ndarray, past: int) -> dict:
    """Mask and positions for ``ids`` (batch, new tokens) after ``past`` cached tokens."""
    batch, seq = ids.shape
    return {"input_ids": ids.astype(np.int64),
            "attention_mask": np.ones((batch, past + seq), np.int64),
            "position_ids": np.broadcast_to(np.arange(past, past + seq, dtype=np.int64),
                                            (batch, seq)).copy()}


def pad(prompts: list[list[int]], left: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention_mask), int64 (batch, longest prompt), padded on the left or right."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("every prompt needs at least one token")
    width = max(map(len, prompts))
    ids = np.full((len(prompts), width), PAD, np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for row, prompt in enumerate(prompts):
        cols = slice(width - len(prompt), width) if left else slice(0, len(prompt))
        ids[row, cols], mask[row, cols] = prompt, 1
    return ids, mask


def positions(mask: np.ndarray) -> np.ndarray:
    """transformers' position ids of a left-padded batch: 0 at each row's first real token."""
    pos = mask.cumsum(-1) - 1
    pos[mask == 0] = 1
    return pos


class _Batch:
    """The bookkeeping both decoder engines share: the mask so far, each row's next position."""

    def _begin(self, prompts):
        ids, self.mask = pad(prompts)
        pos = positions(self.mask)
        self.next = pos[:, -1] + 1
        return ids, pos

    def _advance(self, tokens) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(tokens, np.int64).reshape(-1, 1)
        self.mask = np.concatenate([self.mask, np.ones_like(ids)], 1)
        pos, self.next = self.next[:, None].copy(), self.next + 1
        return ids, pos


class OnnxLM(_Batch):
    """An ONNX decoder with its cache (see the module's docstring)."""

    def __init__(self, session):
        self.session = session
        self.past_names = [i.name for i in session.get_inputs() if i.name.startswith(PAST)]
        self.output_names = [o.name for o in session.get_outputs()]

    def start(self, prompts: list[list[int]]) -> np.ndarray:
        ids, pos = self._begin(prompts)
        return self._run(ids, pos, cache_feeds(self.session, len(prompts), 0))

    def step(self, tokens) -> np.ndarray:
        return self._run(*self._advance(tokens), self.cache)

    def _run(self, ids, pos, cache) -> np.ndarray:
        feed = {"input_ids": ids, "attention_mask": self.mask, "position_ids": pos, **cache}
        named = dict(zip(self.output_names, self.session.run(None, feed)))
        # present.N.* of this step is past_key_values.N.* of the next
        self.cache = {n: named["present." + n.removeprefix(PAST)] for n in self.past_names}
        return named["logits"][:, -1].astype(np.float32)


class TorchLM(_Batch):
    """A PyTorch causal LM with transformers' DynamicCache, stepped like :class:`OnnxLM`."""

    def __init__(self, model):
        self.model, self.argument = model.eval(), cache_argument(model)

    def start(self, prompts: list[list[int]]) -> np.ndarray:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        return self._run(*self._begin(prompts))

    def step(self, tokens) -> np.ndarray:
        return self._run(*self._advance(tokens))

    def _run(self, ids, pos) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=torch.from_numpy(ids),
                             attention_mask=torch.from_numpy(self.mask),
                             position_ids=torch.from_numpy(pos),
                             **{self.argument: self.cache}, use_cache=True)
        self.cache = returned_cache(out)
        return out.logits[:, -1].float().numpy()


def cache_argument(model) -> str | None:
    """The keyword a transformers model takes its cache by: ``cache`` (transformers ≥ 5.2x,
    where ``past_key_values`` is a deprecated alias) or ``past_key_values``; None: no cache."""
    params = inspect.signature(model.forward).parameters
    return next((n for n in ("cache", "past_key_values") if n in params), None)


def returned_cache(output):
    """The cache a forward call returned, under either name."""
    cache = output.get("cache") if hasattr(output, "get") else None
    return cache if cache is not None else output.past_key_values


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def onnx_session(path: str | Path, threads: int = 0):
    """A CPU session of the graph as written (no optimizer rewrites), like export validation."""
    from .backends import require

    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
