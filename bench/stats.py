"""Per-request results of one run and the summary numbers derived from them."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RequestResult:
    """What one request measured (seconds are relative to its own arrival)."""

    arrival_s: float
    completion_tokens: int
    ttft_s: float
    total_s: float
    queue_s: float = float("nan")
    error: str | None = None


@dataclass(frozen=True)
class RunResult:
    """One run of a workload: its wall time and every request's result."""

    wall_s: float
    requests: list[RequestResult] = field(default_factory=list)
    cpu_s: float | None = None
    """CPU seconds this process used during the run (all threads), when measured."""
    decode_s: float | None = None
    """Engine seconds spent in decode steps during the run (in-process runs only)."""
    decode_tokens: int | None = None
    """Tokens those decode steps generated."""

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Generated tokens over decode-step time only (prefill and idle time excluded)."""
        if not self.decode_s or self.decode_tokens is None:
            return None
        return self.decode_tokens / self.decode_s

    @property
    def cpu_util(self) -> float | None:
        """Busy cores on average; well below the torch thread count means CPU starvation."""
        if self.cpu_s is None or self.wall_s <= 0:
            return None
        return self.cpu_s / self.wall_s

    @property
    def tokens(self) -> int:
        return sum(r.completion_tokens for r in self.requests if r.error is None)

    @property
    def errors(self) -> int:
        return sum(1 for r in self.requests if r.error is not None)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def requests_per_s(self) -> float:
        done = len(self.requests) - self.errors
        return done / self.wall_s if self.wall_s > 0 else 0.0

    def ttfts(self) -> list[float]:
        return [r.ttft_s for r in self.requests if r.error is None]

    def goodput(self, slo_ttft_s: float) -> float:
        """Requests per second that finished with TTFT <= slo_ttft_s."""
        good = sum(1 for t in self.ttfts() if t <= slo_ttft_s)
        return good / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self, slo_ttft_s: float | None = None) -> dict[str, float | int | None]:
        """JSON-ready numbers: throughput, TTFT p50/p99, goodput (when an SLO is given)."""
        ttfts = self.ttfts()
        out: dict[str, float | int | None] = {
            "requests": len(self.requests),
            "errors": self.errors,
            "tokens": self.tokens,
            "wall_s": self.wall_s,
            "tokens_per_s": self.tokens_per_s,
            "requests_per_s": self.requests_per_s,
            "ttft_p50_s": percentile(ttfts, 50),
            "ttft_p99_s": percentile(ttfts, 99),
            "cpu_util": self.cpu_util,
        }
        if slo_ttft_s is not None:
            out["slo_ttft_s"] = slo_ttft_s
            out["goodput_rps"] = self.goodput(slo_ttft_s)
            out["slo_attainment"] = (
                sum(1 for t in ttfts if t <= slo_ttft_s) / len(ttfts) if ttfts else None
            )
        return out


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation (numpy's default); None when empty."""
    clean = sorted(v for v in values if not math.isnan(v))
    if not clean:
        return None
    if len(clean) == 1:
        return clean[0]
    pos = (len(clean) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(clean) - 1)
    return clean[lo] + (clean[hi] - clean[lo]) * (pos - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
