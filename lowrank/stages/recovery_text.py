"""What recovery trains on: the training file's lines (or tensor rows), text sampled from a
causal LM when asked for (the calibration's top-up and lines of its own), and, for a chat model,
transcripts of its own replies."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from ..io.samples import Samples, read_calibration
from ..models import is_causal_lm
from ..sample_text import SampleTextSettings, sample_replies, sample_text

if TYPE_CHECKING:
    from .recover import RecoverSettings

# The most training lines read by default (``samples`` None): 4,096 or 8,192 distinct lines
# instead of 2,000 did no better on SmolLM2 or MiniLM (reports/quality-smollm2-recovery.md).
MAX_SAMPLES = 4096
CHAT_BATCH = 128  # replies sampled together: a one-token step pays its Python overhead per batch
# The top-up pays once training has time for it (reports/chat-recovery.md; SmolLM2, python_docs
# KL / held-out Debian KL): with 6.5 minutes at 85% 0.364 -> 0.351 / 0.144 -> 0.147, at 70%
# (seeds 0, 1) 0.880 -> 0.862 and 0.892 -> 0.864 / +0.005 and +0.004; with 3 minutes at 85%
# 0.371 -> 0.369 / 0.148 -> 0.158, a loss.
SAMPLED_TEXT_MINUTES = 6.0
SAMPLED_LENGTH = 64  # new tokens a line, as calibration's top-up (CalibrateSettings.sampled_length)


def training_data(settings: RecoverSettings, sampled: list[str] = ()) -> tuple[Samples, list]:
    """``settings.calibration_file``'s samples (the bundled text when None) with the
    ``sampled`` lines after them, and those lines (none for tensor samples, which take no text).
    """
    asked = settings.samples is not None
    data = read_calibration(settings.calibration_file, settings.samples if asked else MAX_SAMPLES,
                            warn=asked, purpose="recovery")
    sampled = list(sampled) if isinstance(data, list) else []
    return (data + sampled if sampled else data), sampled


def uses_sampled_text(settings: RecoverSettings) -> bool:
    """``settings.sampled_text``; None: whether training has a time budget (no fixed step
    count) of SAMPLED_TEXT_MINUTES or more."""
    if settings.sampled_text is not None:
        return settings.sampled_text
    return settings.steps is None and settings.minutes >= SAMPLED_TEXT_MINUTES


def sampled_lines(settings: RecoverSettings, calibrate) -> list[str]:
    """The calibration's top-up, when recovery uses it (:func:`uses_sampled_text`) and
    trains on the calibration file."""
    if not uses_sampled_text(settings) or calibrate is None:
        return []
    ours, theirs = settings.calibration_file, calibrate.settings.calibration_file
    same = ours == theirs or (ours is not None and theirs is not None
                              and Path(ours).resolve() == Path(theirs).resolve())
    return calibrate.sampled_lines if same else []


def writes_text(teacher: nn.Module, tokenizer, data) -> bool:
    """Whether ``teacher`` can write more of ``data``: text lines, a tokenizer, a causal LM."""
    return isinstance(data, list) and tokenizer is not None and is_causal_lm(teacher)


# RecoverSettings.sampled_tokens 24,576 against 0 (reports/chat-recovery.md, "More of the model's
# own text"; SmolLM2, 6.5 minutes): at 70%, seeds 0/1/2, python_docs perplexity / dense 2.007x /
# 1.997x / 2.028x -> 1.967x / 1.986x / 1.953x, held-out Debian KL +0.013 to +0.015 (a trade); at
# 85%, seeds 0/1, python_docs the same, Debian KL +0.013 and +0.014 (a loss): the default is 0.
def more_sampled_text(teacher: nn.Module, tokenizer, data, settings: RecoverSettings) -> list[str]:
    """``settings.sampled_tokens`` new tokens sampled from ``teacher`` in lines of SAMPLED_LENGTH
    (:func:`lowrank.sample_text.sample_text`; draws seeded by ``settings.seed`` + 1, unlike the
    calibration top-up's default seed 0), when recovery uses sampled text
    (:func:`uses_sampled_text`); [] for tensors or a model that does not generate."""
    if not (uses_sampled_text(settings) and settings.sampled_tokens
            and writes_text(teacher, tokenizer, data)):
        return []
    return sample_text(teacher, tokenizer, SampleTextSettings(
        tokens=settings.sampled_tokens, length=SAMPLED_LENGTH, seed=settings.seed + 1,
        dtype=settings.dtype))


def chat_transcripts(teacher: nn.Module, tokenizer, data, settings: RecoverSettings) -> list[str]:
    """The first ``settings.chat`` lines of ``data`` as user turns with ``teacher``'s sampled
    replies (:func:`lowrank.sample_text.sample_replies`), each line cut to leave its reply room
    within ``max_length``; [] for tensors, without a chat template, or for a model that does
    not generate."""
    if not (settings.chat and writes_text(teacher, tokenizer, data)
            and getattr(tokenizer, "chat_template", None)):
        return []
    empty = tokenizer.apply_chat_template([{"role": "user", "content": ""}],
                                          add_generation_prompt=True, tokenize=False)
    room = max(8, settings.max_length - settings.chat_length
               - len(tokenizer(empty, add_special_tokens=False)["input_ids"]))
    prompts = [tokenizer.decode(tokenizer(line, add_special_tokens=False, truncation=True,
                                          max_length=room)["input_ids"])
               for line in data[:settings.chat]]
    return sample_replies(teacher, tokenizer, prompts,
                          SampleTextSettings(length=settings.chat_length, batch_size=CHAT_BATCH,
                                             seed=settings.seed, dtype=settings.dtype))


def teacher_text(teacher: nn.Module, tokenizer, data, settings: RecoverSettings
                 ) -> tuple[list[str], list[str]]:
    """What ``teacher`` writes for recovery to train on besides ``data``: chat transcripts
    (:func:`chat_transcripts`) and more sampled lines (:func:`more_sampled_text`)."""
    return (chat_transcripts(teacher, tokenizer, data, settings),
            more_sampled_text(teacher, tokenizer, data, settings))
