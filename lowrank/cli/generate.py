"""`lowrank generate MODEL "prompt" ["prompt" ...]`: continuations from an ONNX export (a decoder
with its KV cache, or an encoder-decoder export: encoder_model.onnx + decoder_model_merged.onnx)
or a PyTorch model directory, through the same loop (:mod:`lowrank.generate`); several prompts
run as one batch."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import InputError
from ..generate import engine, generate_tokens, is_decoder_session, onnx_session
from ..generate_seq2seq import OnnxSeq2Seq, TorchSeq2Seq, seq2seq_files
from ..load import load_any
from ..models import is_causal_lm, is_seq2seq
from .console import emit_json, json_option, out, resolve_model


def find_tokenizer(path: str | Path):
    """The tokenizer of a model directory, or of an ONNX file's directory or the OUTPUT
    directory above it (``compress`` copies the tokenizer into OUTPUT, the graph is in
    OUTPUT/onnx)."""
    from transformers import AutoTokenizer

    path = Path(path)
    places = [path, path.parent] if path.is_dir() else [path.parent, path.parent.parent]
    for place in places:
        if any((place / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
            return AutoTokenizer.from_pretrained(place, local_files_only=True)
    raise InputError(f"{path}: no tokenizer found in {' or '.join(map(str, places))}")


def load_engine(path: str | Path):
    """(engine, tokenizer) for an ONNX export (a decoder file; an encoder-decoder export's
    directory or either of its files) or a PyTorch model directory (an HF causal LM or
    encoder-decoder model, or a lowrank output of one)."""
    path = Path(path)
    if seq2seq_files(path):
        return engine(path), find_tokenizer(path)
    if path.is_file():
        session = onnx_session(path)
        if not is_decoder_session(session):
            raise InputError(f"{path}: not a decoder with a KV cache (past_key_values.* inputs); "
                             f"export the causal LM with `lowrank export`")
        return engine(session), find_tokenizer(path)
    model = load_any(path)
    if not (is_causal_lm(model) or is_seq2seq(model)):
        raise InputError(f"{path}: not a causal LM or encoder-decoder model (generation needs one)")
    return engine(model), find_tokenizer(path)


def read_prompts(prompts: tuple[str, ...], prompts_file: str | None) -> list[str]:
    """The positional prompts, then the file's non-empty lines."""
    found = list(prompts)
    if prompts_file:
        found += [line for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    if not found:
        raise click.UsageError("give a PROMPT or --prompts-file")
    return found


@click.command("generate")
@click.argument("model")
@click.argument("prompts", nargs=-1)
@click.option("--prompts-file", type=click.Path(dir_okay=False, exists=True),
              help="More prompts, one a line; all prompts run as one batch.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=32, show_default=True)
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True, help="With --sample.")
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True,
              help="With --sample: only the K likeliest tokens (0: all).")
@click.option("--seed", type=int, default=0, show_default=True, help="With --sample.")
@json_option
def generate_command(model, prompts, prompts_file, max_new_tokens, sample, temperature, top_k,
                     seed, json_out):
    """Continue each PROMPT with MODEL: an export (OUTPUT/onnx/model.onnx, or an encoder-decoder
    model's OUTPUT/onnx directory; tokenizer from OUTPUT) or an HF causal LM / encoder-decoder /
    lowrank output directory (PyTorch). Several prompts are generated as one batch (left
    padding for decoders), each stopping at EOS."""
    texts = read_prompts(prompts, prompts_file)
    lm, tokenizer = load_engine(resolve_model(model))
    new = generate_tokens(lm, tokenizer, texts, max_new_tokens, sample, temperature, top_k, seed)
    results = [{"prompt": p, "continuation": tokenizer.decode(ids, skip_special_tokens=True),
                "new_tokens": ids} for p, ids in zip(texts, new)]
    if emit_json(results[0] if len(results) == 1 else {"generations": results}, json_out):
        return
    seq2seq = isinstance(lm, (OnnxSeq2Seq, TorchSeq2Seq))  # writes anew, not a continuation
    for r in results:
        text = r["continuation"] if seq2seq else r["prompt"] + r["continuation"]
        out.print(text, highlight=False, markup=False)
