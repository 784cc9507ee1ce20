"""bench.server_steps: the engine's step totals read back from the server's own metrics."""

from __future__ import annotations

import math

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
    assert before == StepTotals()
    for step in (_step("prefill", 0.5, 4), _step("decode", 0.25, 4), _step("decode", 0.25, 2)):
        metrics.on_step(step)
    after = parse_step_totals(generate_latest(metrics.registry).decode())
    assert after == StepTotals(
        prefill_steps=1, prefill_s=0.5, decode_steps=2, decode_s=0.5, step_rows=10, steps=3
    )
    grown = after.since(before)
    assert grown == {
        "prefill_steps": 1,
        "prefill_s": 0.5,
        "decode_steps": 2,
        "decode_s": 0.5,
        "mean_rows_per_step": 10 / 3,
    }
    assert math.isnan(after.since(after)["mean_rows_per_step"])


def test_a_server_without_metrics_has_no_totals() -> None:
    assert read_step_totals(0) is None
