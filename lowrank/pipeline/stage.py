"""The stage protocol: what a stage module registers, and the context a stage runs in.

A stage is a room of its own (:mod:`lowrank.stages`): frozen settings, a pure core function, a
typed artifact with its save/load, and one :func:`register_stage` call that tells the runner its
name, what it needs and how its artifact is cached and written into OUTPUT.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io.checkpoint import Checkpoint
from ..io.files import write_json
from ..io.safetensors import DEFAULT_MAX_SHARD_BYTES
from ..models import Models

Advance = Callable[[str], None]
# (description, total) -> context manager yielding advance(item name); the CLI plugs rich in.
Track = Callable[[str, int], contextlib.AbstractContextManager[Advance]]


def no_progress(description: str, total: int) -> contextlib.AbstractContextManager[Advance]:
    return contextlib.nullcontext(lambda name: None)


@dataclass
class Context:
    """What every stage of one run shares: the checkpoint, how to build its models, progress,
    and where scratch files go."""

    checkpoint: Checkpoint
    models: Models
    track: Track = no_progress
    cache_dir: Path | None = None
    # Per-matrix work (analyze, scores' factors, factorize) in parallel: lowrank.parallel;
    # "auto": one thread per CPU core.
    workers: int | str = "auto"
    executor: str = "thread"
    # Where factorize and export put their files (bounded memory); None keeps them in memory.
    work_dir: Path | None = None
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES  # checkpoint files written into OUTPUT
    # Where calibration, analysis, factorization and recovery compute (lowrank.device).
    device: str = "cpu"
    scratch_dirs: list[tempfile.TemporaryDirectory] = field(default_factory=list)

    def scratch(self, stage: str) -> tempfile.TemporaryDirectory | None:
        """A temporary directory under ``work_dir`` (None without one); it is removed when the
        artifact holding it is dropped, or by :meth:`release` after a failure or a signal."""
        if self.work_dir is None:
            return None
        self.work_dir.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.TemporaryDirectory(prefix=f".lowrank-{stage}-", dir=self.work_dir)
        self.scratch_dirs.append(tmp)
        return tmp

    def release(self) -> None:
        for tmp in self.scratch_dirs:
            tmp.cleanup()


@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, ...]  # stages that must run before; their artifacts are passed in order
    settings_type: type
    run: Callable[..., Any]  # (ctx, settings, *needed artifacts, **used artifacts) -> artifact
    save: Callable[[Any, Path], None]  # artifact -> cache directory
    load: Callable[[Path], Any]  # cache directory -> artifact
    emit: Callable[[Any, Path, Context], None] | None = None  # artifact -> OUTPUT
    uses: tuple[str, ...] = ()  # optional stages: passed as keywords when in the pipeline
    # Extra cache-key input for results that depend on the machine (latency measurements).
    machine: Callable[[Any], str | None] = lambda settings: None
    # (settings, device, {optional stage in the run: its artifact}) -> what "auto" settings
    # resolve to on this machine and these inputs, e.g. {"forward_dtype": "bfloat16"}: in the
    # cache key, so machines that resolve them differently share no entries, and in the
    # manifest: what "auto" meant.
    resolved: Callable[[Any, str, dict], dict] = lambda settings, device, used: {}
    # What the artifact is, when later stages may refine it ("checkpoint": factorize, then
    # recover): only the last stage that provides it writes it into OUTPUT.
    provides: str | None = None
    # Computes on Context.device: a run elsewhere than CPU gets cache entries of its own
    # (results differ in the last bits between devices).
    on_device: bool = False


STAGES: dict[str, Stage] = {}


def register_stage(stage: Stage) -> Stage:
    STAGES[stage.name] = stage
    return stage


def json_saver(filename: str, to_json: Callable[[Any], Any] = lambda a: a):
    """``save``/``emit`` for an artifact that is one JSON file."""
    return lambda artifact, directory, *ctx: write_json(directory / filename, to_json(artifact))


def json_loader(filename: str, from_json: Callable[[Any], Any] = lambda d: d):
    return lambda directory: from_json(json.loads((directory / filename).read_text()))
