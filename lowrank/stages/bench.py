"""The bench stage: latency of the dense and the compressed ONNX models on onnxruntime's CPU
provider (:mod:`lowrank.timing`). The dense baseline gets what the compressed model got: the
transformer optimizer's fusions when the pipeline optimizes, int8 when it quantizes — an edge
user would run the dense model that way too, so ``pairs`` gives the speedup of each compressed
variant over its dense twin."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..errors import InputError
from ..io.samples import is_tensor_file, read_calibration_tensors
from ..pipeline.stage import Context, Stage, json_loader, json_saver, register_stage
from ..timing import BenchSettings, bench
from .export import ExportSettings, OnnxArtifact, export_onnx
from .int8 import Int8Settings, int8_feeds, quantize_int8
from .optimize import OptimizeSettings, fusion_shape, optimize_onnx

TWINS = (("compressed", "dense"), ("compressed-optimized", "dense-optimized"),
         ("compressed-int8", "dense-int8"))


def _run(ctx: Context, settings: BenchSettings, export: OnnxArtifact, int8=None,
         calibrate=None, optimize=None) -> dict:
    """Dense vs compressed ONNX (optimized and int8 versions too when the pipeline makes them)."""
    if not export.path.is_file():  # an encoder-decoder export: encoder + merged decoder
        raise InputError("latency benchmarks (--bench): not supported yet for an encoder-decoder "
                         "export")
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
        if optimize is not None:
            models["dense-optimized"] = tmp / "dense-optimized.onnx"
            optimize_onnx(models["dense"], models["dense-optimized"], *fusion_shape(dense),
                          OptimizeSettings(**optimize.result["settings"]))
            models["compressed-optimized"] = optimize.path
        if int8 is not None:
            models["dense-int8"] = tmp / "dense-int8.onnx"
            same = Int8Settings(**{k: int8.result[k] for k in ("format", "per_channel",
                                                               "reduce_range")})
            source = calibrate.settings.calibration_file if calibrate is not None else None
            quantize_int8(models.get("dense-optimized", models["dense"]), models["dense-int8"],
                          same, int8_feeds(ctx.models, same, source))
            models["compressed-int8"] = int8.path
        sizes = {name: path.stat().st_size for name, path in models.items()}
        with ctx.track("bench", grid) as advance:
            result = bench(models, settings, advance)
    result["models"] = {name: {"bytes": size} for name, size in sizes.items()}
    p50 = {(r["model"], r["batch"], r["sequence"], r.get("phase")): r["p50_ms"]
           for r in result["results"]}
    result["pairs"] = [{"batch": b, "sequence": s, **({"phase": ph} if ph else {}), "model": m,
                        "baseline": base, "speedup": round(p50[base, b, s, ph] / p50[m, b, s, ph], 4)}
                       for (m, b, s, ph) in p50 for model, base in TWINS if m == model]
    return result


register_stage(Stage(
    "bench", ("export",), BenchSettings, _run,
    save=json_saver("bench.json"), load=json_loader("bench.json"),
    uses=("int8", "calibrate", "optimize"),
))
