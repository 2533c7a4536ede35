"""Calibration text sampled from a causal LM itself ("self-calibration", Williams et al., NAACL
2025): sequences drawn from the dense model's own distribution, starting from a document
separator, one sequence a line. Text the model finds typical covers more of what it does than a
narrow user file. Calibration tops up a causal LM's text with it (CalibrateSettings.sampled_text):
SmolLM2-135M at 85%, 2,000 Debian package descriptions topped up to 32,768 tokens, keeps 1.40x
dense perplexity on python_docs paragraphs, against 1.47x on the Debian lines alone; the
sampled text alone gives 1.30x but is the worst on held-out Debian lines (README, "Text
sampled from the model"). ``lowrank sample MODEL FILE`` writes such a file.

:func:`sample_replies` samples a chat model's replies to given user turns instead: recovery
trains on them so that the compressed model still answers (lowrank.stages.recovery_text).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .device import autocast_dtype, check_pass_dtype
from .errors import InputError
from .io.files import atomic_write_text
from .models import is_causal_lm


@dataclass(frozen=True)
class SampleTextSettings:
    tokens: int = 32768  # new tokens in all: calibration's default token budget
    length: int = 128  # new tokens per line at most: calibration's max_length
    # Sequences generated together: 128 rows amortize each step's Python overhead (SmolLM2:
    # 32,768 tokens in 75 s; 118 s at 64 rows).
    batch_size: int = 128
    temperature: float = 1.0  # 1 and no top-k: the model's own distribution
    seed: int = 0
    start: str | None = None  # the first token; None: see start_token
    # The weights generation runs in (lowrank.device.PASS_DTYPES; calibration's top-up takes
    # its forward_dtype): "auto" is a bfloat16 copy (half the model's memory more) where the
    # CPU multiplies it natively, else the model as it is. Not autocast: it would recast each
    # weight at every one-token step.
    dtype: str = "auto"

    def __post_init__(self):
        if not all(isinstance(n, int) and n >= 1 for n in (self.tokens, self.length,
                                                           self.batch_size)):
            raise InputError("sampled text: tokens, length and batch size must be whole "
                             "numbers >= 1")
        if not self.temperature > 0:
            raise InputError(f"sampled text: temperature must be > 0, got {self.temperature}")
        check_pass_dtype(self.dtype, "sampled text dtype")

    @property
    def rows(self) -> int:  # sequences sampled
        return -(-self.tokens // self.length)

    @property
    def batches(self) -> int:
        return -(-self.rows // self.batch_size)


# The document separator between pretraining documents in the GPT-2, Qwen, StarCoder and SmolLM
# vocabularies. An instruct model's BOS can be a chat-turn marker instead (SmolLM2-Instruct:
# <|im_start|>), from which it samples chat transcripts: SmolLM2 at 85% calibrated on text
# sampled after <|endoftext|> keeps 1.30x dense perplexity on python_docs, 1.42x after BOS.
DOCUMENT_SEPARATOR = "<|endoftext|>"


def start_token(tokenizer, config=None, start: str | None = None) -> int:
    """The id every sampled sequence starts from: ``start`` (one token), else the vocabulary's
    ``<|endoftext|>`` document separator, else the tokenizer's BOS token, else its EOS token,
    else the model ``config``'s BOS token."""
    if start is not None:
        ids = tokenizer(start, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise InputError(f"sampled text: start {start!r} is {len(ids)} tokens, not one")
        return ids[0]
    for token in (tokenizer.get_vocab().get(DOCUMENT_SEPARATOR), tokenizer.bos_token_id,
                  tokenizer.eos_token_id, getattr(config, "bos_token_id", None)):
        if token is not None:
            return token
    raise InputError("sampled text: the tokenizer has no BOS or EOS token to start from; "
                     "give a start token")


class InverseCdfDraw:
    """A transformers logits processor that draws each row's next token from
    softmax(scores / temperature) by inverse CDF (a seeded uniform number looked up in the
    cumulative probabilities) and leaves only that token, so the greedy step after it picks the
    draw. The distribution of transformers' ``do_sample`` (torch.multinomial, slow on CPU for
    a large vocabulary): SmolLM2's top-up in 28.7 s instead of 40.4
    (benchmarks/sampling_speed.py)."""

    def __init__(self, temperature: float, generator: torch.Generator):
        self.temperature, self.generator = temperature, generator

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        cdf = torch.softmax(scores.float() / self.temperature, -1).cumsum_(-1)
        u = torch.rand(len(scores), 1, generator=self.generator).to(cdf.device) * cdf[:, -1:]
        # right=True: a token of probability 0 (an equal step of the CDF) is never drawn
        token = torch.searchsorted(cdf, u, right=True).clamp_(max=scores.shape[-1] - 1)
        return torch.full_like(scores, -math.inf).scatter_(1, token, 0.0)


def sampling_model(model: nn.Module, dtype: str) -> nn.Module:
    """``model``, or a copy of it in bfloat16 where ``dtype`` resolves to it on the model's
    device (:func:`lowrank.device.autocast_dtype`): SmolLM2's top-up in 25.4 s instead of 28.7
    (benchmarks/sampling_speed.py)."""
    if autocast_dtype(dtype, next(model.parameters()).device) != torch.bfloat16:
        return model
    return copy.deepcopy(model).to(torch.bfloat16)


def sampler_of(model: nn.Module, tokenizer, settings: SampleTextSettings):
    """A function that continues a batch (input ids, attention mask) with at most
    ``settings.length`` tokens drawn from causal LM ``model`` (rows end early at EOS): seeded
    with ``settings.seed`` (:class:`InverseCdfDraw`), in ``settings.dtype``'s weights
    (:func:`sampling_model`)."""
    from transformers import LogitsProcessorList

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    draw = LogitsProcessorList([InverseCdfDraw(settings.temperature,
                                               torch.Generator().manual_seed(settings.seed))])
    sampler = sampling_model(model, settings.dtype)

    def continued(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return sampler.generate(ids, attention_mask=mask, do_sample=False,
                                    logits_processor=draw, max_new_tokens=settings.length,
                                    min_new_tokens=1, pad_token_id=pad)
    return continued


def sample_text(model: nn.Module, tokenizer, settings: SampleTextSettings = SampleTextSettings(),
                on_batch=None) -> list[str]:
    """Lines of text sampled from causal LM ``model``: ⌈tokens / length⌉ sequences of at most
    ``length`` new tokens (a row ends early at EOS), decoded without special tokens, whitespace
    runs joined into single spaces (one sample per line). The same lines for the same model,
    settings and machine (:func:`sampler_of`)."""
    if not is_causal_lm(model):
        raise InputError("sampled text needs a causal LM (a model that generates); give a "
                         "calibration file for this model")
    first = start_token(tokenizer, getattr(model, "config", None), settings.start)
    rows = settings.rows
    device = next(model.parameters()).device
    lines: list[str] = []
    continued = sampler_of(model, tokenizer, settings)
    for begin in range(0, rows, settings.batch_size):
        n = min(settings.batch_size, rows - begin)
        ids = torch.full((n, 1), first, dtype=torch.long, device=device)
        out = continued(ids, torch.ones_like(ids))
        for text in tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True):
            if line := " ".join(text.split()):
                lines.append(line)
        if on_batch:
            on_batch(f"{begin + n} sequences")
    if not lines:
        raise InputError("sampled text: every sampled sequence was empty")
    return lines


def sample_replies(model: nn.Module, tokenizer, prompts: list[str],
                   settings: SampleTextSettings = SampleTextSettings()) -> list[str]:
    """Chat transcripts: each of ``prompts`` as a user turn in ``tokenizer``'s chat template,
    followed by the reply causal LM ``model`` samples to it (at most ``settings.length`` new
    tokens, up to and with its end-of-turn token), special tokens kept, one string each (with
    the template's newlines). Drawn as :func:`sample_text` draws; ``settings.tokens`` unused."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("chat replies need a tokenizer with a chat template")
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                           add_generation_prompt=True, tokenize=False)
             for p in prompts]
    end = tokenizer.eos_token_id
    continued = sampler_of(model, tokenizer, settings)
    device = next(model.parameters()).device
    transcripts: list[str] = []
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # replies start together
    try:
        for begin in range(0, len(texts), settings.batch_size):
            batch = tokenizer(texts[begin:begin + settings.batch_size], padding=True,
                              add_special_tokens=False, return_tensors="pt").to(device)
            out = continued(batch["input_ids"], batch["attention_mask"])
            width = batch["input_ids"].shape[1]
            for row, mask in zip(out.tolist(), batch["attention_mask"].tolist()):
                reply = row[width:]
                if end in reply:
                    reply = reply[:reply.index(end) + 1]
                prompt = [t for t, real in zip(row[:width], mask) if real]
                transcripts.append(tokenizer.decode(prompt + reply))
    finally:
        tokenizer.padding_side = side
    return transcripts


def write_sample_text(lines: list[str], path: str | Path) -> None:
    """One line each, written to a temporary file and renamed: no half-written FILE."""
    atomic_write_text(Path(path), "\n".join(lines) + "\n")
