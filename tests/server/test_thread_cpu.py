"""server.thread_cpu: CPU seconds per thread, by label, as a Prometheus counter."""

from __future__ import annotations

import sys
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from loraserve.server.thread_cpu import (
    NATIVE,
    ThreadCpuCollector,
    task_cpu_seconds,
    thread_cpu_seconds,
    thread_label,
)

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/task")


def test_labels_drop_the_pool_index() -> None:
    assert thread_label("loraserve-io_3") == "loraserve-io"
    assert thread_label("adapter-cold-load_0") == "adapter-cold-load"
    assert thread_label("Thread-12") == "Thread"
    assert thread_label("loraserve-engine") == "loraserve-engine"
    assert thread_label("MainThread") == "MainThread"


def test_a_stat_line_whose_command_holds_spaces_and_parentheses_parses() -> None:
    fields = ["S"] + ["0"] * 10 + ["250", "50"] + ["0"] * 30  # utime, stime: fields 14, 15
    line = "4242 (odd) name (x)) " + " ".join(fields)
    assert task_cpu_seconds(line) == pytest.approx(300 / _ticks())


@linux_only
def test_a_busy_named_thread_shows_under_its_label() -> None:
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    worker = threading.Thread(target=spin, name="loraserve-spin_7")
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while thread_cpu_seconds().get("loraserve-spin", 0.0) <= 0.0:
            assert time.monotonic() < deadline, "the spinning thread never showed CPU time"
            time.sleep(0.05)
        registry = CollectorRegistry()
        ThreadCpuCollector(registry)
        text = generate_latest(registry).decode()
    finally:
        stop.set()
        worker.join()
    assert 'loraserve_thread_cpu_seconds_total{thread="loraserve-spin"}' in text
    assert 'loraserve_thread_cpu_seconds_total{thread="MainThread"}' in text
    assert all(label == NATIVE or not label[-1].isdigit() for label in thread_cpu_seconds())


def _ticks() -> int:
    import os

    return os.sysconf("SC_CLK_TCK")
