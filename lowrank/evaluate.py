"""Fidelity of a compressed encoder to its dense original on held-out text.

Sentence embeddings are attention-mask mean-pooled last hidden states, L2-normalized (what
sentence-transformers does for all-MiniLM-L6-v2). Two numbers: the mean cosine between each
text's dense and compressed embedding, and kNN@k overlap — how many of each text's k nearest
neighbours among the evaluation texts stay the same (what a retrieval user sees).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import InputError


def embed(model: nn.Module, tokenizer, texts: list[str], batch_size: int = 32,
          max_length: int = 128) -> torch.Tensor:
    """(N, hidden) float32 mean-pooled, L2-normalized sentence embeddings."""
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt")
            hidden = model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"][..., None].float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            chunks.append(nn.functional.normalize(pooled, dim=-1))
    return torch.cat(chunks)


def fidelity(reference: torch.Tensor, candidate: torch.Tensor, k: int = 10) -> dict:
    """Mean/min cosine of matching rows and kNN@k overlap among the rows themselves."""
    n = reference.shape[0]
    if n <= k:
        raise InputError(f"kNN@{k} needs more than {k} evaluation texts, got {n}")
    cos = nn.functional.cosine_similarity(reference, candidate, dim=-1)

    def neighbours(e):
        e = nn.functional.normalize(e, dim=-1)
        return (e @ e.T).fill_diagonal_(-float("inf")).topk(k, dim=-1).indices

    ref, cand = neighbours(reference), neighbours(candidate)
    overlap = (ref[:, :, None] == cand[:, None, :]).any(-1).float().mean()
    return {"cosine": float(cos.mean()), "cosine_min": float(cos.min()),
            f"knn{k}_overlap": float(overlap), "samples": n}


def evaluate_encoder(dense: nn.Module, compressed: nn.Module, tokenizer, texts: list[str],
                     k: int = 10, batch_size: int = 32, max_length: int = 128) -> dict:
    """:func:`fidelity` of ``compressed`` to ``dense`` on ``texts``."""
    return fidelity(embed(dense, tokenizer, texts, batch_size, max_length),
                    embed(compressed, tokenizer, texts, batch_size, max_length), k)
