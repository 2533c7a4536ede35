"""Streaming output (ShardWriter), parallel per-matrix work, and the Ray executor."""

import hashlib
import json
import signal
import threading
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lowrank.errors import InputError
from lowrank.io.checkpoint import LazyTensors, open_checkpoint
from lowrank.io.safetensors import ShardWriter, write_tensors
from lowrank.parallel import fixed_threads, ordered_map
from lowrank.stages.analyze import analyze
from lowrank.stages.factorize import factorize
from lowrank.stages.plan import PlanSettings, make_plan

from .test_cli import invoke


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mixed_tensors():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(33, 17, generator=g), "h": torch.randn(8, generator=g).half(),
            "b": torch.randn(5, 3, generator=g).bfloat16(), "i": torch.arange(7),
            "m": torch.tensor([True, False]), "empty": torch.zeros(0, 4),
            "c": torch.randn(3, dtype=torch.complex64, generator=g)}


def test_shard_writer_round_trips_every_dtype_through_safetensors(tmp_path):
    tensors = mixed_tensors()
    write_tensors(tmp_path, tensors, {"lowrank_version": "test"})
    back = load_file(str(tmp_path / "model.safetensors"))
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "lowrank_version": "test"}
    assert not list(tmp_path.glob(".*"))  # no temporary data files left


def test_shard_writer_splits_by_size_and_writes_an_index(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {f"layer{i}.weight": torch.randn(64, 64, generator=g) for i in range(5)}
    write_tensors(tmp_path, tensors, max_shard_bytes=2 * 64 * 64 * 4)  # two per shard
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert [s.name for s in shards] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    lazy = LazyTensors.open(tmp_path)  # through lowrank's own reader (index + shards)
    assert set(lazy) == set(tensors)
    assert all(torch.equal(lazy[n], t) for n, t in tensors.items())


def test_shard_writer_is_deterministic_and_never_writes_through_a_shared_name(tmp_path):
    tensors = mixed_tensors()
    write_tensors(tmp_path / "a", tensors)
    write_tensors(tmp_path / "b", dict(reversed(list(tensors.items()))))
    assert sha256(tmp_path / "a/model.safetensors") == sha256(tmp_path / "b/model.safetensors")
    # An output file hard-linked elsewhere (a cache entry) keeps its bytes when rewritten.
    (tmp_path / "link.safetensors").hardlink_to(tmp_path / "a/model.safetensors")
    before = sha256(tmp_path / "link.safetensors")
    write_tensors(tmp_path / "a", {"other": torch.ones(3)})
    assert sha256(tmp_path / "link.safetensors") == before


def test_a_failed_write_leaves_no_files(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path) as writer:
            writer.add("w", torch.ones(10))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_streamed_factorization_equals_the_in_memory_one(tmp_path, toy_checkpoint):
    ckpt = open_checkpoint(toy_checkpoint)
    plan = make_plan(analyze(ckpt), PlanSettings(param_ratio=0.6))
    in_memory = factorize(ckpt, plan)
    streamed = factorize(ckpt, plan, out_dir=tmp_path / "out")
    assert isinstance(streamed.tensors, LazyTensors)
    assert set(streamed.tensors) == set(in_memory.tensors)
    assert all(torch.equal(streamed.tensors[n], t) for n, t in in_memory.tensors.items())
    assert streamed.params_after == in_memory.params_after
    assert streamed.lowrank_config() == in_memory.lowrank_config()


def _square(x):
    return x * x


def test_ordered_map_keeps_task_order_and_consumes_tasks_lazily():
    consumed = []

    def tasks():
        for i in range(20):
            consumed.append(i)
            yield (i,)

    for executor in ("thread", "process"):
        consumed.clear()
        results = ordered_map(_square, tasks(), workers=2, executor=executor)
        assert next(results) == 0
        assert len(consumed) <= 4  # a window of 2 × workers, not every task up front
        assert list(results) == [i * i for i in range(1, 20)]


def _threads_in_task(i):
    with fixed_threads():  # a no-op in the pool's threads, which run at 1 thread already
        return i, torch.get_num_threads()


def test_thread_executor_runs_tasks_at_one_thread_and_restores_the_thread_count():
    torch.set_num_threads(2)  # the test machine may have one core: make the change visible
    try:
        got = list(ordered_map(_threads_in_task, [(i,) for i in range(12)], workers=3,
                               executor="thread"))
        assert got == [(i, 1) for i in range(12)]
        assert torch.get_num_threads() == 2
        later = []  # and the default a thread started later takes
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert later == [2]
    finally:
        torch.set_num_threads(_DEFAULT_THREADS)


_DEFAULT_THREADS = torch.get_num_threads()


def test_thread_executor_gives_the_bytes_of_a_serial_run(toy_checkpoint):
    ckpt = open_checkpoint(toy_checkpoint)
    serial = analyze(ckpt, workers=1)
    threaded = analyze(ckpt, workers=3, executor="thread")
    assert threaded.to_json() == serial.to_json()
    assert all(threaded.matrices[n].singular_values == s.singular_values
               for n, s in serial.matrices.items())
    plan = make_plan(serial, PlanSettings(param_ratio=0.6))
    a = factorize(ckpt, plan, workers=1)
    b = factorize(ckpt, plan, workers=3, executor="thread")
    assert a.tensors.keys() == b.tensors.keys() and a.layers == b.layers
    assert all(torch.equal(b.tensors[n], t) for n, t in a.tensors.items())


class _Signalled(Exception):
    pass


def _sleep_in_pool(started: threading.Event, pool_thread: list, seconds: float) -> int:
    pool_thread.append(threading.get_ident())
    started.set()
    time.sleep(seconds)
    return 0


def test_a_signal_handed_to_a_pool_thread_interrupts_the_wait_at_once():
    """The kernel may deliver Ctrl-C or SIGTERM to any thread. Delivered to a pool thread, its
    Python handler must still run in the main thread while that waits for the task."""
    started, pool_thread = threading.Event(), []

    def raise_signalled(signum, frame):
        raise _Signalled

    def signal_the_pool_thread():
        started.wait()
        time.sleep(0.5)  # the main thread is waiting for the task by now
        signal.pthread_kill(pool_thread[0], signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, raise_signalled)
    sender = threading.Thread(target=signal_the_pool_thread)
    sender.start()
    start = time.perf_counter()
    try:
        with pytest.raises(_Signalled):
            list(ordered_map(_sleep_in_pool, [(started, pool_thread, 5.0)] * 2, 2, "thread"))
    finally:
        signal.signal(signal.SIGUSR1, previous)
        sender.join()
    assert time.perf_counter() - start < 2.0  # not after the 5-second task


def test_bad_executor_and_worker_counts_are_input_errors():
    with pytest.raises(InputError, match="executor must be one of"):
        list(ordered_map(_square, [(1,)], executor="dask"))
    with pytest.raises(InputError, match="workers must be >= 1"):
        list(ordered_map(_square, [(1,)], workers=0))
    with pytest.raises(InputError, match="workers must be an integer"):
        list(ordered_map(_square, [(1,)], workers="many"))
    result = invoke("compress", "x", "y", "--workers", "0")
    assert result.exit_code == 2 and "'auto'" in result.output


@pytest.mark.parametrize("executor", ["thread", "process", "ray"])
def test_parallel_output_is_byte_identical_to_serial(tmp_path, toy_checkpoint, executor):
    if executor == "ray":
        pytest.importorskip("ray")  # the `ray` extra; installed with `dev`
    serial = invoke("compress", toy_checkpoint, tmp_path / "serial", "--param-ratio", 0.6,
                    "--no-cache", "--workers", 1)
    assert serial.exit_code == 0, serial.output
    parallel = invoke("compress", toy_checkpoint, tmp_path / "parallel", "--param-ratio", 0.6,
                      "--no-cache", "--workers", 2, "--executor", executor)
    assert parallel.exit_code == 0, parallel.output
    for name in ("model.safetensors", "lowrank_config.json"):
        assert sha256(tmp_path / "serial" / name) == sha256(tmp_path / "parallel" / name)
    assert not list(tmp_path.glob(".lowrank-*"))  # the streaming scratch directory is gone
