"""Engines for encoder-decoder models (BART, T5), stepped like :mod:`lowrank.generate_engines`'s:
the ONNX encoder + merged decoder of :mod:`lowrank.stages.export_seq2seq` (Optimum's seq2seq
layout) on onnxruntime, and a PyTorch model with transformers' ``EncoderDecoderCache``.

``start(prompts)`` encodes the prompts (padded on the right: BART's learned absolute positions
would move under left padding; the mask hides the padding from the decoder's cross-attention) and
runs the first decoder step on the start token; ``step(tokens)`` feeds one token per row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .generate_engines import PAST, cache_argument, pad, returned_cache

ENCODER_FILE = "encoder_model.onnx"
DECODER_FILE = "decoder_model_merged.onnx"


def decoder_start(config) -> tuple[int, int | None]:
    """(decoder start token, EOS) of a transformers encoder-decoder config."""
    start = config.decoder_start_token_id
    if start is None:
        start = config.pad_token_id
    return int(start), config.eos_token_id


def seq2seq_files(path: str | Path) -> tuple[Path, Path] | None:
    """(encoder, merged decoder) of an export directory or of either file in it; else None."""
    path = Path(path)
    directory = path.parent if path.is_file() else path
    files = directory / ENCODER_FILE, directory / DECODER_FILE
    return files if all(f.is_file() for f in files) else None


class OnnxSeq2Seq:
    """An exported encoder and merged decoder; start and EOS ids from the decoder's metadata."""

    def __init__(self, encoder, decoder):
        self.encoder, self.decoder = encoder, decoder
        meta = decoder.get_modelmeta().custom_metadata_map
        self.start_id = int(meta["decoder_start_token_id"])
        self.eos_id = int(meta["eos_token_id"]) if meta.get("eos_token_id", "None") != "None" \
            else None
        self.past = [i for i in decoder.get_inputs() if i.name.startswith(PAST)]
        self.outputs = [o.name for o in decoder.get_outputs()]

    def encode(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.encoder.run(None, {"input_ids": ids, "attention_mask": mask})[0]

    def _run(self, ids: np.ndarray, cache: dict | None) -> np.ndarray:
        """One decoder call: the cache branch when ``cache`` is given, else the first step
        (the past inputs are then ignored: length-1 zeros, as Optimum feeds)."""
        batch = ids.shape[0]
        past = cache or {i.name: np.zeros([batch, i.shape[1], 1, i.shape[3]], np.float32)
                         for i in self.past}
        feed = {"input_ids": ids, "encoder_attention_mask": self.mask,
                "encoder_hidden_states": self.hidden, **past,
                "use_cache_branch": np.array([cache is not None])}
        named = dict(zip(self.outputs, self.decoder.run(None, feed)))
        self.cache = {i.name: named["present." + i.name.removeprefix(PAST)] for i in self.past}
        if cache is not None:  # the cross-attention cache stays what the first step computed
            self.cache |= {k: v for k, v in cache.items() if ".encoder." in k}
        return named["logits"]

    def decode_all(self, ids: np.ndarray, mask: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        """Teacher-forced logits of decoder inputs ``ids`` (no cache), for validation."""
        self.mask, self.hidden = mask, hidden
        return self._run(ids, None)

    def start(self, prompts: list[list[int]]) -> np.ndarray:
        ids, self.mask = pad(prompts, left=False)
        self.hidden = self.encode(ids, self.mask)
        first = np.full((len(prompts), 1), self.start_id, np.int64)
        return self._run(first, None)[:, -1].astype(np.float32)

    def step(self, tokens) -> np.ndarray:
        ids = np.asarray(tokens, np.int64).reshape(-1, 1)
        return self._run(ids, self.cache)[:, -1].astype(np.float32)


class TorchSeq2Seq:
    """A PyTorch encoder-decoder model, stepped like :class:`OnnxSeq2Seq`."""

    def __init__(self, model):
        self.model, self.argument = model.eval(), cache_argument(model)
        self.start_id, self.eos_id = decoder_start(model.config)

    def start(self, prompts: list[list[int]]) -> np.ndarray:
        import torch
        from transformers import DynamicCache, EncoderDecoderCache

        ids, mask = pad(prompts, left=False)
        self.mask = torch.from_numpy(mask)
        with torch.inference_mode():
            self.encoded = self.model.get_encoder()(input_ids=torch.from_numpy(ids),
                                                    attention_mask=self.mask)
        config = self.model.config
        self.cache = EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
        return self.step([self.start_id] * len(prompts))

    def step(self, tokens) -> np.ndarray:
        import torch

        ids = torch.as_tensor(np.asarray(tokens, np.int64).reshape(-1, 1))
        with torch.inference_mode():
            out = self.model(encoder_outputs=self.encoded, attention_mask=self.mask,
                             decoder_input_ids=ids, **{self.argument: self.cache}, use_cache=True)
        self.cache = returned_cache(out)
        return out.logits[:, -1].float().numpy()
