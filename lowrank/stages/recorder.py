"""Forward hooks that accumulate calibration statistics (:mod:`lowrank.stages.calibrate`): the
input Gram Σ x xᵀ and Σ|x| of every Linear, Conv1d/2d (input patches), LSTM/GRU/RNN and
MultiheadAttention in-projection, and the row counts of every Embedding; with output Grams,
Σ (Wx)(Wx)ᵀ instead of Σ x xᵀ for a Linear with fewer outputs than inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..device import float64_device
from ..linalg import lower_gram, symmetric
from ..models import model_ties
from ..naming import IN_PROJ, weight_name
from ..nn.layers import is_transposed, plain_lookup
from ..nn.recurrent import dense_rnn_forward


def token_rows(x: torch.Tensor, mask: torch.Tensor | None,
               index: torch.Tensor | None = None) -> torch.Tensor:
    """``x``'s feature vectors as rows; padding tokens are not data, so they are dropped when
    ``x``'s leading dims are ``mask``'s (batch, seq). ``index``: the flat positions of
    ``mask``'s True entries, when known (a gather 4× faster than boolean indexing, which
    looks for them on every call)."""
    if mask is not None and x.shape[:-1] == mask.shape:
        if index is None:
            return x[mask]
        return x.reshape(-1, x.shape[-1]).index_select(0, index)
    return x.reshape(-1, x.shape[-1])


def conv_patches(conv: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """(batch, positions, in·kernel): the input patch each output position multiplies, in the
    column order of the (out, in·kernel) view of the kernel."""
    one_d = conv.weight.dim() == 3
    if x.dim() == conv.weight.dim() - 1:  # unbatched
        x = x.unsqueeze(0)
    if one_d:  # a 1-D conv is a 2-D one of height 1
        x = x.unsqueeze(2)

    def pad2(v, fill):  # 1-D settings as the width of a height-1 2-D conv
        return (fill, v[0]) if one_d else tuple(v)

    kernel, stride, dilation = (pad2(conv.kernel_size, 1), pad2(conv.stride, 1),
                                pad2(conv.dilation, 1))
    padding = conv.padding
    if isinstance(padding, str):  # "valid" or "same" (stride 1): pad explicitly, maybe unevenly
        padding = (0, 0)
        if conv.padding == "same":
            total = [d * (k - 1) for d, k in zip(dilation, kernel)]
            x = F.pad(x, [total[1] // 2, total[1] - total[1] // 2,
                          total[0] // 2, total[0] - total[0] // 2])
    else:
        padding = pad2(padding, 0)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return cols.transpose(1, 2)


# Each batch's Gram term (a float32 lower_gram) is added to a float32 running sum that moves
# into the float64 total every FLUSH_ROWS rows: converting and adding every term in float64
# cost as much as the GEMM itself at 1536 features, 200 rows (9.0 vs 4.6 ms). On SmolLM2's
# old 256-line calibration (3,036 tokens) the Grams equal the per-batch float64 sums to 1e-7 relative.
FLUSH_ROWS = 8192


class Recorder:
    """Forward hooks that accumulate ``stats`` (an ActivationStats) for named Linear, Embedding,
    Conv1d/2d and LSTM/GRU/RNN modules."""

    def __init__(self, model: nn.Module, stats, only: set[str] | None = None,
                 device: str | None = None):
        self.stats, self.mask, self.handles = stats, None, []
        settings = stats.settings
        self.collect_abs = settings.method == "scale"  # the one weighting reading Σ|x|
        self.clip = settings.outlier_factor if settings.outliers == "clip" else None
        # Linears whose output Gram is recorded (lowrank.weighting's "whiten-output"): clipping
        # scales inputs, and only whitening needs nothing but the Gram
        outputs = settings.output_grams and settings.method == "whiten" and self.clip is None
        self.output_names: set[str] = set()
        self.device = float64_device(device)  # where the float64 Grams accumulate
        # The last Linear input and its Gram/abs-sum terms: a layer fed the same input next
        # (query, key, value; gate, up) adds these instead of another GEMM.
        self.last: tuple | None = None
        # {name: [float32 Σ x xᵀ of the batches since the last flush, their rows]}
        self.pending: dict[str, list] = {}
        self.scratch: dict[tuple, torch.Tensor] = {}  # {(features, device): _lower_gram's output}
        # A table used under two names (T5's shared.weight is also encoder.embed_tokens.weight)
        # is factored once, under its first name: count its rows there.
        primary = {n: group[0] for group in model_ties(model) for n in group}
        for fqn, module in model.named_modules():
            if isinstance(module, nn.RNNBase):
                self._hook_rnn(fqn, module, only)
                continue
            if isinstance(module, nn.MultiheadAttention):
                self._hook_attention(f"{fqn}.{IN_PROJ}" if fqn else IN_PROJ, module, only)
            name = weight_name(fqn)
            if only is not None and name not in only:
                continue
            if isinstance(module, nn.Linear) or is_transposed(module):
                transposed = is_transposed(module)  # GPT-2's Conv1D: weight stored (in, out)
                if transposed:
                    stats.transposed.add(name)
                out, in_ = module.weight.shape[::-1] if transposed else module.weight.shape
                if outputs and out < in_:
                    self.output_names.add(name)
                    self.handles.append(module.register_forward_hook(self._linear_output(name)))
                else:
                    self.handles.append(module.register_forward_pre_hook(self._linear(name)))
            elif isinstance(module, nn.Embedding) and plain_lookup(module):
                self.handles.append(module.register_forward_pre_hook(
                    self._embedding(primary.get(name, name), module)))
            elif isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1 \
                    and module.padding_mode == "zeros":
                self.handles.append(module.register_forward_pre_hook(self._conv(name, module)))

    @property
    def mask(self) -> torch.Tensor | None:
        """The batch's (batch, seq) mask of the tokens the statistics use (None: all)."""
        return self._mask

    @mask.setter
    def mask(self, mask: torch.Tensor | None) -> None:
        """The batch's real tokens, less each sequence's first with ``skip-first`` outliers
        (the attention sink, where LLaMA-family LMs put massive activations)."""
        if mask is not None and self.stats.settings.outliers == "skip-first":
            mask = mask.clone()
            first = mask.int().argmax(1)  # the first real token (left padding too)
            mask[torch.arange(mask.shape[0]), first] = False
        self._mask = mask
        self._index = None if mask is None else mask.reshape(-1).nonzero().squeeze(1)

    def _accumulate(self, name: str, x: torch.Tensor, share: bool = False) -> None:
        rows = x.reshape(-1, x.shape[-1]).to(self.device, torch.float32)
        last = self.last if share else None
        if last is not None and last[0].shape == rows.shape and torch.equal(last[0], rows):
            gram, abs_sum = last[1], last[2]  # the same values: the same terms, bit for bit
        else:
            gram = self._lower_gram(rows)
            abs_sum = rows.abs().sum(0, dtype=torch.float64) if self.collect_abs else None
            # our own copy: the model may change its input in place afterwards (and the
            # term is scratch, which a call without sharing may overwrite: forget it then)
            own = rows.clone() if share and rows.data_ptr() == x.data_ptr() else rows
            self.last = (own, gram, abs_sum) if share else None
        if abs_sum is not None:
            sums = self.stats.abs_sums
            if name in sums:
                sums[name] += abs_sum
            else:  # a copy: the terms may be shared with the next layer
                sums[name] = abs_sum.clone()
        pending = self.pending.get(name)
        if pending is None:  # a copy: the term is scratch, and may be shared
            self.pending[name] = [gram.clone(), rows.shape[0]]
        else:
            pending[0] += gram
            pending[1] += rows.shape[0]
            if pending[1] >= FLUSH_ROWS:
                self._flush(name)

    def _lower_gram(self, rows: torch.Tensor) -> torch.Tensor:
        """:func:`lowrank.linalg.lower_gram` of ``rows`` in a scratch matrix per width, which
        the next call overwrites."""
        key = (rows.shape[1], str(rows.device))
        if key not in self.scratch:
            self.scratch[key] = rows.new_zeros(rows.shape[1], rows.shape[1])
        return lower_gram(rows, self.scratch[key])

    def _flush(self, name: str) -> None:
        gram = symmetric(self.pending.pop(name)[0]).double()
        grams = self.stats.output_grams if name in self.output_names else self.stats.grams
        # out of place: a Gram first flushed in a hook is an inference tensor, and the last
        # flush runs after torch.inference_mode has ended, where it cannot be updated in place
        grams[name] = grams[name] + gram if name in grams else gram

    def flush(self) -> None:
        """Move every float32 running sum into the statistics' float64 Grams."""
        for name in list(self.pending):
            self._flush(name)

    def _conv(self, name, module):
        def hook(mod, args):
            patches = conv_patches(mod, args[0].detach())
            if self.mask is not None and patches.shape[:2] == self.mask.shape:
                patches = patches[self.mask]  # a same-padded 1-D conv over tokens
            self._accumulate(name, patches)
        return hook

    def _hook_rnn(self, fqn: str, module: nn.RNNBase, only: set[str] | None) -> None:
        if type(module) not in (nn.LSTM, nn.GRU, nn.RNN) or getattr(module, "proj_size", 0):
            return
        prefix = f"{fqn}." if fqn else ""

        def record(weight: str, x: torch.Tensor) -> None:
            if only is None or prefix + weight in only:
                self._accumulate(prefix + weight, x.detach())

        def hook(mod, args, kwargs):
            inputs = list(args) + [kwargs[k] for k in ("input", "hx") if k in kwargs]
            if not inputs or isinstance(inputs[0], nn.utils.rnn.PackedSequence):
                return  # packed sequences: no statistics, plain SVD for this module
            dense_rnn_forward(mod, inputs[0], inputs[1] if len(inputs) > 1 else None, record)

        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _hook_attention(self, name: str, module: nn.MultiheadAttention, only) -> None:
        """in_proj_weight multiplies the query, key and value inputs (one B for all three when
        factored): their rows, each distinct tensor once."""
        if only is not None and name not in only or not module._qkv_same_embed_dim:
            return

        def hook(mod, args, kwargs):
            inputs = list(args[:3]) + [kwargs[k] for k in ("query", "key", "value") if k in kwargs]
            seen = []
            for x in inputs:
                if isinstance(x, torch.Tensor) and not x.is_nested \
                        and not any(x is y for y in seen):
                    seen.append(x)
                    rows = x.transpose(0, 1) if not mod.batch_first and x.dim() == 3 else x
                    self._accumulate(name, self._rows(rows.detach()))

        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        rows = token_rows(x, self.mask, self._index)
        if self.clip is not None and rows.shape[0]:  # massive activations: norm <= factor·median
            norms = rows.float().norm(dim=-1)
            limit = self.clip * norms.median()
            rows = rows * (limit / norms.clamp(min=1e-30)).clamp(max=1).to(rows.dtype)[:, None]
        return rows

    def _linear(self, name):
        def hook(module, args):
            self._accumulate(name, self._rows(args[0].detach()), share=True)
        return hook

    def _linear_output(self, name):
        def hook(module, args, output):
            if not isinstance(output, torch.Tensor):  # a subclass of its own: no statistics
                return
            # W·x, the product whitening weights (the output's own precision: a bf16 pass's
            # output gives the same held-out error at SmolLM2's down_proj ranks, to 1e-5)
            rows = self._rows(output.detach()).float()
            if module.bias is not None:
                rows = rows - module.bias.detach().float()
            self._accumulate(name, rows)
        return hook

    def _embedding(self, name, module):
        def hook(mod, args):
            ids = args[0].detach()
            if ids.is_floating_point() or (ids.numel() and int(ids.max()) >= mod.num_embeddings):
                return  # not row indices
            ids = ids[self.mask] if self.mask is not None and ids.shape == self.mask.shape else ids
            counts = torch.bincount(ids.reshape(-1).to(self.device),
                                    minlength=module.num_embeddings).double()
            s = self.stats.token_counts
            s[name] = s[name] + counts if name in s else counts
        return hook

    def remove(self):
        self.last, self.pending, self.scratch = None, {}, {}
        for h in self.handles:
            h.remove()
