"""Tied weights: one matrix under two names (an embedding and its LM head), found by shared
storage, by the architecture's declared ties, or by content. Factorization factors the
primary once and the alias follows it."""

from __future__ import annotations

import torch
from torch import nn

from ..io.checkpoint import Checkpoint
from ..models import model_ties
from ..naming import weight_name
from .analyze import matrix_infos


def find_ties(ckpt: Checkpoint, model=None) -> dict[str, str]:
    """Matrices of ``ckpt`` that are one weight under two names: {alias: primary}, the primary
    being the first name in checkpoint order. Found by shared storage (a torch state dict saved
    with tied parameters) and, given the dense architecture ``model`` (the meta device will do),
    by the parameters it shares (``tie_word_embeddings``) when both names are in the checkpoint,
    and by content: an untied output layer saved as an exact copy of an embedding table.
    """
    names = [i.name for i in matrix_infos(ckpt)]
    groups: list[list[str]] = []
    if ckpt.kind == "torch":
        by_storage: dict[tuple, list[str]] = {}
        for name in names:
            t = ckpt.get(name)
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
            by_storage.setdefault(key, []).append(name)
        groups += list(by_storage.values())
    if model is not None:
        groups += model_ties(model) + _copied_tables(ckpt, model, set(names))
    order = {n: i for i, n in enumerate(names)}
    # An embedding table is the primary whatever the name order (``lm_head`` sorts before
    # ``model.embed_tokens``): its factors serve the head too, not the other way round.
    tables = ({weight_name(n) for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
              if model is not None else set())
    ties: dict[str, str] = {}
    for group in groups:
        present = sorted({n for n in group if n in order},
                         key=lambda n: (n not in tables, order[n]))
        for alias in present[1:]:
            ties[alias] = ties.get(present[0], present[0])
    return ties


def _copied_tables(ckpt: Checkpoint, model: nn.Module, names: set[str]) -> list[list[str]]:
    """[embedding, linear] weight pairs of ``model`` that ``ckpt`` holds as equal tensors (an
    LM head untied in the config but saved as a copy of the input embedding): stored once.
    Shapes and dtypes are compared first, so only same-shaped pairs are read."""
    def weights(kind):
        return {weight_name(n): m.weight for n, m in model.named_modules()
                if isinstance(m, kind) and weight_name(n) in names}
    tables, linears = weights(nn.Embedding), weights(nn.Linear)
    infos = {i.name: i for i in ckpt.infos() if i.name in names}
    pairs = []
    for t in tables:
        a, table = infos[t], None
        for lin in linears:
            b = infos[lin]
            if (tuple(a.shape), a.dtype) != (tuple(b.shape), b.dtype):
                continue
            table = ckpt.get(t) if table is None else table
            if torch.equal(table, ckpt.get(lin)):
                pairs.append([t, lin])
    return pairs
