"""`lowrank export MODEL OUTDIR`: ONNX, validated against PyTorch."""

from __future__ import annotations

from pathlib import Path

import click
from rich.filesize import decimal

from ..io.files import atomic_directory, check_output_path, write_json
from ..io.samples import read_calibration_tensors
from ..load import load_any
from ..stages.export import ExportSettings, export_onnx
from .console import emit_json, json_option, model_factory_option, out, resolve_model, rich_track


@click.command("export")
@click.argument("model")
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("--atol", type=float, help="Fixed validation tolerance |Δ| ≤ atol + rtol·|PyTorch| "
              f"per element; given (or --rtol), it replaces the default rule, max |Δ| ≤ "
              f"{ExportSettings.rel_tol:g} × the RMS of PyTorch's output.")
@click.option("--rtol", type=float, help="See --atol.")
@click.option("--logprob-tol", type=float, default=ExportSettings.logprob_tol, show_default=True,
              help="Causal LMs: max |Δ log-prob| (nats) on real tokens; top-1 may differ only "
              "at ties this close.")
@click.option("--opset", type=int, default=17, show_default=True)
@click.option("--past/--no-past", default=True, show_default=True,
              help="Causal LMs and encoder-decoder models: export with the KV cache (Optimum's "
              "text-generation-with-past / seq2seq layouts) and check greedy decoding against "
              "PyTorch.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty OUTDIR.")
@model_factory_option
@click.option("--inputs", "inputs_file", type=click.Path(dir_okay=False),
              help="Example inputs for a model that takes tensors (.safetensors/.pt: name -> "
              "tensor, samples on dim 0); needed with --model-factory.")
@json_option
def export_command(model, outdir, atol, rtol, logprob_tol, opset, past, overwrite, model_factory,
                   inputs_file, json_out):
    """Export MODEL (an HF directory or a lowrank output) to OUTDIR/model.onnx (encoder-decoder
    models: OUTDIR/encoder_model.onnx + decoder_model_merged.onnx) and validate it against
    PyTorch on three random inputs (and greedy decoding with the cache); exit 4 when they differ
    beyond the rule."""
    source = Path(resolve_model(model))
    outdir = Path(outdir)
    check_output_path(outdir, [source], overwrite)
    if model_factory and not inputs_file:
        raise click.UsageError("--model-factory needs --inputs FILE (example input tensors)")
    inputs = read_calibration_tensors(inputs_file, 8, warn=False) if inputs_file else None
    network = load_any(source, model_factory)
    with atomic_directory(outdir) as tmp, rich_track("export", 1) as advance:
        settings = ExportSettings(opset, atol=atol, rtol=rtol, logprob_tol=logprob_tol,
                                  cache=past)
        result = export_onnx(network, tmp / "model.onnx", settings, inputs)
        advance("validated")
        data = {k: v for k, v in result.to_json().items() if k != "path"}
        data["path"] = str(outdir / result.path.name)
        write_json(tmp / "export.json", data)
    if emit_json(data, json_out):
        return
    out.print(f"validation: {data['rule']}")
    for v in data["validation"]:
        lm = (f"; top-1 agreement {v['top1_agreement']:.2%}, max |Δ log-prob| "
              f"{v['max_logprob_diff']:.2e}" if "top1_agreement" in v else "")
        out.print(f"input {'x'.join(map(str, v['shape']))}: max abs diff {v['max_abs_diff']:.2e} = "
                  f"{v['rel_error']:.1e} × RMS {v['scale']:.3g}{lm}")
    if data["files"]:
        out.print(f"encoder-decoder: {', '.join(data['files'])} (Optimum's seq2seq layout)")
    for g in data["generation"]:
        out.print(f"greedy with the KV cache, prompt of {g['prompt_length']} tokens: "
                  f"{g['match_length']} of {g['tokens']} tokens equal to PyTorch's")
    out.print(f"{data['factors']['factors']} factors in the graph; {decimal(data['bytes'])} "
              f"written to {data['path']}")
