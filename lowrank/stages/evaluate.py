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

from ..backends import require
from ..errors import InputError
from ..generate import decoder_fidelity
from ..io.samples import (
    DEFAULT_EVALUATION,
    LABELS,
    is_tensor_file,
    model_batches,
    num_samples,
    read_calibration,
    read_calibration_tensors,
    read_calibration_text,
)
from ..models import Models, is_causal_lm, is_seq2seq, output_tensor
from ..pipeline.stage import Context, Stage, json_loader, json_saver, register_stage
from .calibrate import seq2seq_inputs
from .factored import LowRankCheckpoint


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


def perplexity(model: nn.Module, tokenizer, texts: list[str], batch_size: int = 32,
               max_length: int = 128) -> float:
    """exp of the mean next-token cross-entropy over real tokens. An encoder-decoder model
    (T5, BART) is scored teacher-forced with each text as its own target
    (:func:`~lowrank.stages.calibrate.seq2seq_inputs`): its logits at i predict token i."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt")
            if is_seq2seq(model):
                mask = batch["attention_mask"].bool()
                logits = model(**seq2seq_inputs(model, dict(batch), mask)).logits.float()
                labels = batch["input_ids"]
            else:
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
    if is_causal_lm(dense) or is_seq2seq(dense):
        dense_ppl = perplexity(dense, tokenizer, texts, s.batch_size, s.max_length)
        ppl = perplexity(compressed, tokenizer, texts, s.batch_size, s.max_length)
        kind = "seq2seq" if is_seq2seq(dense) else "causal-lm"
        return {"kind": kind, "perplexity_dense": dense_ppl, "perplexity": ppl,
                "perplexity_ratio": ppl / dense_ppl, "samples": len(texts)}
    base = dense.base_model if hasattr(dense, "base_model") else dense
    cand = compressed.base_model if hasattr(compressed, "base_model") else compressed
    return {"kind": "encoder", **evaluate_encoder(base, cand, tokenizer, texts, s.k,
                                                  s.batch_size, s.max_length)}


def evaluation_texts(settings: EvaluateSettings, exclude: set[str]) -> tuple[list[str], int]:
    """Evaluation lines not in ``exclude`` (the calibration/training text): (texts, dropped)."""
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
    ort = require("onnxruntime")

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


def predict(model: nn.Module, data: dict[str, torch.Tensor], batch_size: int = 32) -> torch.Tensor:
    """The model's output tensors on ``data`` (labels left out), concatenated, float32."""
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
    labels = data.get(LABELS)
    return compare_outputs(predict(dense, data, batch_size), predict(compressed, data, batch_size),
                           labels.long() if labels is not None else None)


def sample_digests(data: dict[str, torch.Tensor]) -> list[str]:
    """One content hash per sample over the model inputs (labels left out)."""
    import hashlib

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


def seen_samples(*sources: tuple[str | None, int]) -> list:
    """The samples of (file, samples) pairs a model was calibrated or trained on: text lines,
    or tensor dicts; evaluation drops them."""
    return [read_calibration(path, samples, warn=False) for path, samples in sources]


def evaluate(models: Models, compressed: LowRankCheckpoint,
             settings: EvaluateSettings = EvaluateSettings(), seen: list | None = None,
             int8_model: Path | None = None, on_step=None) -> dict:
    """Compare the ``compressed`` checkpoint with the dense model of ``models`` on held-out
    samples (``settings.eval_file``, else the bundled evaluation text); samples in ``seen``
    (:func:`seen_samples`) are dropped and counted. An encoder's ONNX ``int8_model`` is scored
    too."""
    seen = seen or []
    on_step = on_step or (lambda name: None)
    if is_tensor_file(settings.eval_file):
        data, dropped = evaluation_tensors(settings, [s for s in seen if isinstance(s, dict)])
        dense, _ = models.runnable_model(need_tokenizer=False)
        model = models.compressed(compressed.tensors, compressed.layers)
        scores = evaluate_tensors(dense, model, data, settings.batch_size)
        on_step("pytorch")
        return {**scores, "eval_file": settings.eval_file, "dropped_overlapping_samples": dropped}
    dense, tokenizer = models.runnable_model()
    model = models.compressed(compressed.tensors, compressed.layers)
    texts, dropped = evaluation_texts(settings, {t for s in seen if isinstance(s, list) for t in s})
    scores = evaluate_model(dense, model, tokenizer, texts, settings)
    on_step("pytorch")
    if int8_model is not None and scores["kind"] == "encoder":
        reference = embed(dense, tokenizer, texts, settings.batch_size, settings.max_length)
        quantized = embed_onnx(int8_model, tokenizer, texts, settings.batch_size,
                               settings.max_length)
        scores["int8"] = fidelity(reference, quantized, settings.k)
        on_step("int8")
    elif int8_model is not None and scores["kind"] == "causal-lm":
        # against the fp32 compressed model: the quantization's own error
        scores["int8"] = decoder_fidelity(model, int8_model, tokenizer, texts[:32])
        on_step("int8")
    return {**scores, "eval_file": settings.eval_file or "<bundled evaluation text>",
            "dropped_overlapping_lines": dropped}


def _run(ctx: Context, settings: EvaluateSettings, factorize: LowRankCheckpoint,
         calibrate=None, recover=None, int8=None) -> dict:
    final = recover or factorize
    sources = []  # never evaluate on samples the model was calibrated or trained on
    if calibrate is not None:
        sources.append((calibrate.settings.calibration_file, calibrate.settings.samples))
    if recover is not None:
        trained = final.metadata["recovery"]["settings"]
        sources.append((trained["calibration_file"], trained["samples"]))
    tensors = is_tensor_file(settings.eval_file)
    sources = [(path, 10**9 if tensors else n) for path, n in sources
               if is_tensor_file(path) == tensors]
    with ctx.track("evaluate", 2 if int8 and not tensors else 1) as advance:
        return evaluate(ctx.models, final, settings, seen_samples(*sources),
                        int8.path if int8 is not None else None, advance)


register_stage(Stage(
    "evaluate", ("factorize",), EvaluateSettings, _run,
    save=json_saver("evaluation.json"),
    load=json_loader("evaluation.json"),
    uses=("calibrate", "recover", "int8"),
))
