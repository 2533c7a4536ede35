"""Recurrent layers. torch's fused kernels take dense weights only, so the recurrence is written
out: one projection of the whole sequence by weight_ih (two matmuls when factored), then a step
loop that multiplies the hidden state by weight_hh. The same code, fed the dense weights, traces
the inputs each weight sees for calibration (:mod:`lowrank.stages.calibrate`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LowrankError
from .layers import LowRankFactors

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
        # Call any module, not just LowRankFactors: PEFT wraps a targeted one in its own module.
        return w(x) if isinstance(w, nn.Module) else F.linear(x, w)

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
