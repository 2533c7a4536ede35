"""`lowrank sample MODEL FILE`: calibration text sampled from a causal LM itself
(:mod:`lowrank.sample_text`), for `compress --calibration FILE`."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..io.checkpoint import open_checkpoint
from ..io.files import check_output_file
from ..models import Models
from ..sample_text import SampleTextSettings, sample_text, write_sample_text
from .console import emit_json, json_option, out, resolve_model, rich_track


@click.command("sample")
@click.argument("model")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--tokens", type=click.IntRange(1), default=SampleTextSettings.tokens,
              show_default=True, help="New tokens in all.")
@click.option("--length", type=click.IntRange(1), default=SampleTextSettings.length,
              show_default=True, help="New tokens per line at most.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True),
              default=SampleTextSettings.temperature, show_default=True)
@click.option("--seed", type=int, default=SampleTextSettings.seed, show_default=True)
@click.option("--start", help="The token every line starts from (default: <|endoftext|> where "
              "the vocabulary has it, else BOS, else EOS).")
@json_option
def sample_command(model, file, tokens, length, temperature, seed, start, json_out):
    """Write FILE: text sampled from causal LM MODEL (an HF directory), one sequence a line,
    to calibrate it on with `compress --calibration FILE`."""
    settings = SampleTextSettings(tokens=tokens, length=length, temperature=temperature,
                                  seed=seed, start=start)
    ckpt = open_checkpoint(resolve_model(model))
    check_output_file(Path(file), [ckpt.path, *ckpt.files])
    dense, tokenizer = Models(ckpt).runnable_model()
    began = time.perf_counter()
    with rich_track("sample", settings.batches) as advance:
        lines = sample_text(dense.eval(), tokenizer, settings, advance)
    write_sample_text(lines, file)
    result = {"file": str(file), "lines": len(lines),
              "tokens": sum(map(len, tokenizer(lines, add_special_tokens=False)["input_ids"])),
              "seconds": round(time.perf_counter() - began, 1)}
    if emit_json(result, json_out):
        return
    out.print(f"{result['lines']} lines, {result['tokens']:,} tokens sampled in "
              f"{result['seconds']} s, written to {file}", highlight=False)
