"""Counts this process's OS threads around parallel torch work (run by test_compute_threads).

In a fresh interpreter, so no other test's threads come and go while it counts. Prints one JSON
object: the thread counts before, while a plain helper thread that ran a parallel operator is
alive, while a serial one is, and after a passing thread that ran one has ended.
"""

from __future__ import annotations

import json
import os
import threading
import time

import torch

from loraserve.server.engine.compute_threads import in_passing_thread, serial_torch_ops


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def parallel_op() -> None:
    torch.ones(1 << 22).mul_(2)  # 4M elements: far above torch's parallel grain size


def alive_count(serial: bool) -> int:
    """OS threads while a helper that ran a parallel operator waits, alive."""
    ran, done = threading.Event(), threading.Event()

    def helper() -> None:
        if serial:
            serial_torch_ops()
        parallel_op()
        ran.set()
        done.wait()

    thread = threading.Thread(target=helper)
    thread.start()
    ran.wait()
    count = os_threads()
    done.set()
    thread.join()
    return count


def settled_count(expected_at_most: int) -> int:
    """OS threads once exiting pool workers have gone (they leave just after their thread)."""
    deadline = time.monotonic() + 5
    count = os_threads()
    while count > expected_at_most and time.monotonic() < deadline:
        time.sleep(0.01)
        count = os_threads()
    return count


before = os_threads()
plain = alive_count(serial=False)
settled_count(before)
serial = alive_count(serial=True)
settled_count(before)
in_passing_thread(parallel_op, name="probe-passing")
after_passing = settled_count(before)
print(
    json.dumps(
        {
            "threads": torch.get_num_threads(),
            "before": before,
            "plain": plain,
            "serial": serial,
            "after_passing": after_passing,
        }
    )
)
