"""``nn.MultiheadAttention`` with a factored in-projection. torch's MHA reads ``in_proj_weight``
(3E × E: the q, k and v projections stacked) and ``out_proj.weight`` as dense tensors inside
its functional forward, so factoring either means running the attention here: the projections
through the factors (one B for q, k and v, then A's three row blocks), then torch's
scaled-dot-product attention, then ``out_proj`` as a module (dense or factored)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LowrankError
from .layers import LowRankFactors


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True = may not attend, torch's MHA convention) as an additive float one."""
    if mask is None or mask.is_floating_point():
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


class LowRankMultiheadAttention(nn.Module):
    """Drop-in for an ``nn.MultiheadAttention`` (same state-dict names) whose ``in_proj_weight``
    may be a :class:`LowRankFactors` (state dict: ``<mha>.in_proj_weight.A`` (3E × r) and
    ``.B`` (r × E)) and whose ``out_proj`` may be factored. Same outputs as torch's module for
    its arguments (masks, ``need_weights``, ``average_attn_weights``, ``is_causal``,
    ``batch_first``, unbatched inputs); ``kdim``/``vdim``, ``bias_k``/``bias_v`` and
    ``add_zero_attn`` are not supported."""

    def __init__(self, mha: nn.MultiheadAttention, rank: int | None):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise LowrankError("cannot factor a MultiheadAttention with kdim/vdim, bias_k/bias_v "
                               "or add_zero_attn")
        self.embed_dim, self.num_heads, self.head_dim = mha.embed_dim, mha.num_heads, mha.head_dim
        self.dropout, self.batch_first = mha.dropout, mha.batch_first
        # torch's TransformerEncoderLayer takes a fused kernel with the dense in_proj_weight when
        # this is True; False sends it down the ordinary path, through this module's forward.
        self._qkv_same_embed_dim = False
        w = mha.in_proj_weight
        self.in_proj_weight = (LowRankFactors(w.shape[0], w.shape[1], rank, w.device, w.dtype)
                               if rank is not None else mha.in_proj_weight)
        self.in_proj_bias = mha.in_proj_bias
        self.bias_k = self.bias_v = None
        self.out_proj = mha.out_proj

    def _project(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """Rows ``block`` (0 q, 1 k, 2 v) of the in-projection applied to ``x``."""
        E, w, b = self.embed_dim, self.in_proj_weight, self.in_proj_bias
        bias = b[block * E:(block + 1) * E] if b is not None else None
        if isinstance(w, LowRankFactors):
            return F.linear(F.linear(x, w.B), w.A[block * E:(block + 1) * E], bias)
        return F.linear(x, w[block * E:(block + 1) * E], bias)

    def _qkv(self, query, key, value, same: bool):
        w = self.in_proj_weight
        if same and isinstance(w, LowRankFactors):  # self-attention: B once for q, k and v
            return F.linear(F.linear(query, w.B), w.A, self.in_proj_bias).chunk(3, -1)
        return self._project(query, 0), self._project(key, 1), self._project(value, 2)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        same, unbatched = query is key and key is value, query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(0 if self.batch_first else 1)
                                 for t in (query, key, value))
            key_padding_mask = key_padding_mask.unsqueeze(0) \
                if key_padding_mask is not None else None
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = self._qkv(query, key, value, same)  # (N, L|S, E)
        N, L, S, H = q.shape[0], q.shape[1], k.shape[1], self.num_heads
        q, k, v = (t.reshape(N, -1, H, self.head_dim).transpose(1, 2) for t in (q, k, v))
        mask = _additive(attn_mask, q.dtype)
        if mask is not None:
            mask = mask.view(N, H, L, S) if mask.dim() == 3 else mask.view(1, 1, L, S)
        elif is_causal:
            mask = _additive(torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1), q.dtype)
        padding = _additive(key_padding_mask, q.dtype)
        if padding is not None:
            padding = padding.view(N, 1, 1, S)
            mask = padding if mask is None else mask + padding
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / self.head_dim ** 0.5
            weights = torch.softmax(scores + mask if mask is not None else scores, dim=-1)
            out = F.dropout(weights, dropout, self.training) @ v
            weights = weights.mean(1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, mask, dropout)
        out = self.out_proj(out.transpose(1, 2).reshape(N, L, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
            weights = weights.squeeze(0) if weights is not None else None
        return out, weights
