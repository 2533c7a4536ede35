"""Token generation with a KV cache, one loop over two engines: an ONNX decoder on onnxruntime
(Optimum's ``text-generation-with-past`` layout, :mod:`lowrank.stages.export_decoder`) and a
PyTorch causal LM with transformers' ``DynamicCache``. The same loop over both is what makes
"ONNX greedy equals PyTorch greedy" a test of the graph, not of two loops.

ONNX decoder inputs: ``input_ids``, ``attention_mask`` (past + new tokens), ``position_ids``,
``past_key_values.N.key``/``.value`` (batch, kv heads, past length, head dim; length 0 on the
first step); outputs ``logits`` then ``present.N.key``/``.value`` in the same order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PAST = "past_key_values."


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


class OnnxLM:
    """An ONNX decoder with its cache: ``step(ids)`` feeds new tokens, returns the last logits."""

    def __init__(self, session):
        self.session = session
        self.past_names = [i.name for i in session.get_inputs() if i.name.startswith(PAST)]
        self.output_names = [o.name for o in session.get_outputs()]
        self.reset()

    def reset(self) -> None:
        self.past, self.cache = 0, cache_feeds(self.session, 1, 0)

    def step(self, ids: list[int]) -> np.ndarray:
        feed = step_feeds(np.asarray([ids], np.int64), self.past)
        outputs = self.session.run(None, {**feed, **self.cache})
        named = dict(zip(self.output_names, outputs))
        # present.N.* of this step is past_key_values.N.* of the next
        self.cache = {n: named["present." + n.removeprefix(PAST)] for n in self.past_names}
        self.past += len(ids)
        return named["logits"][0, -1].astype(np.float32)


class TorchLM:
    """A PyTorch causal LM with transformers' DynamicCache, stepped like :class:`OnnxLM`."""

    def __init__(self, model):
        self.model, self.argument = model.eval(), cache_argument(model)
        self.reset()

    def reset(self) -> None:
        from transformers import DynamicCache

        self.past, self.cache = 0, DynamicCache(config=self.model.config)

    def step(self, ids: list[int]) -> np.ndarray:
        import torch

        tensors = {k: torch.from_numpy(v) for k, v in
                   step_feeds(np.asarray([ids], np.int64), self.past).items()}
        with torch.inference_mode():
            out = self.model(**tensors, **{self.argument: self.cache}, use_cache=True)
        self.cache, self.past = returned_cache(out), self.past + len(ids)
        return out.logits[0, -1].float().numpy()


def cache_argument(model) -> str | None:
    """The keyword a transformers causal LM takes its cache by: ``cache`` (transformers ≥ 5.2x,
    where ``past_key_values`` is a deprecated alias) or ``past_key_values``; None: no cache."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return next((n for n in ("cache", "past_key_values") if n in params), None)


def returned_cache(output):
    """The cache a forward call returned, under either name."""
    cache = output.get("cache") if hasattr(output, "get") else None
    return cache if cache is not None else output.past_key_values


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def generate_ids(lm, prompt: list[int], max_new_tokens: int, sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, seed: int = 0,
                 eos: int | None = None) -> list[int]:
    """New token ids after ``prompt``: greedy, or sampled (temperature, top-k) with ``seed``."""
    rng, new = np.random.default_rng(seed), []
    lm.reset()
    logits = lm.step(list(prompt))
    for _ in range(max_new_tokens):
        if sample:
            scores = logits.astype(np.float64) / max(temperature, 1e-6)
            if 0 < top_k < scores.size:
                scores[scores < np.partition(scores, -top_k)[-top_k]] = -np.inf
            probs = np.exp(log_softmax(scores))
            token = int(rng.choice(probs.size, p=probs / probs.sum()))
        else:
            token = int(logits.argmax())
        new.append(token)
        if token == eos or len(new) == max_new_tokens:
            break
        logits = lm.step([token])
    return new


def lockstep(reference, candidate, prompt: list[int], n: int, tie_tol: float) -> dict:
    """Greedy decoding of ``n`` tokens by both engines on the same token stream.

    Returns ``match_length`` (tokens equal before the first difference), and at a difference
    ``gap``: the reference's log-prob of its own pick minus that of the candidate's. A gap
    within ``tie_tol`` nats is a near tie that float32 noise may flip (``ok`` stays true; the
    continuations diverge from there, so the check ends); a larger one fails.
    """
    reference.reset(), candidate.reset()
    want, have = reference.step(list(prompt)), candidate.step(list(prompt))
    for i in range(n):
        a, b = int(want.argmax()), int(have.argmax())
        if a != b:
            lp = log_softmax(want)
            gap = float(lp[a] - lp[b])
            return {"prompt_length": len(prompt), "tokens": n, "match_length": i, "gap": gap,
                    "ok": gap <= tie_tol}
        if i + 1 < n:
            want, have = reference.step([a]), candidate.step([a])
    return {"prompt_length": len(prompt), "tokens": n, "match_length": n, "gap": 0.0, "ok": True}


def onnx_session(path: str | Path, threads: int = 0):
    """A CPU session of the graph as written (no optimizer rewrites), like export validation."""
    from .backends import require

    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def engine(model_or_path):
    """:class:`OnnxLM` for an .onnx path or session, :class:`TorchLM` for a PyTorch model."""
    if isinstance(model_or_path, (str, Path)):
        return OnnxLM(onnx_session(model_or_path))
    if hasattr(model_or_path, "get_inputs"):
        return OnnxLM(model_or_path)
    return TorchLM(model_or_path)


def generate_tokens(session_or_model, tokenizer, prompt: str, max_new_tokens: int = 32,
                    sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                    seed: int = 0) -> list[int]:
    """The new token ids after ``prompt`` (see :func:`generate`)."""
    ids = tokenizer(prompt)["input_ids"]
    return generate_ids(engine(session_or_model), ids, max_new_tokens, sample, temperature,
                        top_k, seed, tokenizer.eos_token_id)


def generate(session_or_model, tokenizer, prompt: str, max_new_tokens: int = 32,
             sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             seed: int = 0) -> str:
    """The continuation of ``prompt`` (text), from an ONNX decoder (path or session) or a
    PyTorch causal LM, through the same loop: greedy, or sampled with ``temperature``,
    ``top_k`` (0: all tokens) and ``seed``; stops at the tokenizer's EOS."""
    new = generate_tokens(session_or_model, tokenizer, prompt, max_new_tokens, sample,
                          temperature, top_k, seed)
    return tokenizer.decode(new, skip_special_tokens=True)


def decoder_fidelity(model, path: Path, tokenizer, texts: list[str],
                     new_tokens: int = 32, max_length: int = 128) -> dict:
    """How close an approximate decoder (int8) is to fp32 PyTorch on real text: top-1
    agreement of next-token predictions over the texts' tokens (no-past calls), and greedy
    match length from each text as a prompt (no failure: the numbers are the result)."""
    import torch

    session, agree, total = onnx_session(path), 0, 0
    names, feeds = {i.name for i in session.get_inputs()}, []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) < 2:
            continue
        feeds.append(ids)
        feed = {**step_feeds(np.asarray([ids]), 0), **cache_feeds(session, 1, 0)}
        got = session.run(["logits"], {k: v for k, v in feed.items() if k in names})[0][0]
        with torch.inference_mode():
            want = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        total += len(ids)
    scores = {"top1_agreement": agree / max(total, 1), "tokens": total}
    if is_decoder_session(session):  # greedy decoding needs the cache
        reference, candidate = TorchLM(model), OnnxLM(session)
        greedy = [lockstep(reference, candidate, ids[:16], new_tokens, 0.0) for ids in feeds[:5]]
        scores |= {"greedy_match_lengths": [g["match_length"] for g in greedy],
                   "greedy_tokens": new_tokens}
    return scores

