"""Recovery: train small adapters on the factors by distillation from the dense model, then merge.

No labels: the dense model is the teacher, unlabeled text the data. The loss compares hidden
states (every layer, real tokens only, each layer's MSE normalized by the teacher's mean square)
for encoders, or the logits (KL divergence) when the model has an LM head. A model that is not
a transformers model (``--model-factory``) is compared on its output tensor (MSE normalized
by the teacher's mean square: ``outputs``).

Adapters act on the factors, never on A·B, so merging is exact and the rank stays the planned r:

- ``lora``: each factor F (A: out × r, B: r × in) gets F + (alpha/q)·up·down with up zero-init, so
  training starts at the compressed model. Stored in PEFT's layout, one adapter per factor viewed
  as a linear map (``<module>.B`` maps in → r, ``<module>.A`` maps r → out).
- ``orthogonal``: B gets B·R with R a block-diagonal orthogonal matrix (OFT-style, blocks of
  ``block_size``; ``torch.nn.utils.parametrizations.orthogonal``, starting at the identity).
  A rotation keeps each factor's singular values: a gentler, norm-preserving correction.
- ``factors``: A and B themselves are trained (no adapter files).

Biases and LayerNorm weights train too with ``train_norms`` (few parameters, no size change).
"""

from __future__ import annotations

import contextlib
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from ..device import autocast_dtype, check_pass_dtype, cpu_autocast, dtype_name, trained_attention
from ..errors import InputError, LowrankWarning
from ..io.samples import model_batches, num_samples, replace_tokens
from ..models import Models
from ..nn.adapters import ATTACHED, adapter_config, adapter_state, add_adapters_, merge_adapters_
from ..pipeline.stage import Context, Stage, register_stage
from .blockwise import blockwise_distill
from .budget import train_steps
from .distillation import distillation_loss
from .factored import LowRankCheckpoint, load_lowrank, save_lowrank
from .recovery_text import sampled_lines, teacher_text, training_data, uses_sampled_text

PROGRESS_UNITS = 1000  # the progress bar counts thousandths of the run (steps or time)

METHODS = ("auto", *ATTACHED)
# method "auto" by loss kind, 3 minutes (reports/recovery-method.md): MiniLM at 50% python_docs
# cosine LoRA 0.853, factors 0.865 (2 seeds); SmolLM2 at 85% perplexity / dense 1.340x, 1.376x.
METHODS_BY_LOSS = {"hidden": "factors", "logits": "lora", "outputs": "lora"}
# Measured on MiniLM at 50% (quality-minilm.md, recovery-method.md): adapters start at zero
# change and take a larger step; the factors themselves need a smaller one.
DEFAULT_LR = {"lora": 3e-3, "orthogonal": 3e-3, "factors": 3e-4}
# Causal LMs, LoRA: SmolLM2 at 85%, 3 minutes on Debian text, python_docs perplexity 1.43× dense
# at 3e-4, 1.59× at 3e-3 (reports/quality-smollm2-recovery.md); the others as above (unmeasured).
DEFAULT_LR_LM = {**DEFAULT_LR, "lora": 3e-4}
LOSSES = ("auto", "hidden", "logits", "outputs")
# mode "auto" by loss kind (reports/recovery-minutes.md): end-to-end beat block-wise in 3 minutes
# on MiniLM at 50% (cosine 0.725 vs 0.613), SmolLM2 at 85% (python_docs ppl 1.44x vs 1.46x).
MODES = {"logits": "end-to-end", "hidden": "end-to-end", "outputs": "end-to-end"}
# replace_share None by loss kind (reports/token-replacement.md): MiniLM at 50%, 520 LoRA steps,
# seeds 0/1: python_docs cosine 0.850/0.849 -> 0.853/0.850 at 0.15, held-out Debian the same
# (0.3 no better, 0.5 worse); SmolLM2 at 85%: python_docs the same, held-out Debian top-1 -0.010.
REPLACE_SHARES = {"hidden": 0.15, "logits": 0.0, "outputs": 0.0}


@dataclass(frozen=True)
class RecoverSettings:
    method: str = "auto"  # auto (METHODS_BY_LOSS) | lora | orthogonal | factors
    rank: int = 32  # LoRA rank q
    alpha: float = 32.0  # LoRA scale alpha/q
    block_size: int = 32  # orthogonal: size of R's diagonal blocks
    lr: float | None = None  # None: the measured default (DEFAULT_LR; causal LMs DEFAULT_LR_LM)
    # Training steps (per block in block-wise mode); None: as many as fit in `minutes`.
    steps: int | None = None
    minutes: float = 3.0  # wall-time budget of training (held-out loss measurements included)
    # end-to-end | blockwise (each block to match the dense block, then a short end-to-end pass
    # taking `final_share` of the budget) | auto (per model family, as measured: MODES)
    mode: str = "auto"
    final_share: float = 0.25
    batch_size: int = 32
    # A batch's padded tokens at most this many times those of batch_size median-length lines:
    # long samples among short ones (chat transcripts among Debian lines) train in smaller
    # batches, so no step outweighs the others many times over (a step's loss is weighted by
    # its share of tokens); text of even length keeps whole batches (the Debian lines: 768).
    batch_token_cap: float = 2.0
    max_length: int = 128
    seed: int = 0
    train_norms: bool = True  # also train biases and LayerNorm weights
    # hidden | logits | outputs | auto (LMs logits, other transformers hidden, else outputs)
    loss: str = "auto"
    # hidden: + this weight × (1 − cosine) of mean-pooled last hidden states (sentence embeddings)
    pooled_weight: float = 0.0
    # Each step, this share of the batch's real tokens (special tokens kept) replaced by tokens
    # of the same batch, for teacher and student alike (lowrank.io.samples.replace_tokens);
    # None: REPLACE_SHARES by loss kind.
    replace_share: float | None = None
    # Training text, one sample per line; None = the calibration text shipped with lowrank.
    calibration_file: str | None = None
    # Lines (or samples) to train on; None: all, up to recovery_text.MAX_SAMPLES, no warning.
    # More distinct lines beat more passes: 2,000 Debian lines instead of 1,024, 3 minutes:
    # SmolLM2 at 85% python_docs perplexity 1.437× → 1.409× dense, MiniLM at 50% 0.800 → 0.828.
    samples: int | None = None
    # Also train on a causal LM's own text: calibration's top-up (training on that file) and
    # `sampled_tokens` new tokens; None: with SAMPLED_TEXT_MINUTES or more (recovery_text).
    sampled_text: bool | None = None
    sampled_tokens: int = 0  # a trade of the training text's domain for others: recovery_text
    # For a tokenizer with a chat template, also train on the first `chat` lines as user turns
    # with the dense model's sampled replies (recovery_text.chat_transcripts): SmolLM2 at 85%
    # python_docs perplexity 1.312x -> 1.288x dense (seed 1: 1.326x -> 1.295x); at 70% it
    # answers chat prompts instead of ending its turn (reports/chat-recovery.md).
    chat: int = 64
    chat_length: int = 64  # new tokens per reply at most
    # What the end-to-end passes autocast to on CPU (lowrank.device.PASS_DTYPES; "auto": bf16
    # where the CPU multiplies it natively); adapters, optimizer and loss stay float32. 3 minutes,
    # 85%: SmolLM2 79 steps instead of 71, ppl / dense 1.376x against 1.374x; MiniLM no faster.
    dtype: str = "auto"

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f"recovery method must be one of {', '.join(METHODS)}, "
                             f"got {self.method!r}")
        if self.loss not in LOSSES:
            raise InputError(f"recovery loss must be one of {', '.join(LOSSES)}, "
                             f"got {self.loss!r}")
        if self.mode not in ("auto", "end-to-end", "blockwise"):
            raise InputError(f"recovery mode must be auto, end-to-end or blockwise, "
                             f"got {self.mode!r}")
        for name in ("chat", "sampled_tokens"):
            if getattr(self, name) < 0:
                raise InputError(f"recovery {name} must be >= 0, got {getattr(self, name)}")
        if min(self.rank, self.block_size, self.chat_length, self.batch_token_cap,
               1 if self.steps is None else self.steps,
               self.batch_size, 1 if self.samples is None else self.samples,
               self.max_length) < 1 or (self.lr is not None and self.lr <= 0) \
                or not self.minutes > 0:
            raise InputError("recovery rank, block_size, steps, batch_size, samples, max_length, "
                             "chat_length, minutes and lr must be positive, batch_token_cap "
                             ">= 1")
        check_pass_dtype(self.dtype, "recovery dtype")
        shares = (self.final_share, 0 if self.replace_share is None else self.replace_share)
        if not all(isinstance(x, (int, float)) and 0 <= x < 1 for x in shares):
            raise InputError("recovery final_share and replace_share must be in [0, 1), got "
                             f"{self.final_share} and {self.replace_share}")


@dataclass
class RecoveryLog:
    """What training did: the loss curve, the held-back loss before/after, adapter sizes, and
    the speed (tokens through the whole model per second; a block-wise step counts as 1/blocks
    of a token per token)."""

    settings: RecoverSettings
    mode: str = "end-to-end"
    losses: list[float] = field(default_factory=list)  # per end-to-end step, training batches
    heldout_before: float | None = None  # distillation loss on held-back samples
    heldout_after: float | None = None
    heldout_batches: int = 1  # batches held back for it (HELD_TOKENS)
    trainable_params: int = 0
    samples: int = 0  # lines (or tensor rows) trained on, the held-back batches included
    sampled_samples: int = 0  # of those, lines sampled from the model (top-up and recovery's)
    chat_samples: int = 0  # of those, chat transcripts (RecoverSettings.chat)
    seconds: float = 0.0
    steps: int = 0  # end-to-end steps
    block_steps: int = 0  # block-wise steps, all blocks together
    tokens: float = 0.0  # real tokens trained on, in whole-model passes
    pass_dtype: str = "float32"  # what the end-to-end passes ran in (settings.dtype resolved)
    train_seconds: float = 0.0
    blocks: list = field(default_factory=list)  # blockwise.BlockRecord per block

    def to_json(self) -> dict:
        every = max(1, len(self.losses) // 50)  # a readable curve, not every step
        return {"method": self.settings.method, "mode": self.mode,
                "settings": asdict(self.settings), "trainable_params": self.trainable_params,
                "samples": self.samples, "sampled_samples": self.sampled_samples,
                "chat_samples": self.chat_samples,
                "heldout_loss_before": self.heldout_before, "heldout_loss_after": self.heldout_after,
                "heldout_batches": self.heldout_batches,
                "loss_curve": [round(x, 6) for x in self.losses[::every]],
                "steps": self.steps, "block_steps": self.block_steps, "pass_dtype": self.pass_dtype,
                "tokens_per_second": round(self.tokens / self.train_seconds, 1)
                if self.train_seconds else None,
                "blocks": [b.to_json() for b in self.blocks], "seconds": round(self.seconds, 2)}


def loss_kind(settings: RecoverSettings, model: nn.Module) -> str:
    if settings.loss != "auto":
        return settings.loss
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):  # no hidden_states to ask for: compare outputs
        return "outputs"
    return "logits" if hasattr(model, "get_output_embeddings") and \
        model.get_output_embeddings() is not None else "hidden"


# Real tokens held back to measure the loss before and after training (which decides whether it
# is kept): on one batch (~380 tokens) SmolLM2 at 85%, seed 1, rose and threw 3 minutes away; on
# 1,024 it falls 0.161 -> 0.150, kept: python_docs 1.326x dense, not 1.370x (chat-recovery.md).
HELD_TOKENS = 1024

# Block-wise: at most this share of the block phase caches inputs and targets; the rest trains.
CACHE_SHARE = 1 / 3


def distill(student: nn.Module, teacher: nn.Module, tokenizer, data,
            settings: RecoverSettings = RecoverSettings(),
            on_step: Callable[[float, str], None] | None = None,
            device: str | None = None,
            clock: Callable[[], float] = time.perf_counter,
            started: float | None = None) -> RecoveryLog:
    """Attach the adapters of ``settings.method`` ("auto": METHODS_BY_LOSS) to ``student`` and
    train them to match ``teacher`` on ``data`` (text lines, or input tensors stacked on dim 0:
    see :func:`lowrank.calibrate.read_calibration`), both models on ``device`` (moved there;
    None: where they are). ``on_step(fraction done, text)`` reports progress. The first batches,
    HELD_TOKENS real tokens but at most a quarter of them, are held back to measure the loss
    per token before and after (one batch of tensor samples; trained on too when it is the only
    one).
    The adapters stay attached: read them with :func:`adapter_state`, then :func:`merge_adapters_`.
    ``started``: when the time budget began (``clock``'s time), if before this call.
    """
    start = clock() if started is None else started
    torch.manual_seed(settings.seed)
    if isinstance(data, list):
        data = list(data)
        random.Random(settings.seed).shuffle(data)
    else:
        perm = torch.randperm(num_samples(data), generator=torch.Generator().manual_seed(settings.seed))
        data = {k: v[perm] for k, v in data.items()}
    # Lines batched by length, then the batches shuffled: a batch pads little (the Debian
    # lines pad 12.3k real SmolLM2 tokens to 21.6k in random batches of 32, to 12.9k sorted).
    batches = list(model_batches(data, tokenizer, settings.batch_size, settings.max_length,
                                 device, by_length=True, token_cap=settings.batch_token_cap))
    random.Random(settings.seed).shuffle(batches)
    tokens = [int(m.sum()) if m is not None else 1 for _, m in batches]  # real tokens per batch
    # Held back: the first batches up to HELD_TOKENS real tokens, at most a quarter of them
    # (one batch of tensor samples: no mask to count tokens by).
    count, masked = 1, batches[0][1] is not None
    while masked and count < len(batches) // 4 and sum(tokens[:count]) < HELD_TOKENS:
        count += 1
    held, weights = batches[:count], tokens[:count]
    train, tokens = (batches[count:], tokens[count:]) if len(batches) > count else (batches, tokens)
    kind = loss_kind(settings, teacher)
    share = REPLACE_SHARES[kind] if settings.replace_share is None else settings.replace_share
    method = METHODS_BY_LOSS[kind] if settings.method == "auto" else settings.method
    settings = replace(settings, method=method, replace_share=share)  # as resolved: logged
    mode = MODES[kind] if settings.mode == "auto" else settings.mode
    teacher.eval()
    student.eval()  # no dropout: the target is the deterministic dense model
    dtype = autocast_dtype(settings.dtype, device)

    def run(model, inputs, grad):
        extra = {"output_hidden_states": True} if kind == "hidden" else {}
        kernel = trained_attention(device) if grad else contextlib.nullcontext()
        with torch.set_grad_enabled(grad), cpu_autocast(dtype), kernel:
            return model(**inputs, **extra)

    def heldout_loss() -> float:  # per token
        with torch.no_grad():
            return float(sum(weight * distillation_loss(run(student, b, False),
                                                        run(teacher, b, False), mask, kind,
                                                        settings.pooled_weight)
                             for (b, mask), weight in zip(held, weights)) / sum(weights))

    trainable = add_adapters_(student, settings)  # initialized on CPU: the same on any device
    if device is not None:  # Module.to moves parameters in place: `trainable` still holds them
        teacher.to(device)
        student.to(device)
    log = RecoveryLog(settings, mode,
                      trainable_params=sum(p.numel() for p in trainable),
                      samples=num_samples(data), pass_dtype=dtype_name(dtype),
                      heldout_batches=len(held))
    measured = clock()
    log.heldout_before = heldout_loss()
    eval_s = clock() - measured
    budget = settings.minutes * 60
    # What is left once the held-out loss is measured again at the end.
    seconds = max(0.0, start + budget - clock() - eval_s)
    lr = settings.lr or (DEFAULT_LR_LM if kind == "logits" else DEFAULT_LR)[settings.method]

    def progress(fraction: float, text: str) -> None:
        if on_step:
            on_step(min(1.0, (clock() - start) / budget) if settings.steps is None
                    else fraction, text)

    final_seconds, final_steps = seconds, settings.steps
    if mode == "blockwise":
        block_seconds = seconds * (1 - settings.final_share)
        used = train
        if settings.steps is None:  # cache as many batches as a share of the time allows
            forward_s = eval_s / (2 * len(held))
            used = train[:max(1, min(len(train), int(CACHE_SHARE * block_seconds
                                                     / (2 * forward_s))))]
        t0 = clock()
        log.blocks = blockwise_distill(
            student, teacher, used, trainable, lr, seconds=block_seconds, steps=settings.steps,
            on_step=lambda i, n, step, total, loss: progress(
                (1 - settings.final_share) * (i + step / total) / n, f"block {i} loss {loss:.4f}"),
            clock=clock)
        log.train_seconds += clock() - t0
        log.block_steps = sum(b.steps for b in log.blocks)
        log.tokens += sum(tokens[j % len(used)] for b in log.blocks
                          for j in range(b.steps)) / len(log.blocks)
        final_seconds = max(0.0, start + budget - clock() - eval_s)
        final_steps = None if settings.steps is None else \
            (settings.steps if settings.final_share else 0)
        if not settings.final_share:
            final_seconds = 0.0
    order = random.Random(settings.seed + 1)
    mean_tokens = sum(tokens) / len(tokens)
    special = torch.tensor(getattr(tokenizer, "all_special_ids", None) or [], dtype=torch.long)
    draws = torch.Generator().manual_seed(settings.seed)

    def step_loss(step: int) -> torch.Tensor:
        i = order.randrange(len(train)) if step >= len(train) else step
        batch, mask = train[i]
        batch = replace_tokens(batch, mask, share, special, draws)
        log.tokens += tokens[i]
        with torch.no_grad():
            target = run(teacher, batch, False)
        # × the batch's share of tokens: batched by length, every token still weighs the same
        return distillation_loss(run(student, batch, True), target, mask, kind,
                                 settings.pooled_weight) * (tokens[i] / mean_tokens)

    if final_steps or (final_steps is None and final_seconds > 0):
        t0 = clock()
        offset = 1 - settings.final_share if mode == "blockwise" else 0.0
        log.losses = train_steps(
            trainable, step_loss, lr, final_steps, final_seconds,
            lambda step, total, loss: progress(offset + (1 - offset) * step / total,
                                               f"step {step}/{total} loss {loss:.4f}"), clock)
        log.train_seconds += clock() - t0
        log.steps = len(log.losses)
    log.heldout_after = heldout_loss()
    log.seconds = clock() - start
    return log


def recover(factored: LowRankCheckpoint, models: Models,
            settings: RecoverSettings = RecoverSettings(),
            on_step: Callable[[float, str], None] | None = None,
            device: str | None = None, sampled: list[str] = ()) -> LowRankCheckpoint:
    """Distill the factored checkpoint toward the dense model on ``settings.calibration_file``
    (the bundled text when None) and the ``sampled`` lines (text, not tensors), and return it
    with the adapters merged into its factors (training on ``device``, None: CPU; the result on
    CPU), or as it was, with a warning, when training raised the held-back batches' loss.
    ``models`` builds the dense teacher and the student (:class:`lowrank.models.Models` of the
    dense checkpoint). LoRA adapters are also kept in the result and written as ``adapters/``.
    """
    data, sampled = training_data(settings, sampled)
    teacher, tokenizer = models.runnable_model(need_tokenizer=isinstance(data, list))
    started = time.perf_counter()  # sampling (replies, more text) is part of the time budget
    if device is not None:
        teacher.to(device)  # where distill trains it: sampling there too
    chats, more = teacher_text(teacher, tokenizer, data, settings)
    student = models.compressed(factored.tensors, factored.layers)
    log = distill(student, teacher, tokenizer, data + chats + more if chats or more else data,
                  settings, on_step, device, started=started)
    log.sampled_samples, log.chat_samples = len(sampled) + len(more), len(chats)
    if not log.heldout_after <= log.heldout_before:  # e.g. a few full-size steps on the factors
        warnings.warn(f"recovery raised the held-out loss ({log.heldout_before:.4g} -> "
                      f"{log.heldout_after:.4g}): the factors are kept as before", LowrankWarning)
        return replace(factored, metadata={"recovery": {**log.to_json(), "discarded": True}})
    student.to("cpu")
    adapters = adapter_state(student)
    # The adapters apply to the factored model before recovery, which has no path of its own.
    config = adapter_config(student, log.settings, None) if adapters else None
    state = merge_adapters_(student).state_dict()
    tensors = {k: state[k].detach().to(t.dtype).contiguous() if k in state else t
               for k, t in factored.tensors.items()}
    return LowRankCheckpoint(tensors, factored.layers, factored.params_before,
                             factored.settings, {"recovery": log.to_json()}, adapters, config)


def _run(ctx: Context, settings: RecoverSettings, factorize: LowRankCheckpoint,
         calibrate=None) -> LowRankCheckpoint:
    with ctx.track("recover", PROGRESS_UNITS) as advance:
        shown = [0]

        def progress(fraction: float, text: str) -> None:  # the bar counts ‰ of the run
            while shown[0] < min(PROGRESS_UNITS, int(fraction * PROGRESS_UNITS)):
                advance(text)
                shown[0] += 1

        return recover(factorize, ctx.models, settings, progress, ctx.device,
                       sampled_lines(settings, calibrate))


register_stage(Stage(
    "recover", ("factorize",), RecoverSettings, _run,
    save=save_lowrank, load=load_lowrank,
    emit=lambda artifact, out, ctx: save_lowrank(artifact, out, ctx.max_shard_bytes),
    uses=("calibrate",), provides="checkpoint", on_device=True,
    resolved=lambda settings, device, used: {
        "dtype": dtype_name(autocast_dtype(settings.dtype, device)),
        "sampled_text": uses_sampled_text(settings)},
))
