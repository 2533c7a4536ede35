"""Per-matrix work in parallel: local processes (``--workers N``) or a Ray cluster
(``--executor ray``).

Results come back in task order and at most ``2 × workers`` tasks are in flight, so memory stays
bounded however many matrices a checkpoint has. Each task runs with a fixed number of torch
threads (:func:`fixed_threads`): BLAS/LAPACK results depend on the thread count, and this is what
makes the output byte-identical whether it was computed serially, in processes or on Ray.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor

import torch

from .backends import require
from .errors import InputError
from .io.checkpoint import Checkpoint, open_checkpoint

EXECUTORS = ("process", "ray")
THREADS_PER_TASK = 1


@contextlib.contextmanager
def fixed_threads(n: int = THREADS_PER_TASK):
    """Run a per-matrix task with ``n`` torch threads (and a heap that gives memory back)."""
    _pin_mmap_threshold()
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_OPENED: dict[str, Checkpoint] = {}


def open_source(source: Checkpoint | str) -> Checkpoint:
    """An open checkpoint, or the one at path ``source`` (opened once per worker process)."""
    if isinstance(source, Checkpoint):
        return source
    if source not in _OPENED:
        _OPENED[source] = open_checkpoint(source)
    return _OPENED[source]


@functools.cache
def _pin_mmap_threshold(threshold: int = 4 << 20) -> None:
    """glibc raises its mmap threshold after a big block is freed, so later large temporaries
    (float64 blocks, SVD workspaces) come from the heap, which fragments and grows by one block
    per matrix (measured: +16 MB per 2048×8192 matrix). A fixed threshold keeps blocks of 4 MB and
    more on mmap, returned to the system when freed. No-op where glibc's mallopt is absent."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD


def check_executor(executor: str, workers: int) -> None:
    if executor not in EXECUTORS:
        raise InputError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    if executor == "ray":
        require("ray")


def ordered_map(fn: Callable, tasks: Iterable[tuple], workers: int = 1,
                executor: str = "process") -> Iterator:
    """``fn(*task)`` for each task, in order. ``tasks`` is consumed lazily (a task may carry
    large arguments, e.g. a Gram matrix). ``fn`` must be importable (module level)."""
    check_executor(executor, workers)
    if executor == "ray":
        yield from _ray_map(fn, tasks, workers)
    elif workers == 1:
        for task in tasks:
            yield fn(*task)
    else:
        # spawn, not fork: forking a process whose OpenMP/MKL threads are running can deadlock.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            yield from _windowed(lambda task: pool.submit(fn, *task), lambda f: f.result(),
                                 tasks, 2 * workers)


def _ray_map(fn: Callable, tasks: Iterable[tuple], workers: int) -> Iterator:
    ray = require("ray")

    if not ray.is_initialized():
        # RAY_ADDRESS (a cluster) is honoured by ray.init; otherwise a local one is started.
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    remote = ray.remote(num_cpus=1)(fn)
    yield from _windowed(lambda task: remote.remote(*task), ray.get, tasks,
                         2 * max(workers, int(ray.cluster_resources().get("CPU", workers))))


def _windowed(submit: Callable, wait: Callable, tasks: Iterable[tuple], window: int) -> Iterator:
    pending: deque = deque()
    for task in tasks:
        pending.append(submit(task))
        if len(pending) >= window:
            yield wait(pending.popleft())
    while pending:
        yield wait(pending.popleft())
