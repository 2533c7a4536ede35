"""int8 quantization of an exported ONNX model with onnxruntime's quantizer.

Two forms, chosen by measurement (reports/latency-minilm.md):

- ``dynamic`` (default): weights (MatMul factors, embedding tables through Gather) stored as int8
  with scales, activations quantized on the fly per call (``DynamicQuantizeLinear`` +
  ``MatMulInteger``: onnxruntime's QOperator form, the only one its dynamic quantizer writes).
  Each factor's input is quantized separately, so a factored layer pays two dynamic
  quantizations (DESIGN.md).
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

from .errors import InputError


FORMATS = ("dynamic", "static")


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
    from .bench import machine

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
                             reduce_range=reduce_range, weight_type=QuantType.QInt8)
        else:
            if not calibration_feeds:
                raise InputError("static int8 quantization needs calibration inputs")
            quantize_static(str(prepared), str(target), _Feeds(calibration_feeds),
                            quant_format=QuantFormat.QDQ, per_channel=settings.per_channel,
                            reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)
    return {"format": settings.format, "per_channel": settings.per_channel,
            "reduce_range": reduce_range, "bytes": Path(target).stat().st_size}
