"""`lowrank generate MODEL "prompt"`: a continuation from an ONNX decoder (with its KV cache) or
a PyTorch causal LM directory, through the same loop (:mod:`lowrank.generate`)."""

from __future__ import annotations

import click

from ..generate import generate_tokens, load_engine
from .console import emit_json, json_option, out, resolve_model


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
    if json_out:
        emit_json({"prompt": prompt, "continuation": text, "new_tokens": ids}, json_out)
        if json_out == "-":
            return
    out.print(prompt + text, highlight=False, markup=False)
