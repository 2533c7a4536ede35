"""int8 quantization of an exported ONNX model with onnxruntime's quantizer.

Two forms, chosen by measurement (reports/latency-minilm.md):

- ``dynamic`` (default): weights (MatMul factors, embedding tables through Gather) stored as int8
  with scales, activations quantized on the fly per call (``DynamicQuantizeLinear`` +
  ``MatMulInteger``: onnxruntime's QOperator form, the only one its dynamic quantizer writes).
  Each factor's input is quantized separately, so a factored layer pays two dynamic
  quantizations.
- ``static``: QDQ form (QuantizeLinear/DequantizeLinear pairs around MatMuls) with activation
  ranges measured (MinMax) on calibration inputs.

The graph is first pre-processed (``quant_pre_process``: onnxruntime's constant folding turns each
``Transpose(factor)`` into an initializer the quantizer can see, plus shape inference).
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..backends import require
from ..errors import InputError
from ..io.samples import model_batches, read_calibration
from ..models import Models
from ..pipeline.stage import Context, Stage, register_stage
from ..timing import machine
from .export import OnnxArtifact, load_onnx, onnx_scratch, save_onnx, write_onnx
from .export_seq2seq import hoist_shared_initializers

FORMATS = ("dynamic", "static")
# Shape inference cannot type the outputs of onnxruntime's fused contrib ops (an optimized
# graph: lowrank.stages.optimize); everything lowrank exports is float32.
FUSED_GRAPH_TYPES = {"DefaultTensorType": 1}  # onnx.TensorProto.FLOAT
# A merged decoder (encoder-decoder export) computes inside the branches of an If.
DYNAMIC_OPTIONS = FUSED_GRAPH_TYPES | {"EnableSubgraph": True}


@dataclass(frozen=True)
class Int8Settings:
    format: str = "dynamic"  # dynamic (QOperator) | static (QDQ, calibrated activation ranges)
    per_channel: bool = False  # one scale per output channel instead of per tensor
    # 7-bit weights: avoids int16 overflow in the u8·s8 kernels of CPUs without VNNI (accuracy).
    # None: on when the CPU lacks VNNI.
    reduce_range: bool | None = None
    samples: int = 64  # static: calibration samples (the calibrate stage's text, or the bundled)

    def __post_init__(self):
        if self.format not in FORMATS:
            raise InputError(f"int8 format must be one of {', '.join(FORMATS)}, got {self.format!r}")


def has_vnni() -> bool:
    return any("vnni" in flag or flag == "amx_int8" for flag in machine()["isa"])


class _Feeds:
    """onnxruntime's CalibrationDataReader protocol over a list of input dicts."""

    def __init__(self, feeds: list[dict]):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def quantize_int8(source: Path, target: Path, settings: Int8Settings = Int8Settings(),
                  calibration_feeds: list[dict] | None = None) -> dict:
    """Write the int8 version of ONNX model ``source`` to ``target``; returns what was done.

    ``calibration_feeds`` (numpy input dicts) are needed for the static format.
    """
    require("onnxruntime")
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not Path(source).is_file():
        raise InputError(f"{source}: no such ONNX file")
    reduce_range = (not has_vnni()) if settings.reduce_range is None else settings.reduce_range
    with tempfile.TemporaryDirectory(prefix="lowrank-int8-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        if settings.format == "dynamic":
            quantize_dynamic(str(prepared), str(target), per_channel=settings.per_channel,
                             reduce_range=reduce_range, weight_type=QuantType.QInt8,
                             extra_options=DYNAMIC_OPTIONS)
            _share_branch_weights(Path(target))
        else:
            if not calibration_feeds:
                raise InputError("static int8 quantization needs calibration inputs")
            quantize_static(str(prepared), str(target), _Feeds(calibration_feeds),
                            quant_format=QuantFormat.QDQ, per_channel=settings.per_channel,
                            reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, extra_options=FUSED_GRAPH_TYPES)
    return {"format": settings.format, "per_channel": settings.per_channel,
            "reduce_range": reduce_range, "bytes": Path(target).stat().st_size}


def _share_branch_weights(path: Path) -> None:
    import onnx

    proto = onnx.load(str(path))
    if hoist_shared_initializers(proto):
        onnx.save(proto, str(path))


def int8_feeds(models: Models, settings: Int8Settings, calibration_file: str | None):
    """Static int8: the calibration samples (text, or tensors for a model factory's model) as
    numpy feeds; None for dynamic int8, which needs none."""
    if settings.format != "static":
        return None
    data = read_calibration(calibration_file, settings.samples, warn=False)
    tokenizer = models.tokenizer() if isinstance(data, list) else None
    return [{k: v.numpy() for k, v in inputs.items()}
            for inputs, _ in model_batches(data, tokenizer, 8, 128)]


def _run(ctx: Context, settings: Int8Settings, export: OnnxArtifact, calibrate=None,
         optimize=None) -> OnnxArtifact:
    source = calibrate.settings.calibration_file if calibrate is not None else None
    export = optimize or export  # quantize the fused graph when the pipeline optimizes
    scratch = onnx_scratch(ctx, "int8")
    with ctx.track("int8", 1) as advance:
        if export.path.is_file():
            info = quantize_int8(export.path, Path(scratch.name) / "model.onnx", settings,
                                 int8_feeds(ctx.models, settings, source))
        elif settings.format != "dynamic":
            raise InputError("int8 of an encoder-decoder export is dynamic only (its encoder "
                             "and decoder would need calibration inputs each)")
        else:  # an encoder-decoder export: each file on its own
            files = {f.name: quantize_int8(f, Path(scratch.name) / f.name, settings)
                     for f in sorted(export.directory.glob("*.onnx"))}
            info = {**next(iter(files.values())), "bytes": sum(i["bytes"] for i in files.values()),
                    "files": {name: i["bytes"] for name, i in files.items()}}
        advance("quantized")
    return OnnxArtifact(Path(scratch.name), info, scratch)


register_stage(Stage(
    "int8", ("export",), Int8Settings, _run, save=save_onnx, load=load_onnx,
    emit=lambda artifact, out, ctx: write_onnx(artifact, out / "onnx-int8"),
    uses=("calibrate", "optimize"),
))
