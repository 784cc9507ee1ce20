"""bench.server_steps: the engine's step totals read back from the server's own metrics."""

from __future__ import annotations

import math
import sys
from dataclasses import replace

from prometheus_client import generate_latest

from loraserve.bench.server_steps import StepTotals, parse_step_totals, read_step_totals
from loraserve.server.engine.accounting import StepStats
from loraserve.server.metrics import Metrics


def _step(kind: str, seconds: float, rows: int) -> StepStats:
    return StepStats(
        kind=kind,
        seconds=seconds,
        batch_size=rows,
        distinct_adapters=0,
        tenant_tokens={"t": rows},
        tenant_seconds={"t": seconds},
    )


def test_step_totals_come_back_from_the_exposition_and_subtract() -> None:
    metrics = Metrics()
    before = parse_step_totals(generate_latest(metrics.registry).decode())
    assert replace(before, thread_cpu_s={}) == StepTotals()
    for step in (_step("prefill", 0.5, 4), _step("decode", 0.25, 4), _step("decode", 0.25, 2)):
        metrics.on_step(step)
    after = parse_step_totals(generate_latest(metrics.registry).decode())
    assert replace(after, thread_cpu_s={}) == StepTotals(
        prefill_steps=1, prefill_s=0.5, decode_steps=2, decode_s=0.5, step_rows=10, steps=3
    )
    grown = after.since(before)
    cpu = {k: grown.pop(k) for k in list(grown) if k.startswith("cpu_s:")}
    assert grown == {
        "prefill_steps": 1,
        "prefill_s": 0.5,
        "decode_steps": 2,
        "decode_s": 0.5,
        "mean_rows_per_step": 10 / 3,
    }
    assert math.isnan(after.since(after)["mean_rows_per_step"])
    if sys.platform == "linux":  # this thread's CPU time, read back from the exposition
        assert "MainThread" in after.thread_cpu_s
        assert cpu["cpu_s:MainThread"] >= 0


def test_thread_cpu_totals_subtract_per_thread() -> None:
    before = StepTotals(thread_cpu_s={"MainThread": 1.0, "loraserve-engine": 2.0})
    after = StepTotals(thread_cpu_s={"MainThread": 1.5, "loraserve-engine": 4.0, "native": 1.0})
    grown = after.since(before)
    assert grown["cpu_s:MainThread"] == 0.5
    assert grown["cpu_s:loraserve-engine"] == 2.0
    assert grown["cpu_s:native"] == 1.0  # a thread started during the run counts from zero


def test_a_server_without_metrics_has_no_totals() -> None:
    assert read_step_totals(0) is None
