"""Factored layers: one base (:class:`Factored`) and a module per dense kind.

Every module holds ``A`` (out × r) and ``B`` (r × in·kernel) as 2-D parameters, the layout of
the state dict (:mod:`lowrank.naming`), and computes ``A(Bx) + bias`` as two steps: an
exporter or runtime that sees the product A·B would fold it back into one dense matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LowrankError


class Factored(nn.Module):
    """Base of the factored layers: parameters ``A`` (out × r) and ``B`` (r × in) and the map
    x ↦ (x·Bᵀ)·Aᵀ + bias, two steps, never A·B. Subclasses set ``A``, ``B`` and ``bias``."""

    @property
    def weight(self) -> torch.Tensor:
        """No dense weight: an empty tensor with the factors' dtype and device. Model code and
        PEFT read a child's ``weight`` for those alone (T5's feed-forward casts its input to
        ``wo.weight.dtype``; PEFT moves adapters to ``weight.device``); anything that would
        use it as the matrix fails loudly on its shape instead of silently."""
        return self.A.new_empty(0)

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.B), self.A, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.B.shape[1]}, out_features={self.A.shape[0]}, rank={self.rank}"


def _factors(module: nn.Module, rows: int, cols: int, rank: int, device, dtype) -> None:
    module.A = nn.Parameter(torch.empty(rows, rank, device=device, dtype=dtype))
    module.B = nn.Parameter(torch.empty(rank, cols, device=device, dtype=dtype))


class LowRankLinear(Factored):
    """A Linear as ``A(Bx) + bias``. With ``split`` (the output sizes of a fused projection's
    parts, e.g. q, k, v) each part has its own rank-``rank`` factors: ``B`` is (parts·r × in),
    ``A`` (out × r) holds each part's A_i in its rows, and part i is A_i(B_i x) — a
    block-diagonal A, stored without its zeros (lowrank_config.json records ``split``)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None, split: list[int] | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.split = list(split) if split else None
        if self.split and sum(self.split) != out_features:
            raise LowrankError(f"split {self.split} does not add up to {out_features} outputs")
        _factors(self, out_features, in_features, rank, device, dtype)
        if self.split:
            self.B = nn.Parameter(torch.empty(len(self.split) * rank, in_features, device=device,
                                              dtype=dtype))
        self.bias = (nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
                     if bias else None)

    @classmethod
    def like(cls, linear: nn.Linear, rank: int, split: list[int] | None = None) -> LowRankLinear:
        w = linear.weight
        return cls(linear.in_features, linear.out_features, rank, linear.bias is not None,
                   w.device, w.dtype, split)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.split:
            return super().forward(x)
        h = F.linear(x, self.B).split(self.rank, -1)
        out = torch.cat([F.linear(hi, Ai) for hi, Ai in zip(h, self.A.split(self.split))], -1)
        return out + self.bias if self.bias is not None else out

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", split={self.split}" if self.split else "")


class LowRankEmbedding(Factored):
    """Rows of the table W (num × dim) ≈ A (num × r) · B (r × dim): look up A, then multiply."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int,
                 padding_idx: int | None = None, device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        _factors(self, num_embeddings, embedding_dim, rank, device, dtype)

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


class LowRankConv(Factored):
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
        self.kernel_size = tuple(conv.kernel_size)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        w = conv.weight
        fan_in = self.in_channels * math.prod(self.kernel_size)
        _factors(self, self.out_channels, fan_in, rank, w.device, w.dtype)
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


class LowRankFactors(Factored):
    """A factored matrix that is not a module's own ``weight`` (a recurrent ``weight_ih_l0``):
    x ↦ (x·Bᵀ)·Aᵀ without bias. Being a submodule named after the tensor it replaces, its
    state-dict keys are ``<tensor>.A`` and ``<tensor>.B``."""

    def __init__(self, out_features: int, in_features: int, rank: int, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        _factors(self, out_features, in_features, rank, device, dtype)
        self.bias = None


class TiedLowRankLinear(Factored):
    """A Linear whose weight was tied to a factored module (an LM head tied to the input
    embedding): logits = (h·Bᵀ)·Aᵀ with that module's ``A`` and ``B`` — the same parameters,
    read at call time, so the tie survives training, adapters and ``.to()``. The source is
    not registered as a child: its factors are saved once, under the source's name."""

    def __init__(self, source: nn.Module, bias: torch.Tensor | None = None):
        super().__init__()
        object.__setattr__(self, "source", source)
        self.in_features, self.out_features = source.B.shape[1], source.A.shape[0]
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @property
    def A(self) -> torch.Tensor:
        return self.source.A

    @property
    def B(self) -> torch.Tensor:
        return self.source.B

    def extra_repr(self) -> str:
        return super().extra_repr() + ", tied"


def is_transposed(module: nn.Module) -> bool:
    """A Linear that stores its weight as (in, out): transformers' ``Conv1D`` (GPT-2, and the
    models copied from it). Matched by name and layout so lowrank needs no transformers import."""
    w = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2
            and getattr(module, "nf", None) == w.shape[1])


def plain_lookup(module: nn.Embedding) -> bool:
    """Whether an Embedding is a plain table lookup. Subclasses with their own forward (BART's
    scaled word and offset position embeddings) do more, which LowRankEmbedding would drop."""
    return type(module).forward is nn.Embedding.forward


def lowrank_like(module: nn.Module, rank: int, split: list[int] | None = None) -> nn.Module:
    """An uninitialized low-rank module with the shapes of a dense one (``split``: a fused
    Linear factored per part, see :class:`LowRankLinear`)."""
    if isinstance(module, nn.Linear):
        return LowRankLinear.like(module, rank, split)
    if is_transposed(module):  # y = x·W + b with W (in, out) is a Linear with weight Wᵀ
        w = module.weight
        return LowRankLinear(w.shape[0], w.shape[1], rank, module.bias is not None,
                             w.device, w.dtype, split)
    if split:
        raise LowrankError(f"only Linear layers are factored per part, not "
                           f"{type(module).__name__}")
    if isinstance(module, nn.Embedding):
        if not plain_lookup(module):
            raise LowrankError(f"{type(module).__name__} has its own forward (scaling, offsets) "
                               f"that a factored lookup would skip; keep it dense")
        return LowRankEmbedding.like(module, rank)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return LowRankConv(module, rank)
    if isinstance(module, nn.RNNBase):
        raise LowrankError(f"{type(module).__name__} weights are factored by tensor name "
                           f"(e.g. 'lstm.weight_hh_l0'), not as one module")
    raise LowrankError(
        f"no low-rank version of {type(module).__name__} (supported: Linear, GPT-2's Conv1D, "
        f"Embedding, Conv1d, Conv2d, and the weight_ih/weight_hh tensors of LSTM, GRU, RNN)"
    )


