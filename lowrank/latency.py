"""Latency-aware planning: does factoring a layer pay on *this* CPU?

A microbenchmark times, on onnxruntime, one dense MatMul x·Wᵀ against the factored pair
(x·Bᵀ)·Aᵀ for a layer shape, rank and token count (batch × sequence). Small layers are
overhead-bound (DESIGN.md: at batch 1 a 256×256 layer at rank 16 was only 1.9× faster, and 1.7×
slower at break-even), so the planner keeps a layer dense where the factored pair is not faster
at every token count asked for. Timings are cached per machine (CPU model, ISA flags,
onnxruntime version, threads) in ``<cache>/latency/<machine>.json``: a shape is measured once.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path


def machine_key(threads: int) -> str:
    from .bench import machine

    m = machine()
    ident = {k: m[k] for k in ("cpu", "isa", "cores", "onnxruntime")} | {"threads": threads}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _graph(rows: int, cols: int, rank: int | None, seed: int = 0):
    """ONNX model computing x·Wᵀ (rank None) or (x·Bᵀ)·Aᵀ, weights as initializers."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", cols])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tokens", rows])
    if rank is None:
        inits = [numpy_helper.from_array(rng.standard_normal((cols, rows), np.float32), "Wt")]
        nodes = [helper.make_node("MatMul", ["x", "Wt"], ["y"])]
    else:
        inits = [numpy_helper.from_array(rng.standard_normal((cols, rank), np.float32), "Bt"),
                 numpy_helper.from_array(rng.standard_normal((rank, rows), np.float32), "At")]
        nodes = [helper.make_node("MatMul", ["x", "Bt"], ["h"]),
                 helper.make_node("MatMul", ["h", "At"], ["y"])]
    graph = helper.make_graph(nodes, "layer", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def time_layer(rows: int, cols: int, rank: int | None, tokens: int, threads: int,
               runs: int = 30, warmup: int = 5) -> float:
    """Median milliseconds of one call of the dense (rank None) or factored layer."""
    import numpy as np

    from .bench import cpu_session, time_runs

    session = cpu_session(_graph(rows, cols, rank), threads)
    feed = {"x": np.random.default_rng(1).standard_normal((tokens, cols), np.float32)}
    return statistics.median(time_runs(session, feed, runs, warmup))


@dataclass
class LatencyTable:
    """Cached microbenchmark timings of one machine; ``ms(...)`` measures what is missing."""

    path: Path | None
    threads: int = 2
    timings: dict | None = None
    measured: int = 0  # new measurements this run (the rest came from the cache)

    def __post_init__(self):
        self.timings = {}
        if self.path and self.path.is_file():
            try:
                self.timings = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):
                self.timings = {}  # a corrupt cache is remeasured, never trusted

    @classmethod
    def for_machine(cls, cache_dir: Path | None, threads: int = 2) -> LatencyTable:
        path = cache_dir / "latency" / f"{machine_key(threads)}.json" if cache_dir else None
        return cls(path, threads)

    def ms(self, rows: int, cols: int, rank: int | None, tokens: int) -> float:
        key = f"{rows}x{cols}:{'dense' if rank is None else f'r{rank}'}:t{tokens}"
        if key not in self.timings:
            self.timings[key] = round(time_layer(rows, cols, rank, tokens, self.threads), 5)
            self.measured += 1
        return self.timings[key]

    def save(self) -> None:
        if self.path is None or not self.measured:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.timings, indent=0, sort_keys=True))
        tmp.replace(self.path)
