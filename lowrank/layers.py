"""Low-rank modules and swapping them into any ``nn.Module`` by name.

Every module holds ``A`` (out × r) and ``B`` (r × in·kernel) as 2-D parameters, the layout of
the state dict (see :mod:`lowrank.factorize`), and computes ``A(Bx) + bias`` as two steps: an
exporter or runtime that sees the product A·B would fold it back into one dense matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LowrankError


class LowRankLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.B = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None

    @classmethod
    def like(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        w = linear.weight
        return cls(linear.in_features, linear.out_features, rank, linear.bias is not None,
                   w.device, w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.B), self.A, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class LowRankEmbedding(nn.Module):
    """Rows of the table W (num × dim) ≈ A (num × r) · B (r × dim): look up A, then multiply."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int,
                 padding_idx: int | None = None, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_embeddings, self.embedding_dim, self.rank = num_embeddings, embedding_dim, rank
        self.padding_idx = padding_idx
        self.A = nn.Parameter(torch.empty(num_embeddings, rank, **kw))
        self.B = nn.Parameter(torch.empty(rank, embedding_dim, **kw))

    @classmethod
    def like(cls, emb: nn.Embedding, rank: int) -> LowRankEmbedding:
        if emb.max_norm is not None or emb.sparse:
            raise LowrankError("embeddings with max_norm or sparse gradients are not supported")
        w = emb.weight
        return cls(emb.num_embeddings, emb.embedding_dim, rank, emb.padding_idx, w.device, w.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.A, self.padding_idx) @ self.B

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}"


class LowRankConv(nn.Module):
    """A k×k convolution to ``rank`` channels (B), then a 1×1 convolution (A) with the bias."""

    def __init__(self, conv: nn.Conv1d | nn.Conv2d, rank: int):
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise LowrankError(
                f"cannot factor a convolution with groups={conv.groups}, "
                f"padding_mode={conv.padding_mode!r} (only groups=1 and zero padding)"
            )
        self.dims = conv.weight.dim() - 2
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.rank = tuple(conv.kernel_size), rank
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        w = conv.weight
        fan_in = self.in_channels * math.prod(self.kernel_size)
        self.A = nn.Parameter(torch.empty(self.out_channels, rank, device=w.device, dtype=w.dtype))
        self.B = nn.Parameter(torch.empty(rank, fan_in, device=w.device, dtype=w.dtype))
        self.bias = (nn.Parameter(torch.empty_like(conv.bias)) if conv.bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = F.conv1d if self.dims == 1 else F.conv2d
        b = self.B.view(self.rank, self.in_channels, *self.kernel_size)
        a = self.A.view(self.out_channels, self.rank, *([1] * self.dims))
        return conv(conv(x, b, None, self.stride, self.padding, self.dilation), a, self.bias)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"rank={self.rank}")


LowRankConv1d = LowRankConv2d = LowRankConv  # one class serves both; names for discoverability


def lowrank_like(module: nn.Module, rank: int) -> nn.Module:
    """An uninitialized low-rank module with the shapes of a dense one."""
    if isinstance(module, nn.Linear):
        return LowRankLinear.like(module, rank)
    if isinstance(module, nn.Embedding):
        return LowRankEmbedding.like(module, rank)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return LowRankConv(module, rank)
    raise LowrankError(
        f"no low-rank version of {type(module).__name__} (supported: Linear, Embedding, Conv1d, Conv2d)"
    )


def swap_lowrank_(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """Replace, in place, each module named in ``ranks`` (fqn -> rank) by its low-rank version.

    The new modules are uninitialized: load factors into them with ``load_state_dict``.
    """
    for fqn, rank in ranks.items():
        try:
            old = model.get_submodule(fqn) if fqn else model
        except AttributeError as e:
            raise LowrankError(f"the model has no module {fqn!r} to factor") from e
        new = lowrank_like(old, rank)
        if not fqn:
            raise LowrankError("cannot swap the root module itself; wrap it in a parent module")
        parent_name, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model
