"""ONNX export of a dense or low-rank HF model, validated against PyTorch.

The graph computes each factored layer as two MatMuls, x·Bᵀ then ·Aᵀ — never a folded A·B
(onnxruntime has no MatMul→MatMul fusion and would keep the folded dense weight) — and
:func:`check_factors` proves it by finding every factor among the saved initializers. Encoders follow Optimum's names:
inputs ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the model takes it), output
``last_hidden_state``; causal LMs output ``logits``; dynamic axes ``batch_size`` and
``sequence_length``. Models over 2 GB are saved with external data (``model.onnx_data``).

Other models (a model factory's: CNNs, LSTMs) are exported from example tensor inputs (a
.safetensors/.pt file, samples on dim 0): inputs keep the file's names, the output is
``logits`` (or ``output``), only the batch axis is dynamic, and validation runs real samples.

Causal LMs are exported with their KV cache (:mod:`.export_decoder`), encoder-decoder models as
an encoder and a merged decoder (:mod:`.export_seq2seq`); the validation rule and check are
:mod:`.export_validate`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..backends import require
from ..errors import InputError, ValidationError
from ..generate_seq2seq import DECODER_FILE
from ..io.files import write_json
from ..io.samples import is_tensor_file, read_calibration_tensors
from ..models import eager_attention
from ..nn.adapters import lowrank_modules
from ..pipeline.stage import Context, Stage, register_stage
from .export_decoder import random_prompts, takes_cache, validate_generation, write_decoder
from .export_seq2seq import (
    takes_seq2seq_cache,
    validate_seq2seq,
    validate_seq2seq_generation,
    write_seq2seq,
)
from .export_validate import (  # noqa: F401  (compare, validate_onnx: this module's API too)
    ExportSettings,
    NamedOutput,
    compare,
    example_inputs,
    is_lm,
    signature,
    validate_onnx,
    vocab_size,
)
from .factored import LowRankCheckpoint

TWO_GB = 2 * 1024**3


@dataclass
class ExportResult:
    path: Path
    inputs: list[str]
    outputs: list[str]
    rule: str = ""  # ExportSettings.rule: what validation checked
    validation: list[dict] = field(default_factory=list)  # per input shape
    factors: dict = field(default_factory=dict)  # check_factors' result
    bytes: int = 0
    generation: list[dict] = field(default_factory=list)  # decoders: greedy check per prompt
    files: dict = field(default_factory=dict)  # encoder-decoder: file name -> inputs, outputs

    def to_json(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def export_onnx(model: nn.Module, path: Path, settings: ExportSettings | None = None,
                inputs: dict[str, torch.Tensor] | None = None) -> ExportResult:
    """Write ``model`` to ``path`` (ONNX), validate it with onnxruntime, check the factors.

    ``inputs`` (name -> tensor, samples on dim 0) exports a model that takes tensors, not
    token ids: traced on two samples, validated on 1, 2 and 4 others.

    Raises:
        ValidationError: onnxruntime's outputs differ from PyTorch's beyond the rule of
            :func:`compare` on any validation input, or a factor is missing from the graph.
    """
    onnx = require("onnx")

    settings = settings or ExportSettings()
    model = model.eval()
    if takes_seq2seq_cache(model, inputs):
        if not settings.cache:
            raise InputError("an encoder-decoder model is exported with its cache only "
                             "(drop --no-past / [export] cache = false)")
        return export_seq2seq(model, path.parent, settings)
    names, output, feeds = signature(model, inputs)
    if feeds is None:
        generator = torch.Generator().manual_seed(settings.seed)
        example = tuple(example_inputs(names, 2, 8, vocab_size(model), generator))
        axes = {n: {0: "batch_size", 1: "sequence_length"} for n in (*names, output)}
    else:
        example = tuple(inputs[n][:2] for n in names)
        axes = {n: {0: "batch_size"} for n in (*names, output)}
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    path.parent.mkdir(parents=True, exist_ok=True)
    decoder = settings.cache and takes_cache(model, inputs)
    if decoder:
        names, outputs = write_decoder(model, path, settings.opset, settings.seed)
    else:
        outputs = [output]
        wrapper = NamedOutput(model, names, output).eval()  # export restores this mode: keep eval
        with warnings.catch_warnings(), eager_attention(model):
            warnings.simplefilter("ignore")  # tracer and deprecation chatter, not user-facing
            torch.onnx.export(wrapper, example, str(path), input_names=names, output_names=outputs,
                              dynamic_axes=axes, opset_version=settings.opset, dynamo=False,
                              # keep initializer names, so check_factors can find every factor
                              do_constant_folding=False)
    if n_bytes > TWO_GB:  # protobuf's limit: move the weights next to the graph
        proto = onnx.load(str(path))
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + "_data")
    result = ExportResult(path, names, outputs, settings.rule(is_lm(output, feeds), decoder))
    result.factors = check_factors(model, path)
    result.validation = validate_onnx(model, path, settings, inputs)
    if decoder:
        prompts = random_prompts(vocab_size(model), settings.seed + 2)
        result.generation = validate_generation(model, path, prompts, settings.new_tokens,
                                                settings.logprob_tol)
    result.bytes = sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))
    return result


def export_seq2seq(model: nn.Module, directory: Path, settings: ExportSettings) -> ExportResult:
    """An encoder-decoder model as ``directory``/encoder_model.onnx + decoder_model_merged.onnx
    (:mod:`.export_seq2seq`), validated: the result's path, inputs and outputs are the merged
    decoder's, ``files`` has both files' names."""
    directory.mkdir(parents=True, exist_ok=True)
    files = write_seq2seq(model, directory, settings.opset, settings.seed)
    paths = [directory / name for name in files]
    decoder = directory / DECODER_FILE
    result = ExportResult(decoder, files[DECODER_FILE]["inputs"], files[DECODER_FILE]["outputs"],
                          settings.rule(True, True), files=files)
    result.factors = check_factors(model, paths)
    result.validation = validate_seq2seq(model, directory, settings)
    result.generation = validate_seq2seq_generation(
        model, directory, random_prompts(vocab_size(model), settings.seed + 2),
        settings.new_tokens, settings.logprob_tol)
    result.bytes = sum(f.stat().st_size for name in files for f in directory.glob(name + "*"))
    return result


def check_factors(model: nn.Module, path: Path | list[Path]) -> dict:
    """Every low-rank factor used by the graph must be an initializer of its own, so onnxruntime
    multiplies by B then A. The export keeps parameter names (no exporter constant folding), so
    a module whose factors are both absent was pruned as unused by the output (e.g. BERT's
    pooler for ``last_hidden_state``); one factor without the other means A·B was folded."""
    onnx = require("onnx")

    paths = path if isinstance(path, list) else [path]
    names = {i.name.removeprefix("model.") for p in paths
             for i in onnx.load(str(p), load_external_data=False).graph.initializer}
    found, unused = 0, []
    for name in lowrank_modules(model):
        present = [f"{name}.{f}" in names for f in ("A", "B")]
        if all(present):
            found += 2
        elif not any(present):
            unused.append(name)
        else:
            raise ValidationError(f"{path}: only one factor of {name} is in the graph (was A·B "
                                  f"folded into one weight?)")
    if found == 0 and unused:
        raise ValidationError(f"{path}: no low-rank factor is in the graph")
    return {"factors": found, "unused_modules": unused}


# --------------------------------------------------------------------------------------------
# The pipeline stage: its artifact is an ONNX model on disk, never its bytes in memory (models
# over 2 GB come with external data).


@dataclass
class OnnxArtifact:
    directory: Path  # model.onnx (+ model.onnx_data) and nothing else
    result: dict  # ExportResult.to_json() without the path (or the int8 stage's info)
    owner: tempfile.TemporaryDirectory | None = None  # a scratch directory, removed with this

    @property
    def path(self) -> Path:
        return self.directory / "model.onnx"


def write_onnx(artifact: OnnxArtifact, directory: Path) -> None:
    """``directory``/model.onnx (+ its data) and export.json: what OUTPUT/onnx holds."""
    directory.mkdir(parents=True, exist_ok=True)
    for file in artifact.directory.iterdir():
        shutil.copyfile(file, directory / file.name)
    write_json(directory / "export.json", artifact.result)


def save_onnx(artifact: OnnxArtifact, directory: Path) -> None:
    """The cache keeps the model files apart from export.json, so loading needs no copy."""
    write_onnx(artifact, directory / "model")
    (directory / "model" / "export.json").replace(directory / "export.json")


def load_onnx(directory: Path) -> OnnxArtifact:
    return OnnxArtifact(directory / "model", json.loads((directory / "export.json").read_text()))


def onnx_scratch(ctx: Context, stage: str) -> tempfile.TemporaryDirectory:
    """Where a stage writes its ONNX files: beside OUTPUT when the run has a work directory."""
    return ctx.scratch(stage) or tempfile.TemporaryDirectory(prefix=f"lowrank-{stage}-")


def _run(ctx: Context, settings: ExportSettings, factorize: LowRankCheckpoint,
         recover=None) -> OnnxArtifact:
    final = recover or factorize
    if not ctx.models.runnable:
        raise InputError(f"{ctx.checkpoint.path}: ONNX export needs an architecture: give an HF "
                         f"model directory (config.json) or a model factory")
    example = (read_calibration_tensors(settings.inputs_file, 8, warn=False)
               if is_tensor_file(settings.inputs_file) else None)
    if example is None and ctx.checkpoint.model_dir is None:
        raise InputError("ONNX export of a model factory's model needs example inputs: a "
                         "tensor calibration file or [export] inputs_file")
    model = ctx.models.compressed(final.tensors, final.layers)
    scratch = onnx_scratch(ctx, "export")
    with ctx.track("export", 1) as advance:
        result = export_onnx(model, Path(scratch.name) / "model.onnx", settings, example)
        advance("validated")
    return OnnxArtifact(Path(scratch.name), {k: v for k, v in result.to_json().items()
                                             if k != "path"}, scratch)


register_stage(Stage(
    "export", ("factorize",), ExportSettings, _run, save=save_onnx, load=load_onnx,
    emit=lambda artifact, out, ctx: write_onnx(artifact, out / "onnx"),
    uses=("recover",),
))
