"""`lowrank compress MODEL OUTPUT` (the default pipeline with flags) and `lowrank run FILE`."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from ..linalg import SVD_METHODS
from ..pipeline.cache import default_cache_dir
from ..pipeline.runner import run_pipeline
from ..pipeline.spec import compress_spec, read_pipeline
from ..stages.factorize import FactorizeSettings
from ..stages.recover import METHODS as RECOVER_METHODS
from ..stages.report import summary_rows
from .console import (
    cache_dir_option,
    device_option,
    emit_json,
    executor_option,
    json_option,
    model_factory_option,
    one_line,
    options,
    out,
    resolve_model,
    rich_track,
    warn,
    workers_option,
)
from .options import PLAN_KEYS, calibration_options, calibration_settings, policy_options, take

run_options = options(
    workers_option,
    executor_option,
    device_option,
    cache_dir_option,
    click.option("--no-cache", is_flag=True, help="Recompute every stage; cache nothing."),
    click.option("--overwrite", is_flag=True, help="Replace an existing non-empty OUTPUT."),
    json_option,
)


def run_and_print(spec, model, output, cache_dir, no_cache, overwrite, json_out, workers,
                  executor, device) -> None:
    cache = None if no_cache else Path(cache_dir) if cache_dir else default_cache_dir()
    result = run_pipeline(spec, resolve_model(model), output, cache_dir=cache,
                          overwrite=overwrite, track=rich_track, workers=workers,
                          executor=executor, device=device)
    result.release()
    report = result.report
    for name, e in report["layers"].items():  # on stderr, with --json too
        if "NaN" in (e.get("reason") or ""):
            warn(f"{name} holds NaN/Inf; kept dense, unchanged")
    if emit_json(report, json_out):
        return
    table = Table(title="Factored layers")
    for col in ("matrix", "shape", "rank", "energy", "rel. error", "method"):
        table.add_column(col, justify="left" if col == "matrix" else "right", overflow="fold")
    for name, e in report["layers"].items():
        if e["rank"] is not None:
            table.add_row(name, "x".join(map(str, e["shape"])), str(e["rank"]),
                          f"{e['energy']:.3f}", f"{e['rel_error']:.3f}", e["method"])
    out.print(table)
    for what, value in summary_rows(report):
        out.print(f"[bold]{escape(what)}[/] {escape(one_line(value))}", highlight=False)
    out.print("[bold]stages[/] " + ", ".join(
        f"{st['stage']} {st['seconds']:.1f}s{' (cached)' if st['cached'] else ''}"
        for st in report["stages"]))
    out.print(f"written to {report['output']}")


@click.command("compress")
@click.argument("model")
@click.argument("output", type=click.Path(file_okay=False))
@policy_options
@click.option("--plan", "plan_file", type=click.Path(dir_okay=False),
              help="Re-apply an (edited) plan JSON instead of a policy.")
@calibration_options
@click.option("--sequential", is_flag=True, help="Recollect each block's calibration statistics "
              "with upstream layers already factored (needs --calibration).")
@click.option("--compensate/--no-compensate", default=None, help="With --calibration (default "
              "on): fit each layer's factors to the dense model's outputs from the inputs it "
              "gets in the model factored so far, block by block.")
@click.option("--split-fused", is_flag=True, help="Factor fused projections (Phi-3 qkv_proj/"
              "gate_up_proj, GPT-2 c_attn) per part at equal parameters, not as one matrix "
              "(measured worse on the models tried; see the README).")
@click.option("--recover", "recover_method",
              type=click.Choice(RECOVER_METHODS),
              help="Recover accuracy by distillation from the dense model (needs an HF "
              "directory): LoRA or orthogonal adapters on the factors, or the factors themselves; "
              "auto: the factors for encoders, LoRA for causal LMs (as measured).")
@click.option("--recover-minutes", type=float, help="Training time budget in minutes: the "
              "steps are chosen to fit it (default 3).")
@click.option("--recover-steps", type=int, help="Training steps instead of a time budget "
              "(per block in block-wise mode).")
@click.option("--recover-mode", type=click.Choice(["auto", "blockwise", "end-to-end"]),
              help="blockwise: each block trained to match the dense block on cached inputs, "
              "then a short end-to-end pass; end-to-end: the whole model's output (default auto: "
              "end-to-end, measured best so far; see reports/recovery-minutes.md).")
@click.option("--recover-lr", type=float,
              help="Learning rate (default 3e-3 for adapters, 3e-4 for factors and for "
              "LoRA on causal LMs).")
@click.option("--recover-rank", type=int, help="LoRA rank (default 32).")
@click.option("--recover-alpha", type=float, help="LoRA alpha (default 32).")
@click.option("--recover-batch-size", type=int, help="Samples per step (default 32).")
@click.option("--recover-samples", type=int,
              help="Training lines (or samples) to use (default: all, up to 4096).")
@click.option("--recover-seed", type=int, help="Training seed (default 0).")
@click.option("--recover-replace-share", type=float,
              help="Share of each batch's tokens replaced by others of the batch, for teacher and "
              "student alike (default 0.15 for encoders, 0 for causal LMs: the lines as they are).")
@click.option("--recover-text", type=click.Path(dir_okay=False),
              help="Training text, one sample per line (default: the --calibration file, else the "
              "bundled calibration text).")
@click.option("--recover-sampled-text/--no-recover-sampled-text", default=None,
              help="Also train on text sampled from a causal LM: the top-up of its calibration "
              "text (when training on the --calibration file) and --recover-sampled-tokens new "
              "tokens (default: with --recover-minutes 6 or more, where it pays; README, "
              "Recovery).")
@click.option("--recover-sampled-tokens", type=int, help="New tokens recovery samples from a "
              "causal LM to train on, with --recover-sampled-text (default 0; 24576 gains on "
              "other text, loses on the training text's own: README, Recovery).")
@click.option("--recover-chat", type=int, help="Also train on this many chat transcripts "
              "(a model with a chat template): training lines as user turns, the dense model's "
              "sampled replies (default 64; 0: none).")
@click.option("--evaluate", "eval_file", is_flag=False, flag_value="", default=None,
              metavar="[FILE]", help="Compare with the dense model on held-out text (without "
              "FILE, the evaluation text shipped with lowrank); written to report.json.")
@click.option("--export", type=click.Choice(["onnx"]),
              help="Also write OUTPUT/onnx/model.onnx, validated against PyTorch.")
@click.option("--optimize", is_flag=True, help="Also write OUTPUT/onnx-optimized/model.onnx: "
              "onnxruntime's transformer optimizer (fused LayerNorm, GELU, attention where it "
              "matches), validated; int8 and bench then use it, the dense baseline too.")
@click.option("--fusion-check/--no-fusion-check", default=True,
              help="With --optimize (default on): time this CPU's optimized model (int8 with "
              "--int8) with attention's Q/K/V/output factored as planned against kept dense, "
              "which lets onnxruntime fuse attention, and keep the faster (reports/"
              "latency-optimized.md).")
@click.option("--int8", is_flag=True, help="Also write OUTPUT/onnx-int8/model.onnx (dynamic "
              "int8 quantization of the export; needs --export onnx).")
@click.option("--per-channel", is_flag=True, help="int8: one scale per output channel.")
@click.option("--reduce-range/--no-reduce-range", default=None,
              help="int8: 7-bit weights (default: on when the CPU lacks VNNI).")
@click.option("--bench", is_flag=True, help="Measure dense vs compressed ONNX latency (batch "
              "1, 16 x sequence 16, 128) into the report (needs --export onnx).")
@click.option("--method", type=click.Choice(SVD_METHODS),
              help="SVD: gram (float64 Gram eigensolver), exact (LAPACK), randomized "
              f"(seeded range finder), or auto by size (default: gram, randomized when min(m, n) > "
              f"{FactorizeSettings.exact_max_dim}).")
@click.option("--seed", type=int, help="Seed of the run's random draws: randomized SVD and the "
              "measured-loss scores' noise (default 0).")
@click.option("--oversample", type=int, help="Randomized SVD oversampling (default 10).")
@click.option("--niter", type=int, help="Randomized SVD power iterations (default 4).")
@click.option("--max-shard-size", metavar="SIZE",
              help="Largest checkpoint file in OUTPUT, e.g. 5GB (default) or 500MB; bigger "
              "checkpoints are written as shards with model.safetensors.index.json.")
@model_factory_option
@run_options
def compress_command(model, output, cache_dir, no_cache, overwrite, json_out, workers, executor,
                     device, int8, per_channel, reduce_range, **flags):
    """Compress MODEL into the low-rank checkpoint directory OUTPUT.

    MODEL is an HF directory, a .safetensors file or index, a .pt/.bin state dict, or
    `minilm` for the bundled all-MiniLM-L6-v2.
    """
    if not int8 and (per_channel or reduce_range is not None):
        raise click.UsageError("--per-channel/--reduce-range need --int8")
    spec = compress_spec(
        plan=take(flags, *PLAN_KEYS), calibration=calibration_settings(flags),
        factorize={**take(flags, "method", "seed", "oversample", "niter", "compensate"),
                   **({"split_fused": True} if flags.pop("split_fused") else {})},
        recover=take(flags, steps="recover_steps", minutes="recover_minutes",
                     mode="recover_mode", lr="recover_lr", rank="recover_rank",
                     alpha="recover_alpha", batch_size="recover_batch_size",
                     samples="recover_samples", seed="recover_seed",
                     replace_share="recover_replace_share",
                     calibration_file="recover_text", sampled_text="recover_sampled_text",
                     sampled_tokens="recover_sampled_tokens", chat="recover_chat"),
        int8={"per_channel": per_channel or None, "reduce_range": reduce_range} if int8 else None,
        **flags)
    run_and_print(spec, model, output, cache_dir, no_cache, overwrite, json_out, workers,
                  executor, device)


@click.command("run")
@click.argument("pipeline_file", type=click.Path(dir_okay=False))
@click.option("--model", help="Checkpoint (overrides the file's `model`).")
@click.option("--output", type=click.Path(file_okay=False), help="Output (overrides `output`).")
@run_options
def run_command(pipeline_file, model, output, cache_dir, no_cache, overwrite, json_out, workers,
                executor, device):
    """Run a pipeline file (see pipelines/default.toml)."""
    spec = read_pipeline(pipeline_file)
    model, output = model or spec.model, output or spec.output
    if not model or not output:
        raise click.UsageError("give --model and --output, or set them in the pipeline file")
    run_and_print(spec, model, output, cache_dir, no_cache, overwrite, json_out, workers,
                  executor, device)
