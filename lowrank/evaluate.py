"""Fidelity of a compressed encoder to its dense original on held-out text.

Sentence embeddings are attention-mask mean-pooled last hidden states, L2-normalized (what
sentence-transformers does for all-MiniLM-L6-v2). Two numbers: the mean cosine between each
text's dense and compressed embedding, and kNN@k overlap — how many of each text's k nearest
neighbours among the evaluation texts stay the same (what a retrieval user sees).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

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
            f"knn{k}_overlap": float(overlap), "k": k, "samples": n}


def evaluate_encoder(dense: nn.Module, compressed: nn.Module, tokenizer, texts: list[str],
                     k: int = 10, batch_size: int = 32, max_length: int = 128) -> dict:
    """:func:`fidelity` of ``compressed`` to ``dense`` on ``texts``."""
    return fidelity(embed(dense, tokenizer, texts, batch_size, max_length),
                    embed(compressed, tokenizer, texts, batch_size, max_length), k)


# --------------------------------------------------------------------------------------------
# The evaluate stage: held-out text, disjoint from calibration and training text.

DEFAULT_EVALUATION = Path(__file__).parent / "data" / "evaluation.txt"


@dataclass(frozen=True)
class EvaluateSettings:
    # Held-out text, one sample per line; None = the evaluation text shipped with lowrank.
    # Lines that also occur in the calibration or recovery text are dropped (and counted).
    eval_file: str | None = None
    samples: int = 1000
    max_length: int = 128
    batch_size: int = 32
    k: int = 10  # kNN@k overlap

    def __post_init__(self):
        if min(self.samples, self.max_length, self.batch_size, self.k) < 1:
            raise InputError("evaluation samples, max_length, batch_size and k must be >= 1")


def is_causal_lm(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith("ForCausalLM") for a in archs) or type(model).__name__.endswith("ForCausalLM")


def perplexity(model: nn.Module, tokenizer, texts: list[str], batch_size: int = 32,
               max_length: int = 128) -> float:
    """exp of the mean next-token cross-entropy over real tokens."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt")
            logits = model(**batch).logits[:, :-1].float()
            labels = batch["input_ids"][:, 1:]
            mask = batch["attention_mask"][:, 1:].bool()
            losses = nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
            total += float(losses[mask].sum())
            count += int(mask.sum())
    return math.exp(total / max(count, 1))


def evaluate_model(dense: nn.Module, compressed: nn.Module, tokenizer, texts: list[str],
                   settings: EvaluateSettings = EvaluateSettings()) -> dict:
    """Encoders: :func:`fidelity` of pooled embeddings. Causal LMs: perplexity of both."""
    s = settings
    if is_causal_lm(dense):
        dense_ppl = perplexity(dense, tokenizer, texts, s.batch_size, s.max_length)
        ppl = perplexity(compressed, tokenizer, texts, s.batch_size, s.max_length)
        return {"kind": "causal-lm", "perplexity_dense": dense_ppl, "perplexity": ppl,
                "perplexity_ratio": ppl / dense_ppl, "samples": len(texts)}
    base = dense.base_model if hasattr(dense, "base_model") else dense
    cand = compressed.base_model if hasattr(compressed, "base_model") else compressed
    return {"kind": "encoder", **evaluate_encoder(base, cand, tokenizer, texts, s.k,
                                                  s.batch_size, s.max_length)}


def evaluation_texts(settings: EvaluateSettings, exclude: set[str]) -> tuple[list[str], int]:
    """Evaluation lines not in ``exclude`` (the calibration/training text): (texts, dropped)."""
    from .calibrate import read_calibration_text

    path = settings.eval_file or DEFAULT_EVALUATION
    lines = read_calibration_text(path, 10**9, warn=False)
    kept = [t for t in lines if t not in exclude]
    kept = kept[:settings.samples]
    if len(kept) <= settings.k:
        raise InputError(f"{path}: {len(kept)} evaluation lines left after dropping those in the "
                         f"calibration/training text; kNN@{settings.k} needs more than {settings.k}")
    return kept, len(lines) - len([t for t in lines if t not in exclude])


def embed_onnx(path, tokenizer, texts: list[str], batch_size: int = 32,
               max_length: int = 128) -> torch.Tensor:
    """:func:`embed` through an exported encoder on onnxruntime (fp32 or int8)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                          max_length=max_length, return_tensors="np")
        hidden = torch.from_numpy(session.run(None, {k: v for k, v in batch.items() if k in names})[0])
        mask = torch.from_numpy(batch["attention_mask"])[..., None].float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        chunks.append(nn.functional.normalize(pooled, dim=-1))
    return torch.cat(chunks)
