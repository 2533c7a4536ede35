"""The runner: a spec's stages in order, each artifact from the cache or computed, then OUTPUT
written atomically (only the last stage that provides the checkpoint writes it) with
``manifest.json`` and the report.

A pipeline file (TOML) lists ``stages`` in order and one table of settings per stage; see
``pipelines/default.toml``. A rerun skips finished stages and a changed setting reruns from that
stage on (:mod:`lowrank.pipeline.cache`).
"""

from __future__ import annotations

import contextlib
import platform
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..device import resolve_device
from ..errors import GateFailed, InputError
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.files import atomic_directory, check_output_path, copy_model_files, write_json
from ..models import Models
from ..parallel import check_executor, resolve_workers
from ..stages.gate import check, raise_if_failed
from ..stages.report import build_report, write_report
from ..version import __version__
from .cache import Cache, digest, factory_digest, file_sha256, setting_file_sha256
from .spec import PipelineSpec, make_settings, max_shard_bytes, settings_of
from .stage import STAGES, Context, Track, no_progress


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwind like Ctrl-C, so scratch files are removed."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def _signals_unwind():
    """Turn SIGTERM/SIGHUP into an exception while a run is in progress (main thread only:
    Python lets no other thread set handlers); the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def unwind(signum, frame):
        raise Terminated(signum)

    previous = {s: signal.signal(s, unwind) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@dataclass
class RunResult:
    output: Path | None  # None for :func:`execute`, which writes no OUTPUT
    checkpoint: Checkpoint
    artifacts: dict[str, Any]
    manifest: dict
    report: dict | None  # report.json
    context: Context

    def release(self) -> None:
        """Remove the scratch files behind streamed artifacts now (they would go with the
        artifacts otherwise); the artifacts' tensors are unreadable afterwards."""
        self.context.release()


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    found = {"lowrank": __version__, "python": sys.version.split()[0],
             "platform": platform.platform()}
    for pkg in ("torch", "safetensors", "transformers", "onnx", "onnxruntime", "numpy"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return found


def _check_order(spec: PipelineSpec) -> None:
    for i, name in enumerate(spec.stages):
        missing = [n for n in STAGES[name].needs if n not in spec.stages[:i]]
        late = [n for n in STAGES[name].uses if n in spec.stages[i:]]
        if missing or late:
            raise InputError(f"{spec.source}: stage {name} needs {', '.join(missing + late)} "
                             f"before it")


def execute(
    spec: PipelineSpec,
    model: str | Path,
    *,
    cache_dir: str | Path | None = None,
    track: Track = no_progress,
    model_factory=None,
    workers: int | str = "auto",
    executor: str = "thread",
    work_dir: Path | None = None,
    device: str | None = None,
) -> RunResult:
    """Run ``spec``'s stages on checkpoint ``model`` without writing an output directory.

    ``model_factory`` (or the pipeline file's ``model_factory``): ``package.module:function``
    or a zero-argument callable returning the dense ``nn.Module`` of a non-HF checkpoint.
    ``workers``/``executor``: per-matrix work in parallel (:mod:`lowrank.parallel`; default:
    one thread per CPU core).
    ``device``: ``cpu``, ``cuda`` or ``mps`` (or the pipeline file's ``device``; default: an
    accelerator when torch sees one, see :mod:`lowrank.device`).
    ``work_dir``: factorize and export put their files in temporary directories there instead
    of memory; they go with the artifacts, or with :meth:`RunResult.release`.

    Returns:
        A :class:`RunResult` without ``output`` and ``report``.
    """
    ckpt = open_checkpoint(model)
    cache_dir = Path(cache_dir) if cache_dir is not None else None
    model_factory = model_factory or spec.model_factory
    check_executor(executor, workers)
    device = resolve_device(device or spec.device)
    workers = resolve_workers(workers, device)
    settings = {name: make_settings(spec, STAGES[name]) for name in spec.stages}
    _check_order(spec)
    cache = Cache(cache_dir)
    inputs = [{"file": str(f), "bytes": f.stat().st_size, "sha256": file_sha256(f, cache.memo)}
              for f in ckpt.files]
    model_digest = digest([i["sha256"] for i in inputs])
    factory_info = factory_digest(model_factory) if model_factory is not None else None
    if factory_info is not None:  # the architecture is an input too: its name and source
        model_digest = digest([model_digest, factory_info])
    ctx = Context(ckpt, Models(ckpt, model_factory), track, cache_dir, workers, executor,
                  work_dir, max_shard_bytes(spec.max_shard_size, spec.source), device=device)
    artifacts, records = {}, []
    try:
        with _signals_unwind():
            _run_stages(spec, ctx, settings, cache, model_digest, artifacts, records)
    except BaseException:
        ctx.release()  # no scratch directories left behind by a failed or stopped run
        raise
    cache.save_memo()
    manifest = {"format": "lowrank.manifest", "version": 1, "versions": _versions(),
                "pipeline": spec.source, "device": device, "input": {"path": str(ckpt.path), "files": inputs},
                "stages": records}
    if factory_info is not None:
        manifest["input"]["model_factory"] = factory_info
    return RunResult(None, ckpt, artifacts, manifest, None, ctx)


def _run_stages(spec: PipelineSpec, ctx: Context, settings: dict, cache: Cache,
                model_digest: str, artifacts: dict, records: list) -> None:
    keys = {}
    for name in spec.stages:
        stage, stage_settings = STAGES[name], settings[name]
        used = {n: artifacts[n] for n in stage.uses if n in artifacts}
        file_digests = {k: setting_file_sha256(name, k, v)
                        for k, v in asdict(stage_settings).items() if k.endswith("_file") and v}
        resolved = stage.resolved(stage_settings, ctx.device, used)
        resolved = {"resolved": resolved} if resolved else {}
        keys[name] = digest({"stage": name, "lowrank": __version__, "model": model_digest,
                             "settings": asdict(stage_settings), "files": file_digests,
                             "machine": stage.machine(stage_settings),
                             "upstream": [keys[n] for n in (*stage.needs, *used)],
                             **_device_key(stage, ctx.device), **resolved})
        start = time.perf_counter()
        artifact = cache.get(stage, keys[name])
        cached = artifact is not None
        if not cached:
            artifact = stage.run(ctx, stage_settings, *[artifacts[n] for n in stage.needs],
                                 **used)
            cache.put(stage, keys[name], artifact)
        artifacts[name] = artifact
        records.append({"stage": name, "key": keys[name], "cached": cached,
                        "seconds": round(time.perf_counter() - start, 3),
                        "settings": asdict(stage_settings), **resolved})


def _device_key(stage, device: str) -> dict:
    """The device in a stage's cache key, off CPU only: CPU keys stay those of earlier runs."""
    kind = device.split(":")[0]
    return {"device": kind} if stage.on_device and kind != "cpu" else {}


def _emitting(spec: PipelineSpec) -> list[str]:
    """Stages that write into OUTPUT: of those providing the same artifact (the checkpoint from
    factorize, then recover), only the last."""
    last = {STAGES[n].provides: n for n in spec.stages if STAGES[n].provides}
    return [n for n in spec.stages if STAGES[n].emit is not None
            and (STAGES[n].provides is None or last[STAGES[n].provides] == n)]


def run_pipeline(
    spec: PipelineSpec,
    model: str | Path,
    output: str | Path,
    *,
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
    track: Track = no_progress,
    model_factory=None,
    workers: int | str = "auto",
    executor: str = "thread",
    device: str | None = None,
) -> RunResult:
    """Run ``spec``'s stages on checkpoint ``model`` and write the output directory atomically.

    Args:
        spec: stages and settings (:func:`~lowrank.pipeline.spec.read_pipeline`,
            :func:`~lowrank.pipeline.spec.default_pipeline` or ``compress_spec``).
        model: checkpoint path (see :func:`lowrank.io.checkpoint.open_checkpoint`).
        output: output directory; must not be, contain or lie inside the input.
        cache_dir: where stage artifacts are cached; None disables caching.
        overwrite: replace an existing non-empty output directory.
        track: progress factory ``(description, total) -> context manager of advance(name)``.
        model_factory: the architecture of a non-HF checkpoint, ``package.module:function`` or
            a zero-argument callable returning the dense ``nn.Module`` (see :func:`execute`).
        workers: how many matrices at a time for the per-matrix work (analyze, the scores'
            factors, factorize); ``"auto"``: one per CPU core (1 on an accelerator). The output
            is the same whatever the count.
        executor: ``"thread"`` (threads of this process), ``"process"`` (local processes) or
            ``"ray"`` (a Ray cluster; ``RAY_ADDRESS``).
        device: where calibration, analysis, factorization and recovery compute: ``"cpu"``,
            ``"cuda"``, ``"mps"``; None: the pipeline file's, else an accelerator if any.

    Memory: the factorized checkpoint is streamed to a work directory beside OUTPUT, so peak
    memory stays near a few times the largest tensor whatever the model size. SIGTERM, SIGHUP
    and Ctrl-C leave neither OUTPUT nor scratch files.

    Returns:
        :class:`RunResult` with each stage's artifact, the manifest and the report written to
        OUTPUT.
    """
    output = Path(output)
    probe = open_checkpoint(model)  # refuse a bad OUTPUT before any work
    check_output_path(output, [probe.path, *probe.files], overwrite)
    # Scratch space beside OUTPUT: the same disk, and room for a checkpoint of that size.
    run = execute(spec, model, cache_dir=cache_dir, track=track, model_factory=model_factory,
                  workers=workers, executor=executor, work_dir=output.resolve().parent,
                  device=device)
    try:
        with _signals_unwind(), atomic_directory(output) as tmp:
            copy_model_files(run.checkpoint.model_dir, tmp)
            for name in _emitting(spec):
                STAGES[name].emit(run.artifacts[name], tmp, run.context)
            write_json(tmp / "manifest.json", run.manifest)
            report = build_report(run.checkpoint, run.artifacts, run.manifest, tmp, output)
            if "gate" in run.artifacts:
                report["gate"] = check(report, run.artifacts["gate"],
                                       settings_of(spec, "gate").allow_missing)
            write_report(report, run.artifacts, tmp)
    except BaseException:
        run.release()
        raise
    run.output, run.report = output, report
    # OUTPUT is written either way: its report says why a gate failed.
    try:
        raise_if_failed(report.get("gate", []), f"; see {output}/report.md", attach=True)
    except GateFailed:
        run.release()
        raise
    return run
