"""Calibration: activation statistics of a model on sample text, through forward hooks.

For every Linear the input Gram matrix G = Σ x xᵀ over real (non-padding) tokens, in float64,
streamed over batches, plus Σ|x| for activation-scaling; for every Embedding the count of each
row looked up. A Conv1d/Conv2d's rows are its input patches (unfolded to in·kernel columns,
the layout of its factored matrix); an LSTM/GRU/RNN's weight_ih_l{k} sees its layer's inputs
and weight_hh_l{k} the previous hidden states, traced by re-running the recurrence on the dense
weights (:func:`lowrank.nn.recurrent.dense_rnn_forward`; padding is not masked there). These drive
data-aware factorization (:mod:`lowrank.linalg`): truncating W G^½ instead of W keeps the
layer's *outputs* on this data as well as rank r allows.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ..device import float64_device
from ..errors import InputError
from ..io.checkpoint import Checkpoint
from ..io.files import check_format, write_json
from ..io.safetensors import save_tensors
from ..io.samples import Samples, model_batches, num_samples, read_calibration
from ..linalg import METHODS, gram_eigenvectors, make_weighting, psd_sqrt
from ..models import Models, model_ties
from ..naming import IN_PROJ, weight_name
from ..nn.layers import is_transposed, plain_lookup
from ..nn.recurrent import dense_rnn_forward
from ..pipeline.stage import Context, Stage, register_stage

STATS_FORMAT, STATS_VERSION = "lowrank.stats", 1
# Whitening factors G^½ and Gram eigenvectors kept for reuse (analyze, scores, factorize, and
# equal Grams such as query/key/value's): at most this many bytes, least recently used dropped
# first (recomputed when asked again), so a big model's factors do not all sit in memory at once.
WHITENING_MEMO_BYTES = 2 << 30


@dataclass(frozen=True)
class CalibrateSettings:
    # Text, one sample per line; None = the small text shipped with lowrank.
    calibration_file: str | None = None
    samples: int = 256  # lines used (the first N)
    max_length: int = 128  # tokens per sample; longer samples are truncated
    batch_size: int = 16
    # How the statistics weight the SVD (lowrank.data_aware): "whiten" (optimal output error)
    # or "scale" (ASVD-style, input channels scaled by mean|x|^scale_alpha).
    method: str = "whiten"
    scale_alpha: float = 0.5
    token_smoothing: float = 1.0  # added to every embedding row's count: unseen rows still count

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f"calibration method must be one of {', '.join(METHODS)}, "
                             f"got {self.method!r}")
        if self.samples < 1 or self.max_length < 1 or self.batch_size < 1:
            raise InputError("calibration samples, max_length and batch_size must be >= 1")


@dataclass
class ActivationStats:
    """The calibrate stage's artifact, keyed by weight name (``<module>.weight``)."""

    grams: dict[str, torch.Tensor] = field(default_factory=dict)  # Σ x xᵀ, float64 (in × in)
    abs_sums: dict[str, torch.Tensor] = field(default_factory=dict)  # Σ |x|, float64 (in,)
    token_counts: dict[str, torch.Tensor] = field(default_factory=dict)  # rows looked up (num,)
    tokens: int = 0  # real tokens seen
    samples: int = 0
    settings: CalibrateSettings = CalibrateSettings()
    # {(kind, content key, device): G^½ or Gram eigenvectors}: each eigh runs once per run
    # (see whitening_factor, gram_eigenvectors).
    memo: OrderedDict = field(default_factory=OrderedDict, repr=False, compare=False)
    # Weights stored (in, out) (GPT-2's Conv1D): their Gram is of the rows of the stored
    # tensor, the columns of the (out, in) matrix that is factored (lowrank.naming).
    transposed: set[str] = field(default_factory=set)

    def weighting(self, name: str, cols: int, device: str | None = None):
        """The data-aware weighting of tensor ``name`` (None: no data seen, use plain SVD);
        G^½ computed on ``device`` (float64 work: CPU for MPS), returned on CPU."""
        s = self.settings
        return make_weighting(name, self, s.method, s.scale_alpha, s.token_smoothing, cols,
                              sqrt=lambda g: self.whitening_factor(g, device))

    def whitening_factor(self, gram: torch.Tensor, device: str | None = None) -> torch.Tensor:
        """G^½ of ``gram``, memoized by content: analysis and factorization of one run, and
        layers fed the same input (query, key and value), share one eigendecomposition.
        Hashing G reads n² numbers; the eigh it saves costs ~n³."""
        where = float64_device(device)
        return self._memoized(("sqrt", _digest(gram), where), lambda: psd_sqrt(gram, where))

    def gram_eigenvectors(self, x: torch.Tensor) -> torch.Tensor:
        """:func:`lowrank.linalg.gram_eigenvectors` of ``x`` (a weighted matrix's short side),
        memoized by content like :meth:`whitening_factor`: the scores stage's full-rank factors
        and factorization's truncated ones come from one eigensolve per matrix. Kept on CPU."""
        vecs = self._memoized(("eigh", _digest(x), str(x.device)),
                              lambda: gram_eigenvectors(x).cpu())
        return vecs.to(x.device)

    def _memoized(self, key: tuple, compute) -> torch.Tensor:
        if key in self.memo:
            self.memo.move_to_end(key)
            return self.memo[key]
        value = self.memo[key] = compute()
        held = sum(t.numel() * t.element_size() for t in self.memo.values())
        while held > WHITENING_MEMO_BYTES and len(self.memo) > 1:
            _, dropped = self.memo.popitem(last=False)
            held -= dropped.numel() * dropped.element_size()
        return value

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for kind, d in (("gram", self.grams), ("abs", self.abs_sums), ("count", self.token_counts)):
            out.update({f"{kind}:{name}": t.contiguous() for name, t in d.items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], tokens: int, samples: int,
                     settings: CalibrateSettings):
        stats = cls(tokens=tokens, samples=samples, settings=settings)
        target = {"gram": stats.grams, "abs": stats.abs_sums, "count": stats.token_counts}
        for key, t in tensors.items():
            kind, name = key.split(":", 1)
            target[kind][name] = t
        return stats


def _digest(t: torch.Tensor) -> tuple:
    """A content key for a tensor: its bytes' hash, shape and dtype."""
    data = t.detach().cpu().contiguous().view(torch.uint8).numpy()
    return hashlib.blake2b(data.data, digest_size=16).digest(), tuple(t.shape), str(t.dtype)


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


class _Recorder:
    """Forward hooks that accumulate statistics for named Linear, Embedding, Conv1d/2d and
    LSTM/GRU/RNN modules."""

    def __init__(self, model: nn.Module, stats: ActivationStats, only: set[str] | None = None,
                 device: str | None = None):
        self.stats, self.mask, self.handles = stats, None, []
        self.device = float64_device(device)  # where the float64 Grams accumulate
        # The last Linear input and its Gram/abs-sum terms: a layer fed the same input next
        # (query, key, value; gate, up) adds these instead of another GEMM.
        self.last: tuple | None = None
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
                if is_transposed(module):
                    stats.transposed.add(name)
                self.handles.append(module.register_forward_pre_hook(self._linear(name)))
            elif isinstance(module, nn.Embedding) and plain_lookup(module):
                self.handles.append(module.register_forward_pre_hook(
                    self._embedding(primary.get(name, name), module)))
            elif isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1 \
                    and module.padding_mode == "zeros":
                self.handles.append(module.register_forward_pre_hook(self._conv(name, module)))

    def _accumulate(self, name: str, x: torch.Tensor, share: bool = False) -> None:
        rows = x.reshape(-1, x.shape[-1]).to(self.device, torch.float64)
        last = self.last if share else None
        if last is not None and last[0].shape == rows.shape and torch.equal(last[0], rows):
            gram, abs_sum = last[1], last[2]  # the same values: the same terms, bit for bit
        else:
            gram, abs_sum = rows.T @ rows, rows.abs().sum(0)
            if share:  # our own copy: the model may change its input in place afterwards
                own = rows.clone() if rows.data_ptr() == x.data_ptr() else rows
                self.last = (own, gram, abs_sum)
        s = self.stats
        if name in s.grams:
            s.grams[name] += gram
            s.abs_sums[name] += abs_sum
        else:  # copies: the terms may be shared with the next layer
            s.grams[name], s.abs_sums[name] = gram.clone(), abs_sum.clone()

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
        # Padding tokens are not data: drop them when the leading dims are (batch, seq).
        if self.mask is not None and x.shape[:-1] == self.mask.shape:
            return x[self.mask]
        return x.reshape(-1, x.shape[-1])

    def _linear(self, name):
        def hook(module, args):
            self._accumulate(name, self._rows(args[0].detach()), share=True)
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
        self.last = None
        for h in self.handles:
            h.remove()


def seq2seq_inputs(model: nn.Module, inputs: dict, mask: torch.Tensor | None) -> dict:
    """An encoder-decoder model (T5, BART) needs decoder inputs too: the text is its own
    target (``labels``, padding ignored), from which the model makes the shifted decoder
    inputs — so the decoder's statistics come from the same tokens, same mask, as the
    encoder's. Other models: ``inputs`` unchanged."""
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False) or "input_ids" not in inputs \
            or "labels" in inputs or "decoder_input_ids" in inputs:
        return inputs
    labels = inputs["input_ids"].clone()
    if mask is not None:
        labels[~mask] = -100
    return {**inputs, "labels": labels}


def collect_stats(model: nn.Module, tokenizer, data: Samples, settings: CalibrateSettings,
                  on_batch=None, only: set[str] | None = None,
                  device: str | None = None) -> ActivationStats:
    """Run ``model`` (on ``device``, CPU when None) over ``data`` (text lines or input tensors)
    in batches and accumulate :class:`ActivationStats` (for the weights named in ``only``, or
    all); the statistics come back on CPU."""
    stats = ActivationStats(samples=num_samples(data), settings=settings)
    recorder = _Recorder(model, stats, only, device)
    done = 0
    try:
        with torch.inference_mode():
            for inputs, mask in model_batches(data, tokenizer, settings.batch_size,
                                              settings.max_length, device):
                recorder.mask = mask
                first = next(iter(inputs.values()))
                stats.tokens += int(mask.sum()) if mask is not None else first.shape[0]
                model(**seq2seq_inputs(model, inputs, mask))
                done += first.shape[0]
                if on_batch:
                    on_batch(f"{done} samples")
    finally:
        recorder.remove()
    for d in (stats.grams, stats.abs_sums, stats.token_counts):
        d.update({k: v.cpu() for k, v in d.items()})
    return stats


def calibrate(ckpt: Checkpoint, settings: CalibrateSettings = CalibrateSettings(),
              on_batch=None, factory=None, device: str | None = None) -> ActivationStats:
    """Activation statistics of ``ckpt``'s dense model on the calibration text (or tensors);
    ``factory`` builds the model of a non-HF checkpoint (:data:`lowrank.models.ModelFactory`);
    the forward passes run on ``device`` (:mod:`lowrank.device`; CPU when None).

    Example:
        >>> stats = calibrate(open_checkpoint("all-MiniLM-L6-v2/"))  # doctest: +SKIP
        >>> stats.grams["encoder.layer.0.attention.self.query.weight"].shape  # doctest: +SKIP
        torch.Size([384, 384])
    """
    data = read_calibration(settings.calibration_file, settings.samples)
    models = Models(ckpt, factory)
    model, tokenizer = models.runnable_model(need_tokenizer=isinstance(data, list))
    return collect_stats(model.to(device or "cpu"), tokenizer, data, settings, on_batch,
                         device=device)


def save_stats(stats: ActivationStats, directory: Path) -> None:
    save_tensors(directory / "stats.safetensors", stats.to_tensors())
    write_json(directory / "stats.json", {"format": STATS_FORMAT, "version": STATS_VERSION,
                                          "tokens": stats.tokens, "samples": stats.samples,
                                          "transposed": sorted(stats.transposed),
                                          "settings": asdict(stats.settings)})


def load_stats(directory: Path) -> ActivationStats:
    meta = check_format(json.loads((directory / "stats.json").read_text()), STATS_FORMAT,
                        STATS_VERSION, directory / "stats.json")
    stats = ActivationStats.from_tensors(load_file(str(directory / "stats.safetensors")),
                                         meta["tokens"], meta["samples"],
                                         CalibrateSettings(**meta["settings"]))
    stats.transposed = set(meta.get("transposed", []))
    return stats


def _run(ctx: Context, settings: CalibrateSettings) -> ActivationStats:
    batches = -(-settings.samples // settings.batch_size)
    with ctx.track("calibrate", batches) as advance:
        return calibrate(ctx.checkpoint, settings, advance, ctx.models.factory, ctx.device)


register_stage(Stage("calibrate", (), CalibrateSettings, _run, save_stats, load_stats,
                     on_device=True))
