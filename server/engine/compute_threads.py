"""Keeps torch's CPU parallelism to one long-lived thread: the engine's.

torch runs its CPU operators in parallel through OpenMP. libgomp gives every thread that opens
a parallel region its own pool of worker threads and keeps that pool until the thread exits.
Once all pools' threads together outnumber the CPUs, libgomp throttles spinning in every pool:
a worker sleeps on a futex as soon as a region ends, so each of the decode step's hundreds of
small parallel regions pays a wake-up. On 2 CPU cores the engine's decode step took 12% longer
on base rows and 15% longer with adapter rows after one other long-lived thread (the one that
had loaded the model) had run a single parallel operator; its many small adapter bmms took 3x.

So, in a serving process:
- heavy one-off work off the engine thread (loading the model, the warm-up forward) runs on a
  passing thread (`in_passing_thread`): its pool goes when it ends;
- long-lived helper threads (cold loads, prefetch, upload validation, asyncio's executor and
  loop) run their torch operators serially (`helper_pool` for a pool, `serial_torch_ops` for
  one thread, `torch_ops_serially` for a block): they handle adapter-sized tensors, and a
  serial thread never opens a region, so never a pool.
The engine thread keeps torch's default thread count. `serial_torch_ops` changes only the
calling thread (OpenMP's per-thread setting); torch.set_num_threads would change every thread.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")

_OPENMP_LIBRARIES = ("libgomp", "libiomp5", "libomp")
"""The OpenMP runtimes torch builds link (GNU on Linux wheels, Intel's or LLVM's elsewhere)."""


@cache
def _openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime this process has loaded (torch's), or None (no OpenMP, not Linux)."""
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        return None
    for line in maps.read_text().splitlines():
        path = line.rsplit(" ", 1)[-1]
        if any(Path(path).name.startswith(name + ".so") for name in _OPENMP_LIBRARIES):
            try:
                runtime = ctypes.CDLL(path)  # the loaded library again: dlopen shares it
                runtime.omp_set_num_threads.argtypes = [ctypes.c_int]
                return runtime
            except (OSError, AttributeError):
                log.warning("cannot use the OpenMP runtime at %s", path)
                return None
    return None


def serial_torch_ops() -> bool:
    """From now on this thread runs torch's CPU operators on itself alone (other threads keep
    their thread counts). Whether it took effect (False: no OpenMP runtime found)."""
    runtime = _openmp_runtime()
    if runtime is None:
        return False
    # torch sets each thread's OpenMP thread count on the thread's first query; after that it
    # reads it back per operator, so ours has to come second.
    torch.get_num_threads()
    runtime.omp_set_num_threads(1)
    return torch.get_num_threads() == 1


def helper_pool(name: str, workers: int | None = None) -> ThreadPoolExecutor:
    """A pool of long-lived helper threads that run torch operators serially (`workers`:
    ThreadPoolExecutor's default when None)."""
    return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=serial_torch_ops)


@contextmanager
def torch_ops_serially() -> Iterator[None]:
    """`serial_torch_ops` for the calling thread until the block ends, then its thread count
    as before (for a command's main thread that only orchestrates, e.g. the bench)."""
    before = torch.get_num_threads()
    took = serial_torch_ops()
    try:
        yield
    finally:
        runtime = _openmp_runtime()
        if took and runtime is not None:
            runtime.omp_set_num_threads(before)


def in_passing_thread(work: Callable[[], T], *, name: str) -> T:
    """Runs `work` on a new thread that ends with it, and returns its result (or raises its
    exception here): whatever OpenMP pool its operators open leaves with that thread."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
