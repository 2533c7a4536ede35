"""Token generation with a KV cache, one loop over every engine: an ONNX decoder on onnxruntime
(Optimum's ``text-generation-with-past`` layout) and a PyTorch causal LM
(:mod:`lowrank.generate_engines`), an ONNX encoder + merged decoder and a PyTorch encoder-decoder
model (:mod:`lowrank.generate_seq2seq`). The same loop over all is what makes "ONNX greedy equals
PyTorch greedy" a test of the graph, not of two loops.

Several prompts run as one batch (:func:`generate_batch`): padded (see the engines), each row
stopping at EOS on its own while the others go on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .generate_engines import (  # noqa: F401  (this module's API too)
    PAST,
    OnnxLM,
    TorchLM,
    cache_argument,
    cache_feeds,
    is_decoder_session,
    log_softmax,
    onnx_session,
    returned_cache,
    step_feeds,
)
from .generate_seq2seq import OnnxSeq2Seq, TorchSeq2Seq, seq2seq_files


def _pick(logits: np.ndarray, sample: bool, temperature: float, top_k: int, rng) -> np.ndarray:
    """One token per row of ``logits`` (batch, vocab): argmax, or sampled."""
    if not sample:
        return logits.argmax(-1)
    scores = logits.astype(np.float64) / max(temperature, 1e-6)
    if 0 < top_k < scores.shape[-1]:
        kth = np.partition(scores, -top_k, -1)[:, -top_k:].min(-1, keepdims=True)
        scores[scores < kth] = -np.inf
    probs = np.exp(log_softmax(scores))
    return np.array([rng.choice(p.size, p=p / p.sum()) for p in probs])


def generate_batch(lm, prompts: list[list[int]], max_new_tokens: int, sample: bool = False,
                   temperature: float = 1.0, top_k: int = 0, seed: int = 0,
                   eos: int | None = None) -> list[list[int]]:
    """New token ids after each prompt, all prompts as one batch: greedy, or sampled
    (temperature, top-k) with ``seed``. A row that emits ``eos`` stops there (its EOS kept);
    the batch stops when every row has, or after ``max_new_tokens``."""
    rng = np.random.default_rng(seed)
    new: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    logits = lm.start([list(p) for p in prompts])
    for i in range(max_new_tokens):
        tokens = _pick(logits, sample, temperature, top_k, rng)
        for row in np.flatnonzero(~done):
            new[row].append(int(tokens[row]))
        done |= tokens == eos if eos is not None else False
        if done.all() or i + 1 == max_new_tokens:
            break
        tokens[done] = eos if eos is not None else 0  # finished rows idle on EOS
        logits = lm.step(tokens)
    return new


def generate_ids(lm, prompt: list[int], max_new_tokens: int, sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, seed: int = 0,
                 eos: int | None = None) -> list[int]:
    """New token ids after one ``prompt`` (see :func:`generate_batch`)."""
    return generate_batch(lm, [prompt], max_new_tokens, sample, temperature, top_k, seed, eos)[0]


def lockstep(reference, candidate, prompt: list[int], n: int, tie_tol: float) -> dict:
    """Greedy decoding of ``n`` tokens by both engines on the same token stream.

    Returns ``match_length`` (tokens equal before the first difference), and at a difference
    ``gap``: the reference's log-prob of its own pick minus that of the candidate's. A gap
    within ``tie_tol`` nats is a near tie that float32 noise may flip (``ok`` stays true; the
    continuations diverge from there, so the check ends); a larger one fails.
    """
    want, have = reference.start([list(prompt)])[0], candidate.start([list(prompt)])[0]
    for i in range(n):
        a, b = int(want.argmax()), int(have.argmax())
        if a != b:
            lp = log_softmax(want)
            gap = float(lp[a] - lp[b])
            return {"prompt_length": len(prompt), "tokens": n, "match_length": i, "gap": gap,
                    "ok": gap <= tie_tol}
        if i + 1 < n:
            want, have = reference.step([a])[0], candidate.step([a])[0]
    return {"prompt_length": len(prompt), "tokens": n, "match_length": n, "gap": 0.0, "ok": True}


def engine(model_or_path):
    """The engine of an ONNX export (a decoder file, or an encoder-decoder export's directory or
    either of its files), an onnxruntime session, or a PyTorch model."""
    if isinstance(model_or_path, (str, Path)):
        files = seq2seq_files(model_or_path)
        if files:
            return OnnxSeq2Seq(*map(onnx_session, files))
        return OnnxLM(onnx_session(model_or_path))
    if hasattr(model_or_path, "get_inputs"):
        return OnnxLM(model_or_path)
    if getattr(getattr(model_or_path, "config", None), "is_encoder_decoder", False):
        return TorchSeq2Seq(model_or_path)
    return TorchLM(model_or_path)


def generate_tokens(session_or_model, tokenizer, prompt: str | list[str],
                    max_new_tokens: int = 32, sample: bool = False, temperature: float = 1.0,
                    top_k: int = 0, seed: int = 0):
    """The new token ids after ``prompt`` (a list of them for a list of prompts, run as one
    batch; see :func:`generate`)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    lm = session_or_model if hasattr(session_or_model, "start") else engine(session_or_model)
    eos = getattr(lm, "eos_id", None)
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    new = generate_batch(lm, ids, max_new_tokens, sample, temperature, top_k, seed,
                         tokenizer.eos_token_id if eos is None else eos)
    return new[0] if isinstance(prompt, str) else new


def generate(session_or_model, tokenizer, prompt: str | list[str], max_new_tokens: int = 32,
             sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             seed: int = 0) -> str | list[str]:
    """The continuation of ``prompt`` (text; a list of them, generated as one batch, for a list),
    from an ONNX export (path, session or engine) or a PyTorch model, through the same loop:
    greedy, or sampled with ``temperature``, ``top_k`` (0: all tokens) and ``seed``; each row
    stops at EOS."""
    new = generate_tokens(session_or_model, tokenizer, prompt, max_new_tokens, sample,
                          temperature, top_k, seed)
    if isinstance(prompt, str):
        return tokenizer.decode(new, skip_special_tokens=True)
    return [tokenizer.decode(n, skip_special_tokens=True) for n in new]


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

