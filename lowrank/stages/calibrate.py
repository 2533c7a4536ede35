"""Calibration: activation statistics of a model on sample text, through forward hooks.

For every Linear the input Gram matrix G = Σ x xᵀ over real (non-padding) tokens, in float64,
streamed over batches (for one with fewer outputs than inputs, the output Gram W·G·Wᵀ instead:
``output_grams``), plus Σ|x| for activation-scaling (method "scale"); for every Embedding
the count of each row looked up. A Conv1d/Conv2d's rows are its input patches (unfolded to
in·kernel columns, the layout of its factored matrix); an LSTM/GRU/RNN's weight_ih_l{k} sees
its layer's inputs and weight_hh_l{k} the previous hidden states, traced by re-running the
recurrence on the dense weights (:func:`lowrank.nn.recurrent.dense_rnn_forward`; padding is not
masked there). These drive data-aware factorization (:mod:`lowrank.weighting`): truncating W G^½
instead of W keeps the layer's *outputs* on this data as well as rank r allows.

With ``method="kfac"`` each batch also runs one backward pass of a sampled objective
(:mod:`lowrank.stages.fisher`) and collects each Linear's output-gradient Gram G_g = Σ g gᵀ for
two-sided whitening. ``outliers`` keeps a few tokens with massive activations (the first
position of LLaMA-family LMs, an attention sink) from dominating the input Grams.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..device import autocast_dtype, check_pass_dtype, cpu_autocast, dtype_name, float64_device
from ..errors import InputError
from ..io.checkpoint import Checkpoint
from ..io.files import check_format, write_json
from ..io.safetensors import save_tensors
from ..io.samples import Samples, model_batches, num_samples
from ..linalg import gram_eigh
from ..models import Models, is_causal_lm, skip_output_head
from ..parallel import fixed_threads
from ..pipeline.stage import Context, Stage, Track, no_progress, register_stage
from ..weighting import METHODS, make_weighting, psd_root
from .calibration_text import calibration_data, top_up
from .fisher import OutputGradients, sampled_objective
from .recorder import Recorder
from .recover import RecoverSettings, loss_kind

STATS_FORMAT, STATS_VERSION = "lowrank.stats", 1
# Whitening roots (L·Lᵀ = G) and Gram eigenvectors kept for reuse (analyze, scores, factorize, and
# equal Grams such as query/key/value's): at most this many bytes, least recently used dropped
# first (recomputed when asked again), so a big model's factors do not all sit in memory at once.
WHITENING_MEMO_BYTES = 2 << 30
# ActivationStats.memo is read and written from the thread executor's pool threads too
# (lowrank.parallel): one lock for every memo's dict, and the keys being computed, so that two
# threads wanting the same eigensolve compute it once.
_MEMO_LOCK = threading.Lock()
_COMPUTING: dict[tuple, threading.Event] = {}
OUTLIERS = ("keep", "skip-first", "clip")


@dataclass(frozen=True)
class CalibrateSettings:
    # Text, one sample per line; None = the small text shipped with lowrank.
    calibration_file: str | None = None
    # Lines used: the first `samples` when set, else the first lines holding `tokens` tokens (a
    # tensor file: its first `samples` rows, else calibration_text.TENSOR_SAMPLES). MiniLM at
    # 50%, python_docs cosine 0.693 (256 Debian lines, 3,610 tokens) -> 0.785 (2,000 lines).
    samples: int | None = None
    tokens: int = 32768  # 256 lines of max_length tokens, what the old line default allowed
    # A causal LM's text with fewer than `tokens` tokens is topped up with text sampled from the
    # dense model (lowrank.sample_text), after its lines. SmolLM2 at 85%, 2,000 Debian lines
    # (24,163 tokens): perplexity / dense on python_docs 1.468x -> 1.385x, greedy repeated
    # 4-grams 0.37 -> 0.24, held-out Debian KL 0.162 -> 0.173 (reports/sampled-calibration.md).
    sampled_text: bool = True
    sampled_seed: int = 0  # the top-up's draws (lowrank.sample_text.SampleTextSettings.seed)
    # New tokens per sampled line (at most max_length): 64 halves 128's one-token steps (top-up
    # 25.4 -> 19.1 s), SmolLM2 85% the same over seeds 0-2 (reports/sampled-calibration.md).
    sampled_length: int = 64
    max_length: int = 128  # tokens per sample; longer samples are truncated
    # The last share of the lines joined into samples of up to max_length tokens: short lines
    # cover long inputs too (MiniLM 50%, python_docs kNN@10 0.606 -> 0.654; calibration-packing)
    pack: float = 0.25
    # Lines per pass, batched by length (compensation's too): 16 took SmolLM2's calibration
    # 54-61 s instead of 41-42 s (64 Debian lines are ~770 tokens, GEMMs big enough for speed).
    batch_size: int = 64
    # How the statistics weight the SVD (lowrank.weighting): "whiten" (output error), "kfac"
    # (also the output-gradient Gram: Fisher-weighted error) or "scale" (ASVD: mean|x|^alpha).
    method: str = "whiten"
    scale_alpha: float = 0.5
    # Added to every embedding row's count (rows weighted by √(count + s)): unseen rows still
    # count. 0.1, not 1: MiniLM at 50%, cosine on python_docs 0.764 -> 0.779 (README).
    token_smoothing: float = 0.1
    # kfac: G_g <- (1 - s)·G_g + s·(tr G_g / n)·I; labels "sampled" from the model (the true
    # Fisher) or the "real" next tokens (the empirical Fisher; causal LMs only).
    kfac_shrinkage: float = 0.05
    kfac_labels: str = "sampled"
    # Backward passes on the first N samples only (with shrinkage, fewer tokens do)
    kfac_samples: int = 64
    # Linear-input statistics: "keep" every token, "skip-first" drop each sequence's first
    # token, or "clip" each token's input norm at outlier_factor × the batch's median norm.
    outliers: str = "keep"
    outlier_factor: float = 5.0
    # "whiten" without "clip": a Linear with fewer outputs than inputs records the Gram of W·x
    # (out²), not of x (in²): the same factors (lowrank.weighting); SmolLM2 42.5 -> 34.4 s.
    output_grams: bool = True
    # CPU forward passes autocast to this (lowrank.device.PASS_DTYPES; "auto": bf16 where the
    # CPU has it; kfac's float32; Grams float64 sums): SmolLM2 85%, 1.466x -> 1.468x dense
    # perplexity, calibrate 69 -> 56 s (reports/speed.md). The top-up samples in it too.
    forward_dtype: str = "auto"

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f"calibration method must be one of {', '.join(METHODS)}, "
                             f"got {self.method!r}")
        if not 0 <= self.kfac_shrinkage <= 1:
            raise InputError(f"kfac shrinkage must be in [0, 1], got {self.kfac_shrinkage}")
        if self.kfac_labels not in ("sampled", "real"):
            raise InputError(f"kfac labels must be sampled or real, got {self.kfac_labels!r}")
        if self.outliers not in OUTLIERS or not self.outlier_factor >= 1:
            raise InputError(f"outliers must be one of {', '.join(OUTLIERS)} (outlier factor "
                             f">= 1), got {self.outliers!r}")
        check_pass_dtype(self.forward_dtype, "calibration forward_dtype")
        if not isinstance(self.pack, (int, float)) or not 0 <= self.pack <= 1:
            raise InputError(f"calibration pack must be in [0, 1], got {self.pack}")
        counts = (self.tokens, self.max_length, self.sampled_length, self.batch_size,
                  self.kfac_samples, 1 if self.samples is None else self.samples)
        if not all(isinstance(n, int) and n >= 1 for n in counts):
            raise InputError("calibration samples, tokens, max_length, sampled_length, "
                             "batch_size and kfac_samples must be whole numbers >= 1")
        if not (isinstance(self.sampled_seed, int) and self.sampled_seed >= 0):
            raise InputError(f"calibration sampled_seed must be a whole number >= 0, "
                             f"got {self.sampled_seed!r}")

    def pass_dtype(self, device: str | None = None) -> torch.dtype:  # forward_dtype resolved
        return torch.float32 if self.method == "kfac" else autocast_dtype(self.forward_dtype, device)


@dataclass
class ActivationStats:
    """The calibrate stage's artifact, keyed by weight name (``<module>.weight``)."""

    grams: dict[str, torch.Tensor] = field(default_factory=dict)  # Σ x xᵀ, float64 (in × in)
    # Σ (Wx)(Wx)ᵀ, float64 (out × out), instead of Σ x xᵀ (see CalibrateSettings.output_grams)
    output_grams: dict[str, torch.Tensor] = field(default_factory=dict)
    # Σ |x|, float64 (in,); collected for method "scale" only, the one weighting that reads it
    abs_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    token_counts: dict[str, torch.Tensor] = field(default_factory=dict)  # rows looked up (num,)
    out_grams: dict[str, torch.Tensor] = field(default_factory=dict)  # kfac: Σ g gᵀ (out × out)
    tokens: int = 0  # real tokens seen
    samples: int = 0
    sampled_lines: list[str] = field(default_factory=list)  # the text's top-up, in samples
    causal_lm: bool | None = None  # the model's kind (None: statistics saved before it was kept)
    settings: CalibrateSettings = CalibrateSettings()
    # {(kind, content key, device): a root of G, or a Gram's eigenvalues and eigenvectors}:
    # each is computed once per run (see whitening_factor, gram_eigh).
    memo: OrderedDict = field(default_factory=OrderedDict, repr=False, compare=False)
    # {tensor name: the memo key of the eigh that analysis computed for its weighted matrix}
    analyzed: dict = field(default_factory=dict, repr=False, compare=False)
    # Weights stored (in, out) (GPT-2's Conv1D): their Gram is of the rows of the stored
    # tensor, the columns of the (out, in) matrix that is factored (lowrank.naming).
    transposed: set[str] = field(default_factory=set)

    def weighting(self, name: str, cols: int, device: str | None = None):
        """The data-aware weighting of tensor ``name`` (None: no data seen, use plain SVD);
        its root computed on ``device`` (float64 work: CPU for MPS), returned on CPU."""
        s = self.settings
        return make_weighting(name, self, s.method, s.scale_alpha, s.token_smoothing, cols,
                              root=lambda g: self.whitening_factor(g, device),
                              shrinkage=s.kfac_shrinkage)

    def whitening_factor(self, gram: torch.Tensor, device: str | None = None) -> torch.Tensor:
        """A root of ``gram`` (:func:`lowrank.weighting.psd_root`), memoized by content: analysis
        and factorization of one run, and layers fed the same input (query, key and value),
        share one. Hashing G reads n² numbers; the factorization it saves costs ~n³/3. One
        torch thread, like the per-matrix tasks beside it (:func:`lowrank.parallel.fixed_threads`):
        the same bytes whichever thread asks, and no OpenMP oversubscription while the tasks
        run."""
        where = float64_device(device)

        def compute():
            with fixed_threads():
                return psd_root(gram, where)
        return self._memoized(("root", _digest(gram), where), compute)

    def gram_eigh(self, x: torch.Tensor,
                  name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`lowrank.linalg.gram_eigh` of ``x`` (a weighted matrix's short side), memoized
        by content like :meth:`whitening_factor`: analysis's spectrum, the scores stage's
        factors and factorization's truncated ones come from one eigensolve per
        matrix. Kept on CPU. ``name``: ``x`` is checkpoint tensor ``name`` under this
        weighting (analysis), found again by :meth:`analyzed_eigh`."""
        key = ("eigh", _digest(x), str(x.device))
        values, vectors = self._memoized(key, lambda: tuple(t.cpu() for t in gram_eigh(x)))
        if name is not None:
            self.analyzed[name] = key
        return values.to(x.device), vectors.to(x.device)

    def analyzed_eigh(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The (eigenvalues, eigenvectors) analysis computed for checkpoint tensor ``name``'s
        weighted matrix, if still memoized: found by name, without forming and hashing that
        matrix again."""
        key = self.analyzed.get(name)
        with _MEMO_LOCK:
            value = self.memo.get(key) if key is not None else None
            if value is not None:
                self.memo.move_to_end(key)
        return value

    def gram_eigenvectors(self, x: torch.Tensor) -> torch.Tensor:
        return self.gram_eigh(x)[1]

    def _memoized(self, key: tuple, compute):
        """The memo's value for ``key``, else ``compute()``'s, kept (least recently used
        values dropped beyond WHITENING_MEMO_BYTES). Thread-safe; a key is computed by one
        thread at a time, others wanting it wait for its value."""
        flight = (id(self.memo), key)
        while True:
            with _MEMO_LOCK:
                if key in self.memo:
                    self.memo.move_to_end(key)
                    return self.memo[key]
                other = _COMPUTING.get(flight)
                if other is None:
                    mine = _COMPUTING[flight] = threading.Event()
                    break
            other.wait()  # then look again (its value, or compute it if that one failed)
        try:
            value = compute()
            with _MEMO_LOCK:
                self.memo[key] = value
                held = sum(map(_nbytes, self.memo.values()))
                while held > WHITENING_MEMO_BYTES and len(self.memo) > 1:
                    held -= _nbytes(self.memo.popitem(last=False)[1])
        finally:
            with _MEMO_LOCK:
                del _COMPUTING[flight]
            mine.set()
        return value

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for kind, d in self._kinds().items():
            out.update({f"{kind}:{name}": t.contiguous() for name, t in d.items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], tokens: int, samples: int,
                     settings: CalibrateSettings):
        stats = cls(tokens=tokens, samples=samples, settings=settings)
        target = stats._kinds()
        for key, t in tensors.items():
            kind, name = key.split(":", 1)
            target[kind][name] = t
        return stats

    def _kinds(self) -> dict[str, dict[str, torch.Tensor]]:  # the stats file's key prefixes
        return {"gram": self.grams, "ygram": self.output_grams, "abs": self.abs_sums,
                "count": self.token_counts, "ograd": self.out_grams}


def _nbytes(value: torch.Tensor | tuple) -> int:
    return sum(t.nbytes for t in (value if isinstance(value, tuple) else (value,)))


def _digest(t: torch.Tensor) -> tuple:
    """A content key for a tensor: its bytes' hash, shape and dtype. SHA-256: twice BLAKE2b's
    speed with SHA instructions (1.8 vs 0.9 GB/s), and every weighted matrix is hashed."""
    data = t.detach().cpu().contiguous().view(torch.uint8).numpy()
    return hashlib.sha256(data.data).digest(), tuple(t.shape), str(t.dtype)


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
    all); the statistics come back on CPU. ``kfac`` adds one backward pass per batch."""
    stats = ActivationStats(samples=num_samples(data), settings=settings)
    recorder = Recorder(model, stats, only, device)
    kfac = settings.method == "kfac"
    gradients = OutputGradients(model, stats.out_grams, only, recorder.device) if kfac else None
    kind = loss_kind(RecoverSettings(), model) if kfac else None
    gen = torch.Generator().manual_seed(0)  # the sampled labels / noise
    trainable = [p for p in model.parameters() if p.requires_grad]
    done = 0
    # Only the layers' inputs are needed, not the logits: unless kfac differentiates them or a
    # seq2seq model's loss (seq2seq_inputs' labels) reads them.
    skip_head = not kfac and not getattr(getattr(model, "config", None), "is_encoder_decoder",
                                         False)
    dtype = settings.pass_dtype(device)
    try:
        for p in trainable:  # gradients of the outputs only, not of the weights
            p.requires_grad_(False)
        with torch.inference_mode(not kfac), skip_output_head(model, skip_head), \
                cpu_autocast(dtype):
            # kfac's backward passes take the first samples: keep them in file order
            for inputs, mask in model_batches(data, tokenizer, settings.batch_size,
                                              settings.max_length, device, by_length=not kfac):
                recorder.mask = mask
                first = next(iter(inputs.values()))
                stats.tokens += int(mask.sum()) if mask is not None else first.shape[0]
                backward = gradients is not None and done < settings.kfac_samples
                if backward:
                    gradients.mask = recorder.mask
                with torch.set_grad_enabled(backward):
                    out = model(**seq2seq_inputs(model, inputs, mask),
                                **({"output_hidden_states": True} if kind == "hidden" else {}))
                if backward:
                    real = inputs.get("input_ids") if settings.kfac_labels == "real" else None
                    objective, _ = sampled_objective(out, mask, kind, gen, real)
                    if objective.requires_grad:
                        objective.backward()
                del out
                done += first.shape[0]
                if on_batch:
                    on_batch(f"{done} samples")
        recorder.flush()
    finally:
        recorder.remove()
        if gradients is not None:
            gradients.remove()
        for p in trainable:
            p.requires_grad_(True)
    for d in stats._kinds().values():
        d.update({k: v.cpu() for k, v in d.items()})
    return stats


def calibrate(ckpt: Checkpoint, settings: CalibrateSettings = CalibrateSettings(),
              factory=None, device: str | None = None,
              track: Track = no_progress) -> ActivationStats:
    """Activation statistics of ``ckpt``'s dense model on the calibration text (or tensors),
    a causal LM's topped up with sampled text (:func:`.calibration_text.top_up`); ``factory``
    builds the model of a non-HF checkpoint (:data:`lowrank.models.ModelFactory`); the forward
    passes run on ``device`` (:mod:`lowrank.device`; CPU when None); ``track`` shows progress.

    Example:
        >>> stats = calibrate(open_checkpoint("all-MiniLM-L6-v2/"))  # doctest: +SKIP
        >>> stats.grams["encoder.layer.0.attention.self.query.weight"].shape  # doctest: +SKIP
        torch.Size([384, 384])
    """
    return calibrate_models(Models(ckpt, factory), settings, device, track)


def calibrate_models(models: Models, settings: CalibrateSettings, device: str | None = None,
                     track: Track = no_progress) -> ActivationStats:
    """:func:`calibrate` of the model that ``models`` builds."""
    model, tokenizer, data = calibration_data(models, settings)
    model = model.to(device or "cpu")
    sampled = top_up(model, tokenizer, data, settings, track)
    data = data + sampled if sampled else data
    with track("calibrate", -(-num_samples(data) // settings.batch_size)) as advance:
        stats = collect_stats(model, tokenizer, data, settings, advance, device=device)
    stats.sampled_lines, stats.causal_lm = sampled, is_causal_lm(model)
    return stats


def save_stats(stats: ActivationStats, directory: Path) -> None:
    save_tensors(directory / "stats.safetensors", stats.to_tensors())
    write_json(directory / "stats.json", {"format": STATS_FORMAT, "version": STATS_VERSION,
                                          "tokens": stats.tokens, "samples": stats.samples,
                                          "transposed": sorted(stats.transposed),
                                          "sampled_lines": stats.sampled_lines,
                                          "causal_lm": stats.causal_lm,
                                          "settings": asdict(stats.settings)})


def load_stats(directory: Path) -> ActivationStats:
    meta = check_format(json.loads((directory / "stats.json").read_text()), STATS_FORMAT,
                        STATS_VERSION, directory / "stats.json")
    stats = ActivationStats.from_tensors(load_file(str(directory / "stats.safetensors")),
                                         meta["tokens"], meta["samples"],
                                         CalibrateSettings(**{"pack": 0, **meta["settings"]}))
    stats.transposed = set(meta.get("transposed", []))
    stats.sampled_lines, stats.causal_lm = meta.get("sampled_lines", []), meta.get("causal_lm")
    return stats


def _run(ctx: Context, settings: CalibrateSettings) -> ActivationStats:
    return calibrate_models(ctx.models, settings, ctx.device, ctx.track)


register_stage(Stage("calibrate", (), CalibrateSettings, _run, save_stats, load_stats,
                     on_device=True, resolved=lambda settings, device, used: {
                         "forward_dtype": dtype_name(settings.pass_dtype(device))}))
