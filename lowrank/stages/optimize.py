"""Graph fusion with onnxruntime's transformer optimizer (LayerNorm/SkipLayerNorm, GELU and,
where its patterns match, attention): what an edge user runs for the dense model too, so the
benchmark compares optimized with optimized (:mod:`lowrank.stages.bench`).

The fused graph is validated against PyTorch like the export itself. Factored projections stay
two MatMuls; a fusion that needs one dense projection (attention's Q/K/V) may not apply to them:
``fused`` in the artifact counts what did.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from ..backends import require
from ..errors import InputError
from ..models import is_causal_lm
from ..pipeline.stage import Context, Stage, register_stage
from .export import OnnxArtifact, load_onnx, onnx_scratch, save_onnx, validate_onnx, write_onnx
from .factored import LowRankCheckpoint

TWO_GB = 2 * 1024**3


@dataclass(frozen=True)
class OptimizeSettings:
    # The optimizer's fusion patterns: "bert" for encoders, "gpt2" for decoders; "auto" picks by
    # whether the model has an LM head.
    model_type: str = "auto"
    # 0: the optimizer's own fusions only; onnxruntime applies its graph optimizations when a
    # session loads the model anyway (and a level-2 file would tie it to one machine's kernels).
    opt_level: int = 0

    def __post_init__(self):
        if self.opt_level not in (0, 1, 2, 99):
            raise InputError(f"optimize opt_level must be 0, 1, 2 or 99, got {self.opt_level}")


def optimize_onnx(source: Path, target: Path, model_type: str, num_heads: int, hidden_size: int,
                  settings: OptimizeSettings = OptimizeSettings()) -> dict:
    """Write the fused version of ONNX model ``source`` to ``target``; returns what was fused."""
    require("onnxruntime")
    from onnxruntime.transformers import optimizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the optimizer's logging of unmatched patterns
        fused = optimizer.optimize_model(str(source), model_type=model_type, num_heads=num_heads,
                                         hidden_size=hidden_size, opt_level=settings.opt_level)
        big = Path(source).stat().st_size > TWO_GB or Path(f"{source}_data").exists()
        fused.save_model_to_file(str(target), use_external_data_format=big)
    counts = {op: n for op, n in fused.get_fused_operator_statistics().items() if n}
    return {"settings": asdict(settings), "model_type": model_type, "fused": counts,
            "bytes": sum(f.stat().st_size for f in Path(target).parent.glob(Path(target).name + "*"))}


def fusion_shape(model) -> tuple[str, int, int]:
    """(model_type, num_heads, hidden_size) of a transformers model, for the optimizer."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_attention_heads"):
        raise InputError("graph optimization needs a transformers model (config.json with "
                         "num_attention_heads and hidden_size)")
    return ("gpt2" if is_causal_lm(model) else "bert", config.num_attention_heads,
            config.hidden_size)


def _run(ctx: Context, settings: OptimizeSettings, export: OnnxArtifact,
         factorize: LowRankCheckpoint, recover=None) -> OnnxArtifact:
    final = recover or factorize
    if not export.path.is_file():  # an encoder-decoder export: encoder + merged decoder
        raise InputError("graph optimization (--optimize): not supported yet for an encoder-decoder "
                         "export")
    model = ctx.models.compressed(final.tensors, final.layers)
    model_type, heads, hidden = fusion_shape(model)
    if settings.model_type != "auto":
        model_type = settings.model_type
    scratch = onnx_scratch(ctx, "optimize")
    target = Path(scratch.name) / "model.onnx"
    with ctx.track("optimize", 1) as advance:
        info = optimize_onnx(export.path, target, model_type, heads, hidden, settings)
        info["validation"] = validate_onnx(model, target)
        advance("validated")
    return OnnxArtifact(Path(scratch.name), info, scratch)


register_stage(Stage(
    "optimize", ("export", "factorize"), OptimizeSettings, _run, save=save_onnx, load=load_onnx,
    emit=lambda artifact, out, ctx: write_onnx(artifact, out / "onnx-optimized"),
    uses=("recover",),
))
