"""`lowrank generate MODEL "prompt"`: a continuation from an ONNX decoder (with its KV cache) or
a PyTorch causal LM directory, through the same loop (:mod:`lowrank.generate`)."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import InputError
from ..generate import generate_tokens, is_decoder_session, onnx_session
from ..load import load_any
from ..stages.evaluate import is_causal_lm
from .console import emit_json, json_option, out, resolve_model


def find_tokenizer(path: str | Path):
    """The tokenizer of a model directory, or of an ONNX file's directory or the OUTPUT
    directory above it (``compress`` copies the tokenizer into OUTPUT, the graph is in
    OUTPUT/onnx)."""
    from transformers import AutoTokenizer

    path = Path(path)
    places = [path] if path.is_dir() else [path.parent, path.parent.parent]
    for place in places:
        if any((place / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
            return AutoTokenizer.from_pretrained(place, local_files_only=True)
    raise InputError(f"{path}: no tokenizer found in {' or '.join(map(str, places))}")


def load_engine(path: str | Path):
    """(model or session, tokenizer) for an ONNX decoder file or a PyTorch model directory (an
    HF causal LM or a lowrank output of one)."""
    path = Path(path)
    if path.is_file():
        session = onnx_session(path)
        if not is_decoder_session(session):
            raise InputError(f"{path}: not a decoder with a KV cache (past_key_values.* inputs); "
                             f"export the causal LM with `lowrank export`")
        return session, find_tokenizer(path)
    model = load_any(path)
    if not is_causal_lm(model):
        raise InputError(f"{path}: not a causal LM (generation needs one)")
    return model, find_tokenizer(path)


@click.command("generate")
@click.argument("model")
@click.argument("prompt")
@click.option("--max-new-tokens", type=click.IntRange(1), default=32, show_default=True)
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True, help="With --sample.")
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True,
              help="With --sample: only the K likeliest tokens (0: all).")
@click.option("--seed", type=int, default=0, show_default=True, help="With --sample.")
@json_option
def generate_command(model, prompt, max_new_tokens, sample, temperature, top_k, seed, json_out):
    """Continue PROMPT with MODEL: an exported decoder (OUTPUT/onnx/model.onnx; tokenizer from
    OUTPUT) or an HF causal LM / lowrank output directory (PyTorch)."""
    engine, tokenizer = load_engine(resolve_model(model))
    ids = generate_tokens(engine, tokenizer, prompt, max_new_tokens, sample, temperature, top_k,
                          seed)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if emit_json({"prompt": prompt, "continuation": text, "new_tokens": ids}, json_out):
        return
    out.print(prompt + text, highlight=False, markup=False)
