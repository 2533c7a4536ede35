"""Sample files for calibration, recovery and evaluation: text (one sample per line) or, for
non-text models, a safetensors/.pt file of input tensors stacked on dim 0."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch

from ..errors import InputError, LowrankWarning, first_line

# Small texts shipped with lowrank, disjoint (lowrank/data/README.md): calibrate, then evaluate.
DEFAULT_CALIBRATION = Path(__file__).parents[1] / "data" / "calibration.txt"


def read_calibration_text(path: str | Path | None, samples: int | None, warn: bool = True,
                          purpose: str = "calibration") -> list[str]:
    """Non-empty lines of ``path`` (the bundled text when None), at most ``samples`` of them
    (None: all)."""
    path = Path(path) if path else DEFAULT_CALIBRATION
    try:
        raw = path.read_bytes()
    except FileNotFoundError as e:
        raise InputError(f"{path}: calibration file not found") from e
    except OSError as e:
        raise InputError(f"{path}: cannot read calibration file ({e.strerror})") from e
    if b"\x00" in raw:
        raise InputError(f"{path}: calibration file is binary; expected text, one sample per line")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: calibration file is not UTF-8 text") from e
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise InputError(f"{path}: calibration file is empty")
    if warn and samples is not None and len(lines) < samples:
        warnings.warn(f"{path}: {len(lines)} {purpose} samples, fewer than the {samples} "
                      f"asked for; using all of them", LowrankWarning, stacklevel=2)
    return lines[:samples]


def lines_within_tokens(lines: list[str], tokenizer, tokens: int, max_length: int,
                        chunk: int = 1024) -> list[str]:
    """The first ``lines`` whose token counts (each at most ``max_length``, as batches
    truncate them) add up to at most ``tokens``; at least one line. Tokenized ``chunk`` lines
    at a time, so a long file is read only as far as the budget goes."""
    kept, total = [], 0
    for start in range(0, len(lines), chunk):
        part = lines[start:start + chunk]
        for line, ids in zip(part, tokenizer(part, truncation=True,
                                             max_length=max_length)["input_ids"]):
            total += len(ids)
            if total > tokens and kept:
                return kept
            kept.append(line)
    return kept


def packed_lines(lines: list[str], tokenizer, max_length: int, share: float) -> list[str]:
    """``lines`` with their last ``share`` joined, in order, into sequences of at most
    ``max_length`` tokens (a line already that long stays alone): short lines then also show
    the model the later positions and longer contexts it meets in use. The same tokens, fewer
    special ones."""
    start = len(lines) - round(len(lines) * share)
    if start >= len(lines) - 1:
        return lines
    tail = lines[start:]
    room = max_length - len(tokenizer("")["input_ids"])  # less the special tokens
    counts = map(len, tokenizer(tail, add_special_tokens=False)["input_ids"])
    packed, current, used = [], [], 0
    for line, count in zip(tail, counts):
        if current and used + count > room:
            packed.append(" ".join(current))
            current, used = [], 0
        current.append(line)
        used += count
    return lines[:start] + packed + [" ".join(current)]


def token_count(lines: list[str], tokenizer, max_length: int) -> int:
    """Tokens in ``lines``, each at most ``max_length`` as batches truncate them."""
    ids = tokenizer(lines, truncation=True, max_length=max_length)["input_ids"]
    return sum(map(len, ids))


TENSOR_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


Samples = list[str] | dict[str, torch.Tensor]  # text lines, or model inputs stacked on dim 0


# A tensor file's ``labels`` entry (class per sample) is never fed to the model: evaluation
# scores accuracy with it (lowrank.evaluate.evaluate_tensors).
LABELS = "labels"


def is_tensor_file(path) -> bool:
    return bool(path) and Path(path).suffix in TENSOR_SUFFIXES


def read_calibration_tensors(path: str | Path, samples: int, warn: bool = True,
                             purpose: str = "calibration") -> dict:
    """Model inputs for non-text models: a safetensors/.pt file of {input name: tensor}, the
    first dimension indexing samples (e.g. ``pixel_values`` of shape (N, 3, 224, 224))."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: calibration file not found")
    try:
        data = (load_file(str(path)) if path.suffix == ".safetensors"
                else torch.load(path, map_location="cpu", weights_only=True))
    except pickle.UnpicklingError as e:  # weights_only refused it: never unpickled further
        raise InputError(f"{path}: not a readable tensor file (refused to unpickle anything but "
                         f"plain tensors)") from e
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as e:
        raise InputError(f"{path}: not a readable tensor file ({first_line(e)})") from e
    if not isinstance(data, dict) or not data or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) and v.dim() >= 1
            for k, v in data.items()):
        raise InputError(f"{path}: expected a non-empty dict of input name -> tensor")
    counts = {v.shape[0] for v in data.values()}
    if len(counts) != 1 or 0 in counts:
        raise InputError(f"{path}: every input tensor needs the same, non-zero first (sample) "
                         f"dimension; got {sorted(counts)}")
    n = counts.pop()
    if warn and n < samples:
        warnings.warn(f"{path}: {n} calibration samples, fewer than the {samples} asked "
             f"for; using all of them")
    return {k: v[:samples] for k, v in data.items()}


def read_calibration(path: str | Path | None, samples: int, warn: bool = True,
                     purpose: str = "calibration") -> Samples:
    """Text lines (the bundled text when None), or input tensors for a tensor file. ``purpose``
    names the setting that asked for ``samples`` in the fewer-samples warning."""
    if is_tensor_file(path):
        return read_calibration_tensors(path, samples, warn, purpose)
    return read_calibration_text(path, samples, warn, purpose)


def num_samples(data: Samples) -> int:
    return len(data) if isinstance(data, list) else next(iter(data.values())).shape[0]


def model_batches(data: Samples, tokenizer, batch_size: int, max_length: int,
                  device: str | None = None, by_length: bool = False,
                  token_cap: float | None = None):
    """(model keyword inputs, real-token mask or None) per batch of ``data``, on ``device``
    (as they are when None). ``by_length``: text lines batched in order of token count, so a
    batch pads little (for sums over tokens, which order does not change: on the Debian
    calibration lines SmolLM2's tokenizer pads 3,036 real tokens to 5,040 in file order, to
    3,200 sorted); then with ``token_cap``, a batch of long lines holds fewer of them: at most
    ``token_cap`` × the padded tokens of ``batch_size`` median-length lines (one line at least).
    """
    def put(t):
        return t.to(device) if device is not None else t

    if isinstance(data, dict):
        for start in range(0, num_samples(data), batch_size):
            yield {k: put(v[start:start + batch_size]) for k, v in data.items()
                   if k != LABELS}, None
        return
    spans = [(start, min(start + batch_size, len(data)))
             for start in range(0, len(data), batch_size)]
    if by_length and len(data) > 1 and (len(data) > batch_size or token_cap):
        lengths = [len(ids) for ids in tokenizer(data, truncation=True,
                                                 max_length=max_length)["input_ids"]]
        order = sorted(range(len(data)), key=lengths.__getitem__)
        data, lengths = [data[i] for i in order], [lengths[i] for i in order]
        if token_cap:  # sorted: a batch's last line is its longest
            max_tokens = token_cap * batch_size * lengths[len(lengths) // 2]
            spans, start = [], 0
            for end in range(1, len(data) + 1):
                if end == len(data) or end - start == batch_size \
                        or (end + 1 - start) * lengths[end] > max_tokens:
                    spans.append((start, end))
                    start = end
    for start, end in spans:
        batch = tokenizer(data[start:end], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
        yield {k: put(v) for k, v in batch.items()}, put(batch["attention_mask"].bool())


def replace_tokens(inputs: dict, mask: torch.Tensor | None, share: float, keep: torch.Tensor,
                   generator: torch.Generator) -> dict:
    """``inputs`` with about ``share`` of its real tokens (``mask``), other than the ids in
    ``keep`` (a tokenizer's special tokens), replaced by real tokens drawn at random from the
    same batch: text a little beyond the lines' own (as TinyBERT's distillation augments its
    data). As they are without input ids, a mask or a share."""
    ids = inputs.get("input_ids")
    if not share or ids is None or mask is None:
        return inputs
    real = mask & ~torch.isin(ids, keep.to(ids.device))
    pool = ids[real]
    hit = real & (torch.rand(ids.shape, generator=generator) < share).to(ids.device)
    if not hit.any():  # hit is within real: the pool has a token whenever a token is hit
        return inputs
    drawn = torch.randint(len(pool), (int(hit.sum()),), generator=generator).to(ids.device)
    return {**inputs, "input_ids": ids.masked_scatter(hit, pool[drawn])}


DEFAULT_EVALUATION = Path(__file__).parents[1] / "data" / "evaluation.txt"
