"""Fidelity of a compressed encoder to its dense original on held-out text.

Sentence embeddings are attention-mask mean-pooled last hidden states, L2-normalized (what
sentence-transformers does for all-MiniLM-L6-v2). Two numbers: the mean cosine between each
text's dense and compressed embedding, and kNN@k overlap — how many of each text's k nearest
neighbours among the evaluation texts stay the same (what a retrieval user sees).

Models that take tensors (``--model-factory``, vision or sequence classifiers) are evaluated on
a .safetensors/.pt file of inputs (samples on dim 0): agreement of the outputs and, when the
file holds a ``labels`` tensor (one class index per sample; negative = ignore), the accuracy
of the dense and the compressed model (:func:`evaluate_tensors`).
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


# --------------------------------------------------------------------------------------------
# Tensor inputs: outputs compared directly; accuracy when the file carries labels.


def output_tensor(out) -> torch.Tensor:
    """The main tensor of a model's output: the tensor itself, ``logits``, ``last_hidden_state``,
    or the first element of a tuple (an LSTM's ``(output, state)``)."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "last_hidden_state"):
        value = out.get(name) if isinstance(out, dict) else getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out:
        return output_tensor(out[0])
    if isinstance(out, dict) and out:
        return output_tensor(next(iter(out.values())))
    raise InputError(f"cannot find the output tensor of a {type(out).__name__}")


def predict(model: nn.Module, data: dict[str, torch.Tensor], batch_size: int = 32) -> torch.Tensor:
    """The model's output tensors on ``data`` (labels left out), concatenated, float32."""
    from .calibrate import model_batches

    with torch.inference_mode():
        return torch.cat([output_tensor(model(**inputs)).float()
                          for inputs, _ in model_batches(data, None, batch_size, 0)])


def compare_outputs(reference: torch.Tensor, candidate: torch.Tensor,
                    labels: torch.Tensor | None = None) -> dict:
    """Per-sample cosine and relative error of the outputs, top-1 agreement over the last
    dimension, and with ``labels`` the accuracy of both (entries < 0 ignored)."""
    ref, cand = reference.flatten(1).double(), candidate.flatten(1).double()
    cos = nn.functional.cosine_similarity(ref, cand, dim=-1)
    scores = {"kind": "classifier" if labels is not None else "outputs",
              "samples": reference.shape[0],
              "output_cosine": float(cos.mean()), "output_cosine_min": float(cos.min()),
              "output_rel_error": float((cand - ref).norm() / ref.norm().clamp(min=1e-30))}
    if reference.dim() >= 2:
        top_ref, top_cand = reference.argmax(-1), candidate.argmax(-1)
        scores["top1_agreement"] = float((top_ref == top_cand).double().mean())
        if labels is not None:
            if labels.shape != top_ref.shape:
                raise InputError(f"labels of shape {list(labels.shape)} do not match the "
                                 f"model's predictions {list(top_ref.shape)}")
            keep = labels >= 0
            scores["accuracy_dense"] = float((top_ref[keep] == labels[keep]).double().mean())
            scores["accuracy"] = float((top_cand[keep] == labels[keep]).double().mean())
            scores["accuracy_drop"] = scores["accuracy_dense"] - scores["accuracy"]
    elif labels is not None:
        raise InputError("labels need a model output with a class dimension")
    return scores


def evaluate_tensors(dense: nn.Module, compressed: nn.Module, data: dict[str, torch.Tensor],
                     batch_size: int = 32) -> dict:
    """:func:`compare_outputs` of ``compressed`` to ``dense`` on tensor inputs ``data`` (its
    ``labels`` entry, if any, scored as accuracy)."""
    from .calibrate import LABELS

    labels = data.get(LABELS)
    return compare_outputs(predict(dense, data, batch_size), predict(compressed, data, batch_size),
                           labels.long() if labels is not None else None)


def sample_digests(data: dict[str, torch.Tensor]) -> list[str]:
    """One content hash per sample over the model inputs (labels left out)."""
    import hashlib

    from .calibrate import LABELS, num_samples

    keys = sorted(k for k in data if k != LABELS)
    digests = []
    for i in range(num_samples(data)):
        h = hashlib.sha256()
        for k in keys:
            h.update(data[k][i].contiguous().flatten().view(torch.uint8).numpy().tobytes())
        digests.append(h.hexdigest())
    return digests


def evaluation_tensors(settings: EvaluateSettings, seen: list[dict]) -> tuple[dict, int]:
    """The evaluation file's samples that are not in ``seen`` (calibration/training tensors):
    (data, dropped), like :func:`evaluation_texts` for text."""
    from .calibrate import read_calibration_tensors

    data = read_calibration_tensors(settings.eval_file, settings.samples, warn=False)
    exclude = {d for other in seen for d in sample_digests(other)}
    keep = torch.tensor([d not in exclude for d in sample_digests(data)])
    if not keep.any():
        raise InputError(f"{settings.eval_file}: every evaluation sample is also in the "
                         f"calibration/training data; give held-out samples")
    return {k: v[keep] for k, v in data.items()}, int((~keep).sum())


def describe_tensor_scores(f: dict) -> str:
    """One line for :func:`evaluate_tensors`' result (report.md and the CLI summary)."""
    parts = []
    if "accuracy" in f:
        parts.append(f"accuracy {f['accuracy_dense']:.4f} -> {f['accuracy']:.4f} (dense -> "
                     f"compressed)")
    if "top1_agreement" in f:
        parts.append(f"top-1 agreement {f['top1_agreement']:.4f}")
    parts.append(f"output cosine {f['output_cosine']:.4f}")
    return ", ".join(parts) + f" on {f['samples']} held-out samples"
