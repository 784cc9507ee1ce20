"""server.token_gaps: the time-per-output-token histogram observed a step at a time."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from loraserve.server.metrics import LATENCY_BUCKETS
from loraserve.server.token_gaps import NAME, TokenGapHistogram


def _lines(registry: CollectorRegistry) -> list[str]:
    """The family's exposition lines, `_created` left out (the library's own timestamp)."""
    text = generate_latest(registry).decode()
    return sorted(
        line for line in text.splitlines() if line.startswith(NAME) and "_created" not in line
    )


def test_exposition_matches_prometheus_client_observing_one_at_a_time() -> None:
    rng = random.Random(0)
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    gaps = TokenGapHistogram(ours, LATENCY_BUCKETS)
    reference = Histogram(
        NAME,
        "Time between consecutive generated tokens of one request.",
        ["tenant"],
        buckets=LATENCY_BUCKETS,
        registry=theirs,
    )
    for _ in range(50):  # steps
        step: dict[tuple[str, float], int] = {}
        for _ in range(rng.randrange(1, 5)):
            # Bounds themselves too: Prometheus counts a value equal to `le` in that bucket.
            seconds = rng.choice([*LATENCY_BUCKETS, rng.uniform(0, 0.2), 400.0])
            key = (rng.choice(["acme", "globex"]), seconds)
            step[key] = step.get(key, 0) + rng.randrange(1, 33)
        gaps.observe(step)
        for (tenant, seconds), rows in step.items():
            for _ in range(rows):
                reference.labels(tenant).observe(seconds)
    got, want = _lines(ours), _lines(theirs)
    assert got and len(got) == len(want)
    for mine, reference_line in zip(got, want, strict=True):
        if "_sum{" in mine:
            # seconds * rows against rows additions of seconds: equal up to rounding.
            name, value = mine.rsplit(" ", 1)
            ref_name, ref_value = reference_line.rsplit(" ", 1)
            assert name == ref_name
            assert float(value) == pytest.approx(float(ref_value), rel=1e-12)
        else:
            assert mine == reference_line


def test_count_and_sum_per_tenant() -> None:
    registry = CollectorRegistry()
    gaps = TokenGapHistogram(registry, (0.01, 0.1))
    gaps.observe({("a", 0.005): 3, ("b", 0.05): 2})
    gaps.observe({("a", 1.0): 1})
    value = registry.get_sample_value
    assert value(f"{NAME}_count", {"tenant": "a"}) == 4
    assert value(f"{NAME}_sum", {"tenant": "a"}) == 3 * 0.005 + 1.0
    assert value(f"{NAME}_bucket", {"tenant": "a", "le": "0.01"}) == 3
    assert value(f"{NAME}_bucket", {"tenant": "a", "le": "0.1"}) == 3
    assert value(f"{NAME}_bucket", {"tenant": "a", "le": "+Inf"}) == 4
    assert value(f"{NAME}_bucket", {"tenant": "b", "le": "0.01"}) == 0
    assert value(f"{NAME}_count", {"tenant": "b"}) == 2


def test_nothing_observed_exports_no_series() -> None:
    registry = CollectorRegistry()
    TokenGapHistogram(registry, LATENCY_BUCKETS)
    assert _lines(registry) == []
