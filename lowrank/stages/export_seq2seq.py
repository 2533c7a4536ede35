"""ONNX export of an encoder-decoder model (BART, T5) in Optimum's seq2seq layout, so
onnxruntime generates one token per decoder call, the encoder run once per prompt.

Two files in one directory, named and laid out as Optimum's ``text2text-generation-with-past``:

- ``encoder_model.onnx``: inputs ``input_ids``, ``attention_mask`` (batch_size,
  encoder_sequence_length); output ``last_hidden_state`` (batch_size, encoder_sequence_length,
  d_model).
- ``decoder_model_merged.onnx``: inputs ``input_ids`` (batch_size, decoder_sequence_length),
  ``encoder_attention_mask``, ``encoder_hidden_states``, per decoder layer N
  ``past_key_values.N.decoder.key``/``.value`` (batch_size, heads, past_decoder_sequence_length,
  head_dim) and ``past_key_values.N.encoder.key``/``.value`` (batch_size, heads,
  encoder_sequence_length_out, head_dim), and ``use_cache_branch`` (bool, shape [1]); outputs
  ``logits`` (batch_size, decoder_sequence_length, vocab) then ``present.N.decoder.key``/``.value``
  (batch_size, heads, present_decoder_sequence_length, head_dim), ``present.N.encoder.key``/
  ``.value`` (batch_size, heads, encoder_sequence_length_out, head_dim).

The merged decoder is Optimum's: an ``If`` on ``use_cache_branch`` between two traced graphs that
share one set of initializers. False (first step): the past inputs are ignored (feed any shape,
e.g. length 1 of zeros), the cross-attention keys/values are computed from
``encoder_hidden_states`` and returned as ``present.N.encoder.*``. True: they are read from
``past_key_values.N.encoder.*`` and returned unchanged; ``present.N.decoder.*`` is the self-attention
cache grown by the new tokens. The decoder's start token and EOS id are in the merged file's
metadata (``decoder_start_token_id``, ``eos_token_id``).

Validation (:func:`validate_seq2seq`): the encoder's hidden states and the teacher-forced logits of
the no-cache branch against PyTorch by the export rule (:func:`.export_validate.compare`), then
greedy decoding with the ONNX encoder and the cached decoder against PyTorch with transformers'
EncoderDecoderCache, token for token up to a near tie (:func:`lowrank.generate.lockstep`).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..backends import require
from ..errors import ValidationError
from ..generate import cache_argument, lockstep, onnx_session, returned_cache
from ..generate_seq2seq import (
    DECODER_FILE,
    ENCODER_FILE,
    OnnxSeq2Seq,
    TorchSeq2Seq,
    decoder_start,
)
from ..models import is_seq2seq
from .export_validate import compare

KINDS = ("decoder", "encoder")  # self-attention cache, cross-attention cache


def takes_seq2seq_cache(model: nn.Module, inputs=None) -> bool:
    return inputs is None and is_seq2seq(model) and cache_argument(model) is not None


def _caches(model: nn.Module, past: list[torch.Tensor] | None):
    """transformers' EncoderDecoderCache, empty or filled from flat (self k, v, cross k, v) × layers."""
    from transformers import DynamicCache, EncoderDecoderCache

    own, cross = DynamicCache(config=model.config), DynamicCache(config=model.config)
    for i in range(len(past or ()) // 4):
        own.update(past[4 * i], past[4 * i + 1], i)
        cross.update(past[4 * i + 2], past[4 * i + 3], i)
    return EncoderDecoderCache(own, cross)  # non-empty cross cache: reused, not recomputed


def _flat(cache) -> list[torch.Tensor]:
    return [t for own, cross in zip(cache.self_attention_cache.layers,
                                    cache.cross_attention_cache.layers)
            for t in (own.keys, own.values, cross.keys, cross.values)]


class _Encoder(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        encoder = self.model.get_encoder()
        return encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class _Decoder(nn.Module):
    """One decoder call on flat tensors; with ``past`` the cross-attention cache is an input."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.argument = model, cache_argument(model)

    def forward(self, input_ids, encoder_attention_mask, encoder_hidden_states, *past):
        out = self.model(encoder_outputs=(encoder_hidden_states,),
                         attention_mask=encoder_attention_mask, decoder_input_ids=input_ids,
                         **{self.argument: _caches(self.model, list(past))}, use_cache=True)
        return (out.logits, *_flat(returned_cache(out)))


def cache_names(layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kind}.{kv}" for i in range(layers) for kind in KINDS
            for kv in ("key", "value")]


def _layout(model: nn.Module) -> list[tuple[int, int]]:
    """(heads, head dim) of each decoder layer's self- and cross-attention cache, from one call."""
    with torch.no_grad():
        ids = torch.ones(1, 2, dtype=torch.long)
        out = _Decoder(model)(ids[:, :1], ids, torch.zeros(1, 2, _hidden(model)))
    return [(t.shape[1], t.shape[3]) for t in out[1:]]


def _hidden(model: nn.Module) -> int:
    config = model.config
    return getattr(config, "d_model", None) or config.hidden_size


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            axes: dict, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter, not user-facing
        torch.onnx.export(module.eval(), args, str(path), input_names=inputs,
                          output_names=outputs, dynamic_axes=axes, opset_version=opset,
                          dynamo=False, do_constant_folding=False)  # keep initializer names


def write_seq2seq(model: nn.Module, directory: Path, opset: int, seed: int = 0) -> dict:
    """Trace ``model`` into ``directory``/encoder_model.onnx and decoder_model_merged.onnx;
    returns {file name: {"inputs": [...], "outputs": [...]}}."""
    onnx = require("onnx")

    generator = torch.Generator().manual_seed(seed)
    batch, enc_len, dec_len, past_len = 2, 5, 3, 4
    ids = torch.randint(0, model.config.vocab_size, (batch, enc_len), generator=generator)
    mask = torch.ones(batch, enc_len, dtype=torch.long)
    enc_axes = {0: "batch_size", 1: "encoder_sequence_length"}
    _export(_Encoder(model), (ids, mask), directory / ENCODER_FILE, ["input_ids", "attention_mask"],
            ["last_hidden_state"], dict.fromkeys(["input_ids", "attention_mask",
                                                  "last_hidden_state"], enc_axes), opset)
    layout = _layout(model)
    layers = len(layout) // 4
    past, present = cache_names(layers, "past_key_values"), cache_names(layers, "present")
    head = ["input_ids", "encoder_attention_mask", "encoder_hidden_states"]
    new = {0: "batch_size", 1: "decoder_sequence_length"}
    axes = {"input_ids": new, "logits": new, "encoder_attention_mask": enc_axes,
            "encoder_hidden_states": enc_axes}
    hidden = torch.randn(batch, enc_len, _hidden(model), generator=generator)
    dec_ids = torch.randint(0, model.config.vocab_size, (batch, dec_len), generator=generator)
    cache_axes = {n: {0: "batch_size", 2: "encoder_sequence_length_out" if ".encoder." in n
                      else "past_decoder_sequence_length"} for n in past}
    cache_axes |= {n: {0: "batch_size", 2: f"{n}_length"} for n in present}  # set by the merge
    with tempfile.TemporaryDirectory(prefix="lowrank-seq2seq-") as scratch:
        tmp = Path(scratch)  # the two decoders, before they are merged
        _export(_Decoder(model), (dec_ids, mask, hidden), tmp / "no_past.onnx", head,
                ["logits", *present], axes | cache_axes, opset)
        cache = [torch.randn(batch, h, past_len if i % 4 < 2 else enc_len, d, generator=generator)
                 for i, (h, d) in enumerate(layout)]
        _export(_Decoder(model), (dec_ids[:, :1], mask, hidden, *cache), tmp / "with_past.onnx",
                head + past, ["logits", *present], axes | cache_axes, opset)
        merged = merge_decoders(onnx.load(str(tmp / "no_past.onnx")),
                                onnx.load(str(tmp / "with_past.onnx")))
    start, eos = decoder_start(model.config)
    onnx.helper.set_model_props(merged, {"decoder_start_token_id": str(start),
                                         "eos_token_id": str(eos)})
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 2 * 1024**3
    # protobuf's 2 GB limit: the weights next to the graph (the exporter does so for the encoder)
    onnx.save(merged, str(directory / DECODER_FILE), save_as_external_data=big,
              all_tensors_to_one_file=True, location=DECODER_FILE + "_data")
    return {ENCODER_FILE: {"inputs": ["input_ids", "attention_mask"],
                           "outputs": ["last_hidden_state"]},
            DECODER_FILE: {"inputs": [i.name for i in merged.graph.input],
                           "outputs": [o.name for o in merged.graph.output]}}


def _rename_inputs(graph, renames: dict[str, str]) -> None:
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        for attr in node.attribute:
            if attr.g.node:
                _rename_inputs(attr.g, renames)


def merge_decoders(no_past, with_past):
    """Optimum's merged decoder: an ``If`` on ``use_cache_branch`` (then: with past, else: without)
    over two graphs of one model; shared initializers are stored once, in the outer graph."""
    onnx = require("onnx")
    helper = onnx.helper

    initializers = {i.name: i for i in no_past.graph.initializer}
    renames = {}
    for init in with_past.graph.initializer:
        have = initializers.get(init.name)
        if have is not None and have.SerializeToString() != init.SerializeToString():
            renames[init.name] = f"with_past::{init.name}"  # same exporter name, other constant
            init.name = renames[init.name]
        initializers.setdefault(init.name, init)
    _rename_inputs(with_past.graph, renames)
    outputs = []  # the branches' outputs must agree: one rank, symbolic dims
    for out in no_past.graph.output:
        dims = [d.dim_value or d.dim_param
                for d in out.type.tensor_type.shape.dim]
        if out.name.startswith("present."):
            dims[2] = "present_decoder_sequence_length" if ".decoder." in out.name else \
                "encoder_sequence_length_out"
        outputs.append(helper.make_tensor_value_info(out.name, out.type.tensor_type.elem_type,
                                                     dims))
    branches = [helper.make_graph(list(m.graph.node), name, [], outputs)
                for m, name in ((with_past, "with_past"), (no_past, "no_past"))]
    use_cache = helper.make_tensor_value_info("use_cache_branch", onnx.TensorProto.BOOL, [1])
    seen, inputs = set(), []
    for inp in [*no_past.graph.input, *with_past.graph.input]:
        if inp.name not in seen and inp.name not in initializers:
            seen.add(inp.name)
            inputs.append(inp)
    node = helper.make_node("If", ["use_cache_branch"], [o.name for o in outputs],
                            then_branch=branches[0], else_branch=branches[1])
    graph = helper.make_graph([node], "decoder_model_merged", [*inputs, use_cache], outputs,
                              initializer=list(initializers.values()))
    merged = helper.make_model(graph, opset_imports=list(no_past.opset_import),
                               producer_name="lowrank")
    merged.ir_version = no_past.ir_version
    onnx.checker.check_model(merged)
    return merged


def validate_seq2seq(model: nn.Module, directory: Path, settings) -> list[dict]:
    """The decoder's teacher-forced logits (no-cache branch) and, under "encoder", the encoder's
    output against PyTorch on ``settings.shapes`` (batch, sequence: the text is its own decoder
    input, the second half of rows padded in the encoder), by :func:`.export_validate.compare`:
    one entry per input.

    Raises:
        ValidationError: an entry fails the rule.
    """
    engine = OnnxSeq2Seq(onnx_session(directory / ENCODER_FILE),
                         onnx_session(directory / DECODER_FILE))
    generator = torch.Generator().manual_seed(settings.seed + 1)
    entries = []
    for batch, seq in settings.shapes:
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[batch // 2:, seq // 2:] = 0
        with torch.no_grad():
            hidden = _Encoder(model)(ids, mask)
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids).logits
        got_hidden = engine.encode(ids.numpy(), mask.numpy())
        got = engine.decode_all(ids.numpy(), mask.numpy(), got_hidden)
        real = mask.numpy().astype(bool)  # the encoder's padding is not compared
        encoder = compare(got_hidden[real], hidden.numpy()[real], settings)
        entry = {"shape": [batch, seq], **compare(got, logits.float().numpy(), settings,
                                                  np.ones(ids.shape, bool)),
                 "encoder": encoder}
        entries.append(entry)
        for name, v in (("last_hidden_state", encoder), ("logits", entry)):
            if not v["ok"]:
                raise ValidationError(
                    f"{directory}: onnxruntime's {name} differs from PyTorch on input "
                    f"{[batch, seq]}: max abs diff {v['max_abs_diff']:.3g} "
                    f"({v['rel_error']:.3g} × the output's RMS {v['scale']:.3g}); "
                    f"rule: {settings.rule(name == 'logits')}")
    return entries


def validate_seq2seq_generation(model: nn.Module, directory: Path, prompts: list[list[int]],
                                new_tokens: int, tie_tol: float) -> list[dict]:
    """Greedy decoding with the ONNX encoder and cached decoder vs PyTorch, per prompt.

    Raises:
        ValidationError: a prompt's tokens differ beyond a near tie.
    """
    reference = TorchSeq2Seq(model)
    candidate = OnnxSeq2Seq(onnx_session(directory / ENCODER_FILE),
                            onnx_session(directory / DECODER_FILE))
    entries = [lockstep(reference, candidate, p, new_tokens, tie_tol) for p in prompts]
    bad = next((e for e in entries if not e["ok"]), None)
    if bad:
        raise ValidationError(
            f"{directory}: greedy decoding with the ONNX encoder and cached decoder differs "
            f"from PyTorch's after {bad['match_length']} of {new_tokens} tokens (prompt of "
            f"{bad['prompt_length']} tokens): PyTorch prefers its token by {bad['gap']:.3g} "
            f"nats (> {tie_tol:g})")
    return entries


def hoist_shared_initializers(model) -> int:
    """Store once, in the outer graph, each initializer that both branches of a merged decoder's
    ``If`` hold under one name with the same content (onnxruntime's quantizer writes a branch's
    int8 weights into that branch, so each weight would be stored twice); returns how many moved."""
    outer = model.graph
    taken = {i.name for i in outer.initializer} | {i.name for i in outer.input}
    for node in outer.node:
        branches = [a.g for a in node.attribute if node.op_type == "If" and a.g.node]
        if len(branches) != 2:
            continue
        first = {i.name: i for i in branches[0].initializer}
        second = {i.name: i for i in branches[1].initializer}
        shared = [n for n in first if n in second and n not in taken
                  and first[n].SerializeToString() == second[n].SerializeToString()]
        for branch in branches:
            kept = [i for i in branch.initializer if i.name not in shared]
            del branch.initializer[:]
            branch.initializer.extend(kept)
        outer.initializer.extend(first[n] for n in shared)
        return len(shared)
    return 0
