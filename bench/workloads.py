"""Workload generators: adapter popularity patterns, trace arrivals, lengths and prompts.

Popularity follows Punica's four patterns (identical, distinct, uniform, skewed/Zipf); the trace
follows S-LoRA's synthetic workload: Gamma-distributed inter-arrival times (coefficient of
variation `cv`; cv = 1 is a Poisson process), power-law adapter popularity over n adapters, and
prompt and output lengths drawn from a clipped distribution. Everything takes a seeded
numpy Generator, so a workload is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Pattern = Literal["identical", "distinct", "uniform", "skewed"]
PATTERNS: tuple[Pattern, ...] = ("identical", "distinct", "uniform", "skewed")
LengthDist = Literal["fixed", "uniform", "lognormal"]


def zipf_probabilities(n: int, alpha: float) -> np.ndarray:
    """P(rank k) proportional to 1 / k**alpha for k = 1..n (alpha = 0 is uniform)."""
    if n < 1:
        raise ValueError("n must be at least 1")
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** alpha
    return weights / weights.sum()


def popularity(
    pattern: Pattern, n_requests: int, n_adapters: int, rng: np.random.Generator, alpha: float = 1.5
) -> list[int]:
    """Adapter index (0..n_adapters-1) of each request under one of Punica's patterns.

    identical: all on adapter 0; distinct: request i on adapter i (mod n_adapters); uniform:
    each adapter equally likely; skewed: Zipf(alpha) over the adapters, adapter 0 most popular.
    """
    if n_adapters < 1:
        raise ValueError("n_adapters must be at least 1")
    if pattern == "identical":
        return [0] * n_requests
    if pattern == "distinct":
        return [i % n_adapters for i in range(n_requests)]
    if pattern == "uniform":
        return [int(x) for x in rng.integers(0, n_adapters, size=n_requests)]
    if pattern == "skewed":
        probs = zipf_probabilities(n_adapters, alpha)
        return [int(x) for x in rng.choice(n_adapters, size=n_requests, p=probs)]
    raise ValueError(f"unknown pattern {pattern!r}")


def round_robin(n_requests: int, n_distinct: int) -> list[int]:
    """Exactly `n_distinct` adapters (0..n_distinct-1) spread evenly over the requests."""
    return [i % n_distinct for i in range(n_requests)]


def gamma_arrivals(n: int, rate: float, cv: float, rng: np.random.Generator) -> list[float]:
    """Arrival times (seconds, first at 0) with Gamma inter-arrival gaps of mean 1/rate.

    shape = 1/cv**2 and scale = 1/(rate*shape), so the gaps' coefficient of variation is cv;
    cv = 1 gives exponential gaps (Poisson arrivals), larger cv burstier traffic.
    """
    if rate <= 0 or cv <= 0:
        raise ValueError("rate and cv must be positive")
    if n == 0:
        return []
    shape = 1.0 / cv**2
    gaps = rng.gamma(shape, 1.0 / (rate * shape), size=n)
    times = np.cumsum(gaps)
    return [float(t) for t in times - times[0]]


def lengths(
    n: int,
    dist: LengthDist,
    low: int,
    high: int,
    rng: np.random.Generator,
    sigma: float = 0.6,
) -> list[int]:
    """`n` integer lengths in [low, high].

    fixed: all `high`; uniform: uniform integers; lognormal: median at the geometric mean of
    the bounds, log-std `sigma`, clipped to the bounds (a long tail, as real prompts have).
    """
    if not 1 <= low <= high:
        raise ValueError("need 1 <= low <= high")
    if dist == "fixed":
        return [high] * n
    if dist == "uniform":
        return [int(x) for x in rng.integers(low, high + 1, size=n)]
    if dist == "lognormal":
        mu = 0.5 * (np.log(low) + np.log(high))
        raw = rng.lognormal(mu, sigma, size=n)
        return [int(x) for x in np.clip(np.rint(raw), low, high)]
    raise ValueError(f"unknown length distribution {dist!r}")


def prompt_from_corpus(corpus_ids: Sequence[int], length: int, index: int) -> tuple[int, ...]:
    """A window of `length` ids of the corpus, starting at an offset that depends on `index`."""
    if not corpus_ids:
        raise ValueError("empty corpus")
    n = len(corpus_ids)
    start = (index * 7919) % n
    return tuple(corpus_ids[(start + j) % n] for j in range(length))


@dataclass(frozen=True)
class TraceSpec:
    """An S-LoRA-style synthetic trace."""

    n_requests: int
    rate: float
    """Mean arrivals per second."""
    cv: float = 1.0
    n_adapters: int = 100
    alpha: float = 1.0
    """Zipf exponent of adapter popularity."""
    prompt_dist: LengthDist = "uniform"
    prompt_len: tuple[int, int] = (8, 64)
    output_dist: LengthDist = "uniform"
    output_len: tuple[int, int] = (8, 32)


@dataclass(frozen=True)
class TraceItem:
    """One request of a trace, before it is bound to adapters and prompt ids."""

    arrival_s: float
    adapter_index: int
    prompt_len: int
    output_len: int


def make_trace(spec: TraceSpec, seed: int) -> list[TraceItem]:
    """The trace's requests in arrival order (the same seed gives the same trace)."""
    rng = np.random.default_rng(seed)
    arrivals = gamma_arrivals(spec.n_requests, spec.rate, spec.cv, rng)
    adapters = popularity("skewed", spec.n_requests, spec.n_adapters, rng, spec.alpha)
    prompts = lengths(spec.n_requests, spec.prompt_dist, *spec.prompt_len, rng)
    outputs = lengths(spec.n_requests, spec.output_dist, *spec.output_len, rng)
    return [
        TraceItem(arrival_s=t, adapter_index=a, prompt_len=p, output_len=o)
        for t, a, p, o in zip(arrivals, adapters, prompts, outputs, strict=True)
    ]


def rescale_arrivals(trace: list[TraceItem], rate: float, spec_rate: float) -> list[TraceItem]:
    """The same trace replayed at `rate` instead of `spec_rate` (gaps scaled, order kept)."""
    factor = spec_rate / rate
    return [
        TraceItem(t.arrival_s * factor, t.adapter_index, t.prompt_len, t.output_len) for t in trace
    ]
