"""Per-matrix work in parallel: threads of this process (the default, ``--workers auto``: one
per CPU core), local processes (``--executor process``) or a Ray cluster (``--executor ray``).

Results come back in task order and at most ``2 × workers`` tasks are in flight, so memory stays
bounded however many matrices a checkpoint has. Each task runs with a fixed number of torch
threads (:func:`fixed_threads`): BLAS/LAPACK results depend on the thread count, and this is what
makes the output byte-identical whether it was computed serially, in threads, in processes or on
Ray. Threads work because torch releases the GIL in its kernels, and because torch's intra-op
thread count is per thread under OpenMP/MKL: each pool thread sets it once (1) when it starts,
the calling thread keeps its own, and the process-wide default new threads take is restored at
the end. Whitening factors are computed with one thread wherever they are computed
(:meth:`lowrank.stages.calibrate.ActivationStats.whitening_factor`), in-process tasks computing
their own.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import multiprocessing
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures

import torch

from .backends import require
from .errors import InputError
from .io.checkpoint import Checkpoint, open_checkpoint

EXECUTORS = ("thread", "process", "ray")
AUTO = "auto"  # workers: one per CPU core (on CPU; 1 with an accelerator)
THREADS_PER_TASK = 1
_POOL_THREAD = threading.local()  # .pinned: a thread of _thread_map's pool


@contextlib.contextmanager
def fixed_threads(n: int = THREADS_PER_TASK):
    """Run a per-matrix task with ``n`` torch threads (and a heap that gives memory back).

    In a pool thread of the thread executor, a no-op: the thread was set to
    ``THREADS_PER_TASK`` when it started, and setting and restoring torch's thread count from
    several threads at once would race on its process-wide default."""
    _pin_mmap_threshold()
    if getattr(_POOL_THREAD, "pinned", False):
        yield
        return
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


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_workers(workers: int | str, device: str | None = None) -> int:
    """``workers`` as a count: ``"auto"`` is one per CPU core, or 1 when the maths runs on an
    accelerator (``device`` other than CPU: tasks would only queue on it)."""
    if workers == AUTO:
        return cpu_cores() if device is None or str(device).startswith("cpu") else 1
    if isinstance(workers, str) and workers.isdigit():
        workers = int(workers)
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise InputError(f"workers must be an integer >= 1 or {AUTO!r}, got {workers!r}")
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    return workers


def check_executor(executor: str, workers: int | str) -> None:
    if executor not in EXECUTORS:
        raise InputError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    resolve_workers(workers)
    if executor == "ray":
        require("ray")


def in_process(executor: str, workers: int | str, device: str | None = None) -> bool:
    """Whether tasks run in this process (serially or in threads): they can then take the
    open checkpoint and share memoized results, instead of a path and their own."""
    return executor == "thread" or (executor == "process"
                                    and resolve_workers(workers, device) == 1)


def ordered_map(fn: Callable, tasks: Iterable[tuple], workers: int | str = 1,
                executor: str = "thread") -> Iterator:
    """``fn(*task)`` for each task, in order. ``tasks`` is consumed lazily (a task may carry
    large arguments, e.g. a Gram matrix). ``fn`` must be importable (module level) for the
    process and Ray executors; with threads, ``fn`` and the tasks' arguments are shared, so
    ``fn`` must be thread-safe."""
    check_executor(executor, workers)
    workers = resolve_workers(workers)
    if executor == "ray":
        yield from _ray_map(fn, tasks, workers)
    elif workers == 1:
        for task in tasks:
            yield fn(*task)
    elif executor == "thread":
        yield from _thread_map(fn, tasks, workers)
    else:
        # spawn, not fork: forking a process whose OpenMP/MKL threads are running can deadlock.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            yield from _windowed(lambda task: pool.submit(fn, *task), _result, tasks, 2 * workers)


# How often a wait for a task wakes: a signal (Ctrl-C, SIGTERM) that the kernel hands to another
# thread (a pool thread, an OpenMP one) runs its Python handler only when the main thread runs
# bytecode, and a wait without a timeout would keep it blocked until the task ends.
POLL_SECONDS = 0.2


def _result(future: Future):
    while not future.done():
        wait_futures([future], timeout=POLL_SECONDS)
    return future.result()


def _pin_pool_thread() -> None:
    _POOL_THREAD.pinned = True
    torch.set_num_threads(THREADS_PER_TASK)  # this thread's own (OpenMP, MKL) thread count


def _thread_map(fn: Callable, tasks: Iterable[tuple], workers: int) -> Iterator:
    before = torch.get_num_threads()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="lowrank", initializer=_pin_pool_thread)
    finished = False
    try:
        yield from _windowed(lambda task: pool.submit(fn, *task), _result, tasks, 2 * workers)
        finished = True
    finally:
        # Interrupted (Ctrl-C, SIGTERM, an error): queued tasks are cancelled and running ones
        # not waited for, so the run unwinds (scratch removed) at once; the CLI then exits
        # without joining them (lowrank.cli).
        pool.shutdown(wait=finished, cancel_futures=True)
        # The pool threads' set_num_threads also set the default that threads started later
        # take; this thread's own count never changed.
        torch.set_num_threads(before)


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
