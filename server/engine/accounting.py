"""Cost attribution: each engine step's wall time is split across the requests in it.

A request's share of a step is its share of the step's tokens (a prompt of n tokens in a prefill
counts n; a decode step counts 1 per row), so the tenants' attributed seconds add up to exactly
the engine's busy time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StepStats:
    """One forward pass (prefill or decode) and who it served."""

    kind: str
    """"prefill" or "decode"."""
    seconds: float
    """Wall time of the step (forward and sampling)."""
    batch_size: int
    distinct_adapters: int
    """Distinct adapters among the rows (the base model not counted)."""
    tenant_tokens: dict[str, int]
    """Tokens the step processed per tenant."""
    tenant_seconds: dict[str, float]
    """Attributed seconds per tenant; sums to `seconds`."""


def split_step(seconds: float, tokens: Sequence[int]) -> list[float]:
    """Each row's share of a step: seconds * tokens[i] / sum(tokens) (equal split if all zero)."""
    total = sum(tokens)
    if not tokens:
        return []
    if total <= 0:
        return [seconds / len(tokens)] * len(tokens)
    return [seconds * n / total for n in tokens]


def step_stats(
    kind: str,
    seconds: float,
    tenants: Sequence[str],
    tokens: Sequence[int],
    adapters: Sequence[object | None],
) -> tuple[StepStats, list[float]]:
    """The step's per-tenant totals, and each row's attributed seconds (same order as rows)."""
    shares = split_step(seconds, tokens)
    tenant_tokens: dict[str, int] = {}
    tenant_seconds: dict[str, float] = {}
    for tenant, n, share in zip(tenants, tokens, shares, strict=True):
        tenant_tokens[tenant] = tenant_tokens.get(tenant, 0) + n
        tenant_seconds[tenant] = tenant_seconds.get(tenant, 0.0) + share
    stats = StepStats(
        kind=kind,
        seconds=seconds,
        batch_size=len(tenants),
        distinct_adapters=len({a for a in adapters if a is not None}),
        tenant_tokens=tenant_tokens,
        tenant_seconds=tenant_seconds,
    )
    return stats, shares


class EngineObserver:
    """Receives the engine's measurements; the default does nothing (server.metrics records)."""

    def on_step(self, stats: StepStats) -> None:
        """After every forward pass."""

    def on_generated(self, tenant_tokens: dict[str, int]) -> None:
        """Tokens produced in one step, per tenant (also those of rows cancelled later)."""

    def on_token_gaps(self, gaps: dict[tuple[str, float], int]) -> None:
        """One step's times between two consecutive tokens of a request: (tenant, seconds) ->
        how many of the step's rows had that gap (rows read together share it exactly)."""

    def on_residency(self, tenant_byte_seconds: dict[str, float]) -> None:
        """Device bytes held by each tenant's adapters, times the seconds they were held."""

    def on_adapter_cache(self, tier: str, event: str, seconds: float = 0.0) -> None:
        """An adapter cache event in tier "device" or "host".

        Events: "hit", "miss" (with the load time in seconds), "prefetch" (host only, with the
        load time) or "eviction".
        """
