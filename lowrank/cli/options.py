"""Options shared by `plan` and `compress`: the rank policy and calibration."""

from __future__ import annotations

import click

from .console import options

policy_options = options(
    click.option("--energy", type=float, help="Keep this fraction of each matrix's spectral energy."),
    click.option("--rank", type=int, help="The same rank for every matrix."),
    click.option("--rank-fraction", type=float, help="Rank = fraction x min(m, n)."),
    click.option("--param-ratio", type=float,
                 help="Keep this fraction of the whole checkpoint's parameters (default 0.6)."),
    click.option("--latency-ratio", type=float,
                 help="Plan for latency: keep this fraction of the Linears' dense matmul time "
                 "on this CPU (measured, cached per machine; embeddings stay dense)."),
    click.option("--include", multiple=True, help="Only matrices matching this glob (repeatable)."),
    click.option("--exclude", multiple=True, help="Skip matrices matching this glob (repeatable)."),
    click.option("--multiple", type=int, help="Round ranks up to a multiple of this."),
    click.option("--guard", type=float,
                 help="Keep dense when rank >= guard x break-even mn/(m+n) (default 0.8)."),
    click.option("--min-numel", type=int, help="Matrices smaller than this stay dense."),
    click.option("--allocation", type=click.Choice(["loss", "energy"]),
                 help="--param-ratio with --calibration: choose ranks by measured end-to-end "
                 "loss (default; a knapsack over candidate ranks) or by spectral energy."),
    click.option("--latency-tokens", type=int, multiple=True,
                 help="Keep a Linear dense unless its factors run faster than dense on this "
                 "CPU at this many tokens (batch x sequence; repeatable; e.g. 16 and 2048). "
                 "Measured once per machine and layer shape, cached."),
)
PLAN_KEYS = ("energy", "rank", "rank_fraction", "param_ratio", "latency_ratio", "include",
             "exclude", "multiple", "guard", "min_numel", "latency_tokens", "allocation")

calibration_options = options(
    click.option("--calibration", "calibration_file", is_flag=False, flag_value="",
                 default=None, metavar="[FILE]",
                 help="Data-aware compression on this text (one sample per line); without "
                 "FILE, the calibration text shipped with lowrank."),
    click.option("--calibration-samples", type=int,
                 help="Calibration lines to use (default: the first lines holding "
                 "--calibration-tokens tokens)."),
    click.option("--calibration-tokens", type=int,
                 help="Token budget of the calibration text when --calibration-samples is not "
                 "given (default 32768)."),
    click.option("--max-length", type=int, help="Tokens per calibration sample (default 128)."),
    click.option("--calibration-pack", type=float, metavar="SHARE",
                 help="Share of the calibration lines (the last ones) joined into samples of "
                 "up to --max-length tokens, so short lines cover long inputs too (default "
                 "0.25; 0: one line per sample)."),
    click.option("--sampled-text/--no-sampled-text", default=None,
                 help="Causal LMs: top up calibration text shorter than the token budget with "
                 "text sampled from the model (default on)."),
    click.option("--data-method", type=click.Choice(["whiten", "kfac", "scale"]),
                 help="Data-aware method: whiten (output-optimal, default), kfac (two-sided: "
                 "also the output gradients' Gram, one backward pass per calibration batch) or "
                 "scale (ASVD-style)."),
    click.option("--outliers", type=click.Choice(["keep", "skip-first", "clip"]),
                 help="Calibration tokens with massive activations: keep them, skip each "
                 "sequence's first token, or clip token norms at 5x the median."),
    click.option("--sensitivity", is_flag=True,
                 help="Probe each layer's end-to-end sensitivity at a few ranks and weight "
                 "the --param-ratio allocation by it (cached; needs an HF directory)."),
)


def take(flags: dict, *keys: str, **renames: str) -> dict:
    """Pop ``keys`` (and ``renames``: setting name -> flag name) out of click's ``flags``."""
    taken = {k: flags.pop(k) for k in keys}
    taken.update({setting: flags.pop(flag) for setting, flag in renames.items()})
    return taken


def calibration_settings(flags: dict) -> dict:
    return take(flags, "max_length", "outliers", "sampled_text", samples="calibration_samples",
                tokens="calibration_tokens", method="data_method", pack="calibration_pack")


# compress_spec's parameter names (lowrank.errors.OptionError) as the flags that set them.
FLAGS = {"calibration_file": "--calibration",
         "calibration settings": "--calibration-samples/--calibration-tokens/--calibration-pack/--max-length/--sampled-text/--data-method/--outliers options",
         "sequential": "--sequential", "recover settings": "--recover-* options",
         "recover_method": "--recover", "optimize": "--optimize", "int8": "--int8", "bench": "--bench",
         "export": "--export onnx"}


def flag(option: str) -> str:
    return FLAGS.get(option, option)
