"""`loraserve_time_per_output_token_seconds`: a per-tenant histogram observed a step at a time.

Every decode step gives every running request a token, so the time between a request's tokens is
one observation per row per step: at batch 32, 32 histogram observations on the engine thread
each step, about a tenth of its host work with prometheus_client's Histogram. The rows of one
step that were also in the step before share their gap exactly (both tokens came from the same
two reads), so the engine reports each step's gaps as (tenant, seconds) -> rows, and this
collector adds a count to one bucket per distinct gap. Exposed as a Prometheus histogram with the
same name, labels and buckets as before (cumulative `_bucket{le}`, `_sum`, `_count`).
"""

from __future__ import annotations

import bisect
import itertools
import math
import threading
from collections.abc import Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

NAME = "loraserve_time_per_output_token_seconds"


class TokenGapHistogram:
    """Per-tenant histogram of token gaps; `observe` takes a count. Thread-safe."""

    def __init__(self, registry: CollectorRegistry, buckets: Sequence[float]) -> None:
        bounds = sorted(float(b) for b in buckets)
        self._bounds = bounds if bounds and math.isinf(bounds[-1]) else [*bounds, math.inf]
        self._labels = [floatToGoString(b) for b in self._bounds]
        self._lock = threading.Lock()
        self._counts: dict[str, list[int]] = {}
        """Tenant -> observations per bucket (not cumulative), one slot per bound."""
        self._sums: dict[str, float] = {}
        registry.register(self)

    def observe(self, gaps: Mapping[tuple[str, float], int]) -> None:
        """Adds `count` observations of `seconds` for each (tenant, seconds) -> count."""
        with self._lock:
            for (tenant, seconds), count in gaps.items():
                counts = self._counts.get(tenant)
                if counts is None:
                    counts = self._counts[tenant] = [0] * len(self._bounds)
                    self._sums[tenant] = 0.0
                # The first bucket whose upper bound is >= seconds (Prometheus' `le`).
                counts[bisect.bisect_left(self._bounds, seconds)] += count
                self._sums[tenant] += seconds * count

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(
            NAME, "Time between consecutive generated tokens of one request.", labels=["tenant"]
        )
        with self._lock:
            snapshot = [(t, list(c), self._sums[t]) for t, c in sorted(self._counts.items())]
        for tenant, counts, total in snapshot:
            cumulative = itertools.accumulate(counts)
            family.add_metric(
                [tenant], buckets=list(zip(self._labels, cumulative, strict=True)), sum_value=total
            )
        yield family
