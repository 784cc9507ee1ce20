"""compute_threads: serial helper threads, passing threads, and the engine's helpers using them.

The premise is checked too, in a fresh interpreter (omp_pool_probe.py): a long-lived thread
that ran one parallel torch operator keeps an OpenMP pool of extra OS threads, a serial one does
not, and a passing thread's pool leaves with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from loraserve.server.engine import compute_threads
from loraserve.server.engine.cold_loader import ColdLoader, PageLayout
from loraserve.server.engine.compute_threads import (
    in_passing_thread,
    serial_torch_ops,
    torch_ops_serially,
)
from loraserve.server.engine.host_cache import HostCache
from loraserve.server.engine.types import AdapterKey, EngineError, ErrorKind

OPENMP = "OpenMP" in torch.__config__.parallel_info() and Path("/proc/self/maps").is_file()
"""torch's CPU operators run through OpenMP here (every Linux wheel) and /proc names it."""


def threads_in_new_thread(setup=None) -> int:
    """torch.get_num_threads() as a new thread sees it, after `setup` ran in that thread."""
    return in_passing_thread(
        lambda: (setup() if setup else None, torch.get_num_threads())[1], name="probe"
    )


@pytest.mark.skipif(not OPENMP, reason="torch here is not built with OpenMP")
def test_serial_torch_ops_changes_only_the_calling_thread() -> None:
    default = threads_in_new_thread()
    assert threads_in_new_thread(serial_torch_ops) == 1
    assert threads_in_new_thread() == default  # other threads keep torch's default


@pytest.mark.skipif(not OPENMP, reason="torch here is not built with OpenMP")
def test_torch_ops_serially_restores_the_thread_s_count() -> None:
    def block() -> tuple[int, int, int]:
        before = torch.get_num_threads()
        with torch_ops_serially():
            inside = torch.get_num_threads()
        return before, inside, torch.get_num_threads()

    before, inside, after = in_passing_thread(block, name="probe")
    assert (inside, after) == (1, before)


@pytest.mark.skipif(not OPENMP, reason="torch here is not built with OpenMP")
def test_serial_thread_computes_the_same() -> None:
    x = torch.randn(300, 400, generator=torch.Generator().manual_seed(0))  # (300, 400)
    expected = (x @ x.T).softmax(-1)  # (300, 300)

    def serial() -> torch.Tensor:
        serial_torch_ops()
        return (x @ x.T).softmax(-1)

    got = in_passing_thread(serial, name="serial")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def test_serial_torch_ops_without_an_openmp_runtime_is_a_no_op(monkeypatch) -> None:
    monkeypatch.setattr(compute_threads, "_openmp_runtime", lambda: None)
    assert threads_in_new_thread(lambda: serial_torch_ops()) == threads_in_new_thread()
    assert not in_passing_thread(serial_torch_ops, name="probe")


def test_in_passing_thread_returns_on_a_thread_that_has_ended() -> None:
    seen: list[threading.Thread] = []

    def work() -> int:
        seen.append(threading.current_thread())
        return 42

    assert in_passing_thread(work, name="passing-probe") == 42
    assert seen[0] is not threading.current_thread()
    assert seen[0].name == "passing-probe"
    assert not seen[0].is_alive()


def test_in_passing_thread_raises_the_work_s_exception() -> None:
    def fail() -> None:
        raise EngineError(ErrorKind.INVALID_ARGUMENT, "bad input")

    with pytest.raises(EngineError, match="bad input"):
        in_passing_thread(fail, name="failing")


@pytest.mark.skipif(not OPENMP, reason="torch here is not built with OpenMP")
def test_pools_outlive_plain_threads_not_serial_or_passing_ones() -> None:
    probe = Path(__file__).with_name("omp_pool_probe.py")
    done = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    if counts["threads"] < 2:
        pytest.skip("one CPU thread: torch opens no OpenMP pool at all")
    # The helper itself plus its pool's workers, kept while it lives: what serial_torch_ops and
    # in_passing_thread exist to avoid. (Proves the probe can see a pool.)
    assert counts["plain"] >= counts["before"] + 2, counts
    assert counts["serial"] == counts["before"] + 1, counts  # the helper alone
    assert counts["after_passing"] == counts["before"], counts


KEY = AdapterKey(tenant="t", name="a", version=1)


@pytest.mark.skipif(not OPENMP, reason="torch here is not built with OpenMP")
def test_cold_load_threads_run_torch_serially() -> None:
    seen: list[int] = []

    def read(key: AdapterKey):
        seen.append(torch.get_num_threads())
        raise EngineError(ErrorKind.NOT_FOUND, "no such adapter")

    loader = ColdLoader(
        read, PageLayout(page_rank=8, dtype=torch.float32, device=torch.device("cpu"))
    )
    try:
        assert loader.start(KEY)
        loader.wait(KEY)
        assert seen == [1]
        error = loader.take_error(KEY)
        assert error is not None and error.kind is ErrorKind.NOT_FOUND
    finally:
        loader.close()


@pytest.mark.skipif(not OPENMP, reason="torch here is not built with OpenMP")
def test_host_cache_prefetch_threads_run_torch_serially() -> None:
    seen: list[int] = []
    loaded = threading.Event()

    def read(key: AdapterKey):
        seen.append(torch.get_num_threads())
        loaded.set()
        raise EngineError(ErrorKind.NOT_FOUND, "no such adapter")

    cache = HostCache(read, 1 << 20)
    try:
        cache.prefetch(KEY)
        assert loaded.wait(10)
        assert seen == [1]
    finally:
        cache.close()
