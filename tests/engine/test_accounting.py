"""Cost attribution: step time split by token share; tenants' shares add up to busy time."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from serving_support import (
    AdapterShape,
    EngineHarness,
    build_test_model,
    make_peft_adapter,
    store_adapter,
)

from loraserve.server.engine.accounting import EngineObserver, StepStats, split_step, step_stats
from loraserve.server.engine.types import FinishEvent


def test_split_step_is_proportional_to_tokens() -> None:
    assert split_step(1.0, [1, 1, 2]) == [0.25, 0.25, 0.5]
    assert split_step(0.3, [0, 0, 0]) == pytest.approx([0.1, 0.1, 0.1])
    assert split_step(1.0, []) == []


def test_step_stats_mixed_batch_sums_to_step_time() -> None:
    stats, shares = step_stats(
        "prefill", 0.9, ["acme", "globex", "acme"], [10, 5, 3], ["a1", None, "a2"]
    )
    assert stats.batch_size == 3 and stats.distinct_adapters == 2
    assert stats.tenant_tokens == {"acme": 13, "globex": 5}
    assert stats.tenant_seconds["acme"] == pytest.approx(0.9 * 13 / 18)
    assert stats.tenant_seconds["globex"] == pytest.approx(0.9 * 5 / 18)
    assert math.fsum(shares) == pytest.approx(0.9)
    assert math.fsum(stats.tenant_seconds.values()) == pytest.approx(stats.seconds)


class Recorder(EngineObserver):
    def __init__(self) -> None:
        self.steps: list[StepStats] = []
        self.generated: dict[str, int] = {}
        self.gaps: dict[str, list[float]] = {}

    def on_token_gaps(self, gaps: dict[tuple[str, float], int]) -> None:
        for (tenant, seconds), rows in gaps.items():
            assert seconds >= 0 and rows >= 1
            self.gaps.setdefault(tenant, []).extend([seconds] * rows)

    def on_step(self, stats: StepStats) -> None:
        self.steps.append(stats)

    def on_generated(self, tenant_tokens: dict[str, int]) -> None:
        for tenant, n in tenant_tokens.items():
            self.generated[tenant] = self.generated.get(tenant, 0) + n


def test_engine_attribution_adds_up_to_busy_time(model_cache: Path, tmp_path: Path) -> None:
    model = build_test_model("llama", model_cache)
    adapter = make_peft_adapter(model, tmp_path / "a", AdapterShape(4, 8, ["q_proj"], seed=1))
    recorder = Recorder()
    harness = EngineHarness(model, tmp_path / "data", observer=recorder)
    store_adapter(harness.service, "heavy", "a", adapter)
    try:
        jobs = [
            (tenant, harness.submit([5, 6, 7, 8] * n, adapter, tenant=tenant, max_new_tokens=m))
            for tenant, adapter, n, m in [
                ("heavy", "a", 6, 24),
                ("heavy", None, 4, 16),
                ("light", None, 1, 4),
            ]
        ]
        harness.run([events for _, events in jobs])
    finally:
        harness.close()
    busy = math.fsum(s.seconds for s in recorder.steps)
    per_tenant: dict[str, float] = {}
    for stats in recorder.steps:
        for tenant, seconds in stats.tenant_seconds.items():
            per_tenant[tenant] = per_tenant.get(tenant, 0.0) + seconds
    assert math.fsum(per_tenant.values()) == pytest.approx(busy, rel=1e-9)
    finishes = [(tenant, events[-1]) for tenant, events in jobs]
    assert all(isinstance(f, FinishEvent) for _, f in finishes)
    # Each request's usage carries its own share; the shares of all requests are the busy time.
    per_request = math.fsum(f.usage.compute_seconds for _, f in finishes)
    assert per_request == pytest.approx(busy, rel=1e-9)
    # One gap per token after each request's first: 23 + 15 for heavy, 3 for light.
    assert {t: len(g) for t, g in recorder.gaps.items()} == {"heavy": 38, "light": 3}
    assert recorder.generated == {"heavy": 40, "light": 4}
    # A request's gaps add up to its time from first to last token.
    light = finishes[2][1].usage
    light_span = light.total_seconds - light.time_to_first_token_seconds
    assert math.fsum(recorder.gaps["light"]) == pytest.approx(light_span, abs=1e-6)
    assert per_tenant["heavy"] > per_tenant["light"] > 0
    # Generated-token counts match what the requests got.
    for tenant in ("heavy", "light"):
        got = sum(len(f.token_ids) for t, f in finishes if t == tenant)
        assert recorder.generated[tenant] == got
