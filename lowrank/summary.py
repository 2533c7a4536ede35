"""The summary of a compression run: what `lowrank compress` prints and returns with --json."""

from __future__ import annotations

from .pipeline import RunResult


def summarize(result: RunResult) -> dict:
    """Parameters and bytes before/after, per-layer ranks and errors, stage timings."""
    lowrank = result.artifacts.get("factorize")
    model_file = result.output / "model.safetensors"
    before = result.checkpoint.num_params()
    after = lowrank.params_after if lowrank else before
    return {
        "input": str(result.checkpoint.path),
        "output": str(result.output),
        "params": {"before": before, "after": after, "ratio": round(after / before, 6)},
        "bytes": {"before": result.checkpoint.num_bytes(),
                  "after": model_file.stat().st_size if model_file.exists() else None},
        "layers": {n: r.to_json() for n, r in lowrank.layers.items()} if lowrank else {},
        "stages": [{k: st[k] for k in ("stage", "cached", "seconds")}
                   for st in result.manifest["stages"]],
    }
