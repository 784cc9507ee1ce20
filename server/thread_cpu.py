"""CPU seconds per thread of this process, as a Prometheus counter read at scrape time.

The engine thread and the gRPC event loop share one GIL: when the loop's CPU time grows, the
engine's steps slow down even on a GPU. `loraserve_thread_cpu_seconds_total{thread=...}` shows
who uses the process's CPU: `MainThread` is the event loop (`loraserve serve` runs it there),
`loraserve-engine` the engine, pools are summed under their name without the worker index, and
threads Python does not know (torch's and gRPC's native threads) are `native`.

Linux only (it reads /proc/self/task); elsewhere the family is empty. A thread that exits takes
its time with it, which a rate() over the counter treats as a reset.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily

NATIVE = "native"
"""The label of threads Python did not start (or started and named nothing we can read)."""

_TASKS = Path("/proc/self/task")
_WORKER_INDEX = re.compile(r"[-_]\d+$")
_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def thread_label(name: str) -> str:
    """A thread's name without its pool index (`loraserve-io_3` -> `loraserve-io`): a bounded
    label set whatever the pools' sizes."""
    return _WORKER_INDEX.sub("", name)


def task_cpu_seconds(stat_line: str) -> float:
    """User plus system CPU seconds from one /proc/<pid>/task/<tid>/stat line."""
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat_line.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_SECOND


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds so far, summed by thread label; {} where /proc/self/task is missing."""
    if not _TASKS.is_dir():
        return {}
    names = {t.native_id: thread_label(t.name) for t in threading.enumerate()}
    totals: dict[str, float] = {}
    for task in _TASKS.iterdir():
        try:
            seconds = task_cpu_seconds((task / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue  # the thread exited while we listed
        label = names.get(int(task.name), NATIVE)
        totals[label] = totals.get(label, 0.0) + seconds
    return totals


class ThreadCpuCollector:
    """A custom collector: `ThreadCpuCollector(registry)` registers it."""

    def __init__(self, registry: CollectorRegistry) -> None:
        registry.register(self)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "loraserve_thread_cpu_seconds",
            "CPU seconds used by this process's threads (MainThread: the gRPC event loop; "
            "loraserve-engine: the engine; native: threads Python did not start).",
            labels=["thread"],
        )
        for label, seconds in sorted(thread_cpu_seconds().items()):
            family.add_metric([label], seconds)
        yield family
