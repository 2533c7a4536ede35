"""Keeping onnxruntime's attention fusion (``--optimize``): its transformer optimizer fuses an
encoder layer's attention into one Attention op only when the query, key, value and output
projections are each one dense MatMul (+ Add): a factored projection is two MatMuls, and the
pattern no longer matches. Whether the fused op saves more time than factoring those four
projections does depends on the shapes, the batch and the precision, so the plan stage measures
it: the whole model, exported, optimized (and quantized to int8 when the pipeline deploys int8),
with the projections factored as planned against the plan that keeps them dense (its budget
spent on the other matrices), timed on this CPU.

Only BERT-style attention (``<attn>.self.{query,key,value}`` and ``<attn>.output.dense``) is
looked for: it is what the optimizer's ``bert`` patterns fuse. Its ``gpt2`` patterns fuse no
LLaMA attention, so decoders have nothing to keep.
"""

from __future__ import annotations

import math
import statistics
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..naming import module_name, weight_name
from ..nn.layers import Factored
from ..nn.swap import swap_lowrank_
from ..timing import cpu_session, feeds, time_runs

# Token counts (batch × sequence) timed when the plan has no latency_tokens: one short query
# and a batch of 16 × 128.
FUSION_TOKENS = (16, 2048)
# Per token count: 3 rounds × 10 runs per model, the models alternating, in this process (a
# process per measurement, as timing.bench does, took 12 process starts: 40 s on MiniLM). One
# session at a time: an idle session's spinning threads slowed the other's runs at 1×16.
TIMING = {"runs": 10, "warmup": 3, "rounds": 3}
# The fused plan's time over the factored one's, geometric mean over the token counts, must
# be below this: it cuts the other matrices deeper for the same budget (MiniLM at 50%: cosine
# 0.738 against 0.768), and repeated timings of two such models differ by a few percent.
MARGIN = 0.95
PRECISIONS = ("float32", "int8")


def attention_groups(model: nn.Module) -> list[list[str]]:
    """Weight names of each BERT-style attention: [query, key, value, output projection]."""
    groups = []
    for fqn, m in model.named_modules():
        inner, out = getattr(m, "self", None), getattr(getattr(m, "output", None), "dense", None)
        parts = [getattr(inner, p, None) for p in ("query", "key", "value")] + [out]
        if all(isinstance(p, nn.Linear) for p in parts):
            prefix = f"{fqn}." if fqn else ""
            groups.append([weight_name(prefix + p) for p in
                           ("self.query", "self.key", "self.value", "output.dense")])
    return groups


def _shape(tokens: int, positions: int) -> tuple[int, int]:
    """(batch, sequence) for a token count: sequences of up to 128 tokens (and ``positions``,
    the model's longest)."""
    sequence = min(tokens, 128, positions)
    return max(1, math.ceil(tokens / sequence)), sequence


def _random_factored(architecture, ranks: dict[str, int]) -> nn.Module:
    """The architecture with random factors at ``ranks`` (tensor name -> rank): timing needs
    the shapes, not the weights."""
    model = architecture()
    swap_lowrank_(model, {module_name(n): r for n, r in ranks.items()})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Factored):
                for p in (m.A, m.B):
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return model.eval()


def time_plans(architecture, plans: dict[str, dict[str, int]], tokens: tuple[int, ...],
               threads: int, precision: str = "float32") -> dict[int, dict[str, float]]:
    """p50 ms of each plan's model (name -> {tensor name: rank}), exported to ONNX, run through
    onnxruntime's transformer optimizer (and dynamic int8 quantization), at each token count."""
    from .export import export_onnx
    from .int8 import quantize_int8
    from .optimize import fusion_shape, optimize_onnx

    with tempfile.TemporaryDirectory(prefix="lowrank-fusion-") as tmp:
        paths = {}
        for name, ranks in plans.items():
            model = _random_factored(architecture, ranks)
            positions = getattr(getattr(model, "config", None), "max_position_embeddings", 0) or 128
            raw, fused = Path(tmp) / f"{name}.onnx", Path(tmp) / f"{name}-opt.onnx"
            export_onnx(model, raw)
            optimize_onnx(raw, fused, *fusion_shape(model))
            if precision == "int8":
                quantize_int8(fused, fused.with_suffix(".int8.onnx"))
                fused = fused.with_suffix(".int8.onnx")
            paths[name] = fused
        runs = {(name, count): [] for name in paths for count in tokens}
        for _ in range(TIMING["rounds"]):
            for name, path in paths.items():
                session = cpu_session(str(path), threads)
                for count in tokens:
                    feed = feeds(session, *_shape(count, positions), 0)
                    runs[name, count] += time_runs(session, feed, TIMING["runs"],
                                                   TIMING["warmup"])
                del session
    return {count: {name: statistics.median(runs[name, count]) for name in paths}
            for count in tokens}


def keep_attention_fused(plan, replan, models, tokens: tuple[int, ...], threads: int,
                         precision: str = "float32"):
    """``plan``, or ``replan(dense)`` (the same policy with the ``dense`` matrices forced dense)
    when keeping every factored attention's projections dense, so the optimizer fuses it, makes
    ``models``' architecture (:class:`lowrank.models.Models`) faster in ``precision``: its time
    over the factored plan's, geometric mean over ``tokens``, below :data:`MARGIN`. The
    measurement goes into ``policy["fusion_check"]``."""
    groups = [g for g in attention_groups(models.architecture(meta=True))
              if all(n in plan.layers for n in g)
              and any(plan.layers[n].rank is not None for n in g)]
    if not groups:
        return plan
    fused = replan({n: "kept dense with its attention's Q/K/V/output projections, so "
                       "onnxruntime fuses the attention (faster on this CPU; policy."
                       "fusion_check)" for g in groups for n in g})
    candidates = {"factored": plan, "fused": fused}
    ranks = {name: {n: p.rank for n, p in candidate.layers.items() if p.rank is not None}
             for name, candidate in candidates.items()}
    times = time_plans(models.architecture, ranks, tokens, threads, precision)
    ratio = math.prod(t["fused"] / t["factored"] for t in times.values()) ** (1 / len(times))
    kept = ratio < MARGIN
    chosen = fused if kept else plan
    chosen.policy["fusion_check"] = {
        "attentions": len(groups), "precision": precision, "fused_over_factored": round(ratio, 4),
        "kept_dense": kept,
        "p50_ms": {str(count): {k: round(v, 3) for k, v in t.items()} for count, t in times.items()}}
    losses = {name: _probe_loss(candidate) for name, candidate in candidates.items()}
    if None not in losses.values():  # the quality side: the loss allocation's joint probe
        chosen.policy["fusion_check"]["probe_loss"] = losses
    return chosen


def _probe_loss(plan) -> float | None:
    """The end-to-end loss the loss allocation measured for ``plan`` on its probe batch."""
    found = plan.policy.get("loss_allocation") or {}
    measured = (found.get(found.get("chosen")) or {}).get("measured_joint")
    return None if measured is None else round(measured, 5)
