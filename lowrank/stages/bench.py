"""The bench stage: latency of the dense and the compressed ONNX models (and their int8
versions when the pipeline quantizes) on onnxruntime's CPU provider (:mod:`lowrank.timing`)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..io.samples import is_tensor_file, read_calibration_tensors
from ..pipeline.stage import Context, Stage, json_loader, json_saver, register_stage
from ..timing import BenchSettings, bench
from .export import ExportSettings, OnnxArtifact, export_onnx
from .int8 import Int8Settings, int8_feeds, quantize_int8


def _run(ctx: Context, settings: BenchSettings, export: OnnxArtifact, int8=None,
         calibrate=None) -> dict:
    """Dense vs compressed ONNX (and their int8 versions when the pipeline quantizes)."""
    dense = ctx.models.dense()
    example = (calibrate.settings.calibration_file
               if calibrate is not None and ctx.models.factory is not None
               and is_tensor_file(calibrate.settings.calibration_file) else None)
    grid = len(settings.batches) * len(settings.sequences)
    with tempfile.TemporaryDirectory(prefix="lowrank-bench-") as tmp:
        tmp = Path(tmp)
        models = {"dense": tmp / "dense.onnx", "compressed": tmp / "compressed.onnx"}
        export_onnx(dense, models["dense"], ExportSettings(inputs_file=example),
                    read_calibration_tensors(example, 8, warn=False) if example else None)
        models["compressed"] = export.path
        if int8 is not None:
            models["dense-int8"] = tmp / "dense-int8.onnx"
            same = Int8Settings(**{k: int8.result[k] for k in ("format", "per_channel",
                                                               "reduce_range")})
            source = calibrate.settings.calibration_file if calibrate is not None else None
            quantize_int8(models["dense"], models["dense-int8"], same,
                          int8_feeds(ctx.models, same, source))
            models["compressed-int8"] = int8.path
        sizes = {name: path.stat().st_size for name, path in models.items()}
        with ctx.track("bench", grid) as advance:
            result = bench(models, settings, advance)
    result["models"] = {name: {"bytes": size} for name, size in sizes.items()}
    return result


register_stage(Stage(
    "bench", ("export",), BenchSettings, _run,
    save=json_saver("bench.json"), load=json_loader("bench.json"),
    uses=("int8", "calibrate"),
))
