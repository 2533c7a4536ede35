"""Latency of ONNX models on onnxruntime's CPU provider, measured honestly.

Every measurement runs in a fresh process (``python -m lowrank.timing --worker …``) with explicit
intra-/inter-op thread counts, warm-up runs first; engines alternate round by round so drift on
the machine hits all of them alike. Reported per model and (batch, sequence) point: p50/p90/p99
latency over all timed runs and QPS (sequences per second at p50), with the CPU model, its ISA
flags and library versions.

Decoders exported with a KV cache (:mod:`lowrank.stages.export_decoder`) are timed twice per
(batch, sequence) point: ``prefill``, the prompt of that many tokens with an empty cache, and
``decode``, one new token per sequence after a cache of that many tokens: the two costs of
generation, which one forward over the whole sequence would mix up.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .backends import require
from .errors import InputError, LowrankError
from .generate import PAST, cache_feeds, step_feeds

ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
             "amx_tile", "amx_int8", "asimd", "sve")


@dataclass(frozen=True)
class BenchSettings:
    batches: tuple[int, ...] = (1, 16)
    sequences: tuple[int, ...] = (16, 128)
    runs: int = 30  # timed runs per round and model
    warmup: int = 5  # untimed runs at the start of every process
    rounds: int = 3  # processes per model and grid point, alternating between models
    intra_threads: int = 2  # intra-op threads (onnxruntime's default is all cores)
    inter_threads: int = 1
    seed: int = 0

    def __post_init__(self):
        if min(self.runs, self.rounds, self.intra_threads, self.inter_threads) < 1 or self.warmup < 0:
            raise InputError("bench runs, rounds and thread counts must be >= 1, warm-up >= 0")
        if not self.batches or not self.sequences or min(*self.batches, *self.sequences) < 1:
            raise InputError("bench batch and sequence sizes must be >= 1")


def machine() -> dict:
    """CPU model, ISA flags, core count and versions: what a latency number depends on."""
    onnxruntime = require("onnxruntime")

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
    except OSError:
        pass
    return {"cpu": cpu, "isa": [f for f in ISA_FLAGS if f in flags], "cores": os.cpu_count(),
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _summary(latencies_ms: list[float], batch: int) -> dict:
    p50, p90, p99 = (float(v) for v in np.percentile(latencies_ms, [50, 90, 99]))
    return {"p50_ms": round(p50, 4), "p90_ms": round(p90, 4), "p99_ms": round(p99, 4),
            "qps": round(batch * 1000 / p50, 2), "runs": len(latencies_ms)}


def _worker_command(path: Path, batch: int, seq: int, s: BenchSettings, round_: int,
                    phase: str = "forward") -> list[str]:
    return [sys.executable, "-m", "lowrank.timing", "--worker", str(path), phase, str(batch),
            str(seq), str(s.runs), str(s.warmup), str(s.intra_threads), str(s.inter_threads),
            str(s.seed + round_)]


def phases(path: Path) -> tuple[str, ...]:
    """("prefill", "decode") for a decoder with a KV cache, ("forward",) for any other model."""
    onnx = require("onnx")

    graph = onnx.load(str(path), load_external_data=False).graph
    return ("prefill", "decode") if any(i.name.startswith(PAST) for i in graph.input) else ("forward",)


def bench(models: dict[str, Path], settings: BenchSettings = BenchSettings(),
          on_point=None) -> dict:
    """Latency of each named ONNX model over the batch × sequence grid.

    Returns:
        ``{"settings", "machine", "results": [{"model", "batch", "sequence", p50_ms, …}],
        "speedup": [{"batch", "sequence", "<model>": dense p50 / model p50}]}``; the first
        model is the baseline of ``speedup``.
    """
    for name, path in models.items():
        if not Path(path).is_file():
            raise InputError(f"{path}: no such ONNX file")
    kinds = {name: phases(Path(path)) for name, path in models.items()}
    if len(set(kinds.values())) > 1:
        raise InputError("bench: decoders with a KV cache and other models cannot share a table")
    steps = next(iter(kinds.values()))
    results = []
    for batch in settings.batches:
        for seq in settings.sequences:
            for phase in steps:
                times: dict[str, list[float]] = {name: [] for name in models}
                for round_ in range(settings.rounds):
                    for name, path in models.items():
                        times[name] += _run_worker(_worker_command(Path(path), batch, seq,
                                                                   settings, round_, phase))
                for name in models:
                    extra = {} if phase == "forward" else {"phase": phase}
                    results.append({"model": name, "batch": batch, "sequence": seq, **extra,
                                    **_summary(times[name], batch)})
            if on_point:
                on_point(f"{batch}x{seq}")
    baseline = next(iter(models))
    speedup = []
    for batch in settings.batches:
        for seq in settings.sequences:
            for phase in steps:
                point = {r["model"]: r["p50_ms"] for r in results if r["batch"] == batch
                         and r["sequence"] == seq and r.get("phase", "forward") == phase}
                extra = {} if phase == "forward" else {"phase": phase}
                speedup.append({"batch": batch, "sequence": seq, **extra,
                                **{n: round(point[baseline] / point[n], 4) for n in models}})
    return {"settings": asdict(settings), "machine": machine(),
            "models": {n: str(p) for n, p in models.items()}, "results": results,
            "speedup": speedup}


def _run_worker(command: list[str]) -> list[float]:
    env = dict(os.environ, OMP_NUM_THREADS=command[-3])
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise LowrankError(f"{command[4]}: benchmark worker failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def feeds(session, batch: int, seq: int, seed: int, phase: str = "forward") -> dict:
    """Random inputs for each graph input: token ids, all-ones masks, zero type ids, floats.

    A decoder's (``phase`` prefill or decode): ``seq`` new tokens on an empty cache, or one new
    token on a random cache of ``seq`` tokens shaped from the session's cache inputs."""
    rng = np.random.default_rng(seed)
    if phase != "forward":
        new, past = (seq, 0) if phase == "prefill" else (1, seq)
        ids = rng.integers(1000, 2000, size=(batch, new), dtype=np.int64)
        return {**step_feeds(ids, past), **cache_feeds(session, batch, past, rng)}
    out = {}
    for inp in session.get_inputs():
        # Symbolic axes: the first is the batch, the second the sequence (Optimum's layout).
        shape = [d if isinstance(d, int) else batch if i == 0 else seq if i == 1 else 1
                 for i, d in enumerate(inp.shape)]
        if "int64" in inp.type:
            if "mask" in inp.name:
                out[inp.name] = np.ones(shape, dtype=np.int64)
            elif "type" in inp.name:
                out[inp.name] = np.zeros(shape, dtype=np.int64)
            else:
                out[inp.name] = rng.integers(1000, 2000, size=shape, dtype=np.int64)
        else:
            out[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def cpu_session(model, intra: int, inter: int = 1):
    """An onnxruntime CPU session with explicit thread counts (``model``: path or bytes)."""
    ort = require("onnxruntime")

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = intra, inter
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def time_runs(session, feed: dict, runs: int, warmup: int) -> list[float]:
    """Milliseconds of each of ``runs`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000)
    return times


def _worker(path: str, phase: str, batch: int, seq: int, runs: int, warmup: int, intra: int,
            inter: int, seed: int) -> None:
    session = cpu_session(path, intra, inter)
    print(json.dumps(time_runs(session, feeds(session, batch, seq, seed, phase), runs, warmup)))


# --------------------------------------------------------------------------------------------
# Latency-aware planning: does factoring a layer pay on *this* CPU?
#
# A microbenchmark times, on onnxruntime, one dense MatMul x·Wᵀ against the factored pair
# (x·Bᵀ)·Aᵀ for a layer shape, rank and token count (batch × sequence). Small layers are
# overhead-bound (measured: at batch 1 a 256×256 layer at rank 16 was only 1.9× faster, and 1.7×
# slower at break-even), so the planner keeps a layer dense where the factored pair is not faster
# at every token count asked for. Timings are cached per machine (CPU model, ISA flags,
# onnxruntime version, threads) in ``<cache>/latency/<machine>.json``: a shape is measured once.


def machine_key(threads: int) -> str:
    m = machine()
    ident = {k: m[k] for k in ("cpu", "isa", "cores", "onnxruntime")} | {"threads": threads}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _graph(rows: int, cols: int, rank: int | None, seed: int = 0):
    """ONNX model computing x·Wᵀ (rank None) or (x·Bᵀ)·Aᵀ, weights as initializers."""
    onnx = require("onnx")
    TensorProto, helper, numpy_helper = onnx.TensorProto, onnx.helper, onnx.numpy_helper

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


if __name__ == "__main__" and len(sys.argv) == 11 and sys.argv[1] == "--worker":
    _worker(sys.argv[2], sys.argv[3], *map(int, sys.argv[4:11]))
