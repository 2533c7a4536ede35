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


class LowRankFactors(nn.Module):
    """A factored matrix that is not a module's own ``weight`` (a recurrent ``weight_ih_l0``):
    holds ``A`` (out × r) and ``B`` (r × in) and maps x ↦ (x·Bᵀ)·Aᵀ. Being a submodule named
    after the tensor it replaces, its state-dict keys are ``<tensor>.A`` and ``<tensor>.B``."""

    def __init__(self, out_features: int, in_features: int, rank: int, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.B = nn.Parameter(torch.empty(rank, in_features, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.B), self.A)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


# --------------------------------------------------------------------------------------------
# Recurrent layers. torch's fused kernels take dense weights only, so the recurrence is written
# out: one projection of the whole sequence by weight_ih (two matmuls when factored), then a
# step loop that multiplies the hidden state by weight_hh. The same code, fed the dense
# weights, traces the inputs each weight sees for calibration (lowrank.calibrate).

RNN_MODES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}  # gates per hidden unit


def rnn_tensor_names(num_layers: int, bidirectional: bool, bias: bool = True) -> list[str]:
    """torch's parameter names: weight_ih_l{k}[_reverse], weight_hh_..., bias_ih_..., bias_hh_..."""
    names = []
    for k in range(num_layers):
        for sfx in ("", "_reverse") if bidirectional else ("",):
            kinds = ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if bias else ())
            names += [f"{kind}_l{k}{sfx}" for kind in kinds]
    return names


def _cell(mode: str, gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, c):
    """One step given the input projection ``gi`` and the hidden projection ``gh`` (biases in)."""
    if mode == "LSTM":
        i, f, g, o = (gi + gh).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "GRU":  # b_hn sits inside r ⊙ (W_hn h + b_hn), as in torch
        i_r, i_z, i_n = gi.chunk(3, -1)
        h_r, h_z, h_n = gh.chunk(3, -1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h, c
    act = torch.tanh if mode == "RNN_TANH" else torch.relu
    return act(gi + gh), c


def recurrent_forward(rnn: nn.Module, project, param, input, hx=None, record=None):
    """torch's LSTM/GRU/RNN forward for module ``rnn``'s configuration (mode, sizes, batch_first,
    bidirectional, dropout), with each weight applied by ``project(name, x)`` and each bias
    read by ``param(name)``. ``record(name, x)``, when given, receives the rows weight ``name``
    multiplies (layer inputs for weight_ih, previous hidden states for weight_hh)."""
    if isinstance(input, nn.utils.rnn.PackedSequence):
        raise LowrankError("low-rank recurrent layers take padded tensors, not PackedSequence")
    mode, H, D = rnn.mode, rnn.hidden_size, 2 if rnn.bidirectional else 1
    unbatched = input.dim() == 2
    x = input.unsqueeze(1) if unbatched else input.transpose(0, 1) if rnn.batch_first else input
    T, batch = x.shape[0], x.shape[1]
    lstm = mode == "LSTM"
    if hx is None:
        zeros = x.new_zeros(rnn.num_layers * D, batch, H)
        h0, c0 = zeros, zeros
    else:
        h0, c0 = hx if lstm else (hx, None)
        if unbatched:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1) if c0 is not None else None
    h_out, c_out = [], []
    for k in range(rnn.num_layers):
        outs = []
        for d in range(D):
            sfx = f"_l{k}" + ("_reverse" if d else "")
            seq = x if d == 0 else x.flip(0)
            if record:
                record(f"weight_ih{sfx}", seq)
            gi = project(f"weight_ih{sfx}", seq)
            b_hh = None
            if rnn.bias:
                gi, b_hh = gi + param(f"bias_ih{sfx}"), param(f"bias_hh{sfx}")
            h, c = h0[k * D + d], c0[k * D + d] if lstm else None
            steps = [h]
            for t in range(T):
                gh = project(f"weight_hh{sfx}", h)
                h, c = _cell(mode, gi[t], gh if b_hh is None else gh + b_hh, h, c)
                steps.append(h)
            if record:
                record(f"weight_hh{sfx}", torch.stack(steps[:-1]))
            y = torch.stack(steps[1:])
            outs.append(y.flip(0) if d else y)
            h_out.append(h)
            c_out.append(c)
        x = torch.cat(outs, -1) if D == 2 else outs[0]
        if rnn.dropout and rnn.training and k < rnn.num_layers - 1:
            x = F.dropout(x, rnn.dropout, training=True)
    output = x.squeeze(1) if unbatched else x.transpose(0, 1) if rnn.batch_first else x
    h_n = torch.stack(h_out)
    h_n = h_n.squeeze(1) if unbatched else h_n
    if not lstm:
        return output, h_n
    c_n = torch.stack(c_out)
    return output, (h_n, c_n.squeeze(1) if unbatched else c_n)


class LowRankRNN(nn.Module):
    """An ``nn.LSTM``/``nn.GRU``/``nn.RNN`` whose recurrent weights may be factored.

    Each factored ``weight_ih_l{k}`` / ``weight_hh_l{k}`` (``_reverse`` too) becomes a
    :class:`LowRankFactors` submodule of that name, so the state dict holds
    ``<rnn>.weight_ih_l0.A`` (gates·hidden × r) and ``<rnn>.weight_ih_l0.B`` (r × input); other
    weights and all biases keep torch's names and values. Outputs match torch's module (same
    gate order, hx, batch_first, bidirectional, dropout); PackedSequence and LSTM
    ``proj_size`` are not supported.
    """

    def __init__(self, rnn: nn.RNNBase, ranks: dict[str, int]):
        super().__init__()
        if type(rnn) not in (nn.LSTM, nn.GRU, nn.RNN) or rnn.mode not in RNN_MODES:
            raise LowrankError(f"no low-rank version of {type(rnn).__name__} "
                               f"(supported: LSTM, GRU, RNN)")
        if getattr(rnn, "proj_size", 0):
            raise LowrankError("cannot factor an LSTM with proj_size > 0")
        for attr in ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first",
                     "dropout", "bidirectional"):
            setattr(self, attr, getattr(rnn, attr))
        names = rnn_tensor_names(rnn.num_layers, rnn.bidirectional, rnn.bias)
        unknown = sorted(set(ranks) - {n for n in names if n.startswith("weight")})
        if unknown:
            raise LowrankError(f"{type(rnn).__name__} has no weight {unknown[0]!r} to factor")
        for name in names:
            dense = getattr(rnn, name)
            if name in ranks:
                setattr(self, name, LowRankFactors(dense.shape[0], dense.shape[1], ranks[name],
                                                   dense.device, dense.dtype))
            else:
                setattr(self, name, nn.Parameter(dense.detach().clone(),
                                                 requires_grad=dense.requires_grad))

    def _project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        w = getattr(self, name)
        return w(x) if isinstance(w, LowRankFactors) else F.linear(x, w)

    def forward(self, input, hx=None):
        return recurrent_forward(self, self._project, lambda n: getattr(self, n), input, hx)

    def extra_repr(self) -> str:
        ranks = {n: m.rank for n, m in self.named_children() if isinstance(m, LowRankFactors)}
        return (f"{self.mode}, {self.input_size}, {self.hidden_size}, "
                f"num_layers={self.num_layers}, ranks={ranks}")


def dense_rnn_forward(rnn: nn.RNNBase, input, hx=None, record=None):
    """The dense module's output through :func:`recurrent_forward` (for calibration traces)."""
    return recurrent_forward(rnn, lambda n, x: F.linear(x, getattr(rnn, n)),
                             lambda n: getattr(rnn, n), input, hx, record)


class TiedLowRankLinear(nn.Module):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.B), self.A, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.A.shape[1]}, tied")


def lowrank_like(module: nn.Module, rank: int) -> nn.Module:
    """An uninitialized low-rank module with the shapes of a dense one."""
    if isinstance(module, nn.Linear):
        return LowRankLinear.like(module, rank)
    if isinstance(module, nn.Embedding):
        return LowRankEmbedding.like(module, rank)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return LowRankConv(module, rank)
    if isinstance(module, nn.RNNBase):
        raise LowrankError(f"{type(module).__name__} weights are factored by tensor name "
                           f"(e.g. 'lstm.weight_hh_l0'), not as one module")
    raise LowrankError(
        f"no low-rank version of {type(module).__name__} (supported: Linear, Embedding, Conv1d, "
        f"Conv2d, and the weight_ih/weight_hh tensors of LSTM, GRU, RNN)"
    )


def _recurrent_owner(model: nn.Module, fqn: str) -> str | None:
    """``lstm`` for ``lstm.weight_hh_l0`` when ``lstm`` is an LSTM/GRU/RNN, else None."""
    parent, _, attr = fqn.rpartition(".")
    try:
        owner = model.get_submodule(parent) if parent else model
    except AttributeError:
        return None
    if isinstance(owner, nn.RNNBase) and attr.startswith(("weight_ih_l", "weight_hh_l")):
        return parent
    return None


def swap_lowrank_(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """Replace, in place, each module named in ``ranks`` (fqn -> rank) by its low-rank version.

    A recurrent weight is named by its tensor (``lstm.weight_hh_l0``): the weights of one
    LSTM/GRU/RNN are gathered and the module becomes one :class:`LowRankRNN`. The new modules'
    factors are uninitialized: load them with ``load_state_dict``.
    """
    recurrent: dict[str, dict[str, int]] = {}
    for fqn, rank in ranks.items():
        owner = _recurrent_owner(model, fqn)
        if owner is not None:
            recurrent.setdefault(owner, {})[fqn.rpartition(".")[2]] = rank
            continue
        try:
            old = model.get_submodule(fqn) if fqn else model
        except AttributeError as e:
            raise LowrankError(f"the model has no module {fqn!r} to factor") from e
        _replace(model, fqn, lowrank_like(old, rank))
    for fqn, weights in recurrent.items():
        _replace(model, fqn, LowRankRNN(model.get_submodule(fqn) if fqn else model, weights))
    return model


def _replace(model: nn.Module, fqn: str, new: nn.Module) -> None:
    if not fqn:
        raise LowrankError("cannot swap the root module itself; wrap it in a parent module")
    parent_name, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
