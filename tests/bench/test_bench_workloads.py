"""Workload generators: popularity patterns, trace arrival statistics, lengths, prompts."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from loraserve.bench.workloads import (
    TraceSpec,
    gamma_arrivals,
    lengths,
    make_trace,
    popularity,
    prompt_from_corpus,
    rescale_arrivals,
    round_robin,
    zipf_probabilities,
)


def test_zipf_probabilities_sum_to_one_and_decrease() -> None:
    probs = zipf_probabilities(1000, 1.0)
    assert probs.sum() == pytest.approx(1.0)
    assert np.all(np.diff(probs) < 0)
    assert probs[0] / probs[1] == pytest.approx(2.0)
    assert np.allclose(zipf_probabilities(7, 0.0), 1 / 7)


def test_identical_and_distinct_patterns() -> None:
    rng = np.random.default_rng(0)
    assert popularity("identical", 16, 16, rng) == [0] * 16
    assert popularity("distinct", 16, 16, rng) == list(range(16))
    assert popularity("distinct", 5, 3, rng) == [0, 1, 2, 0, 1]
    assert round_robin(8, 4) == [0, 1, 2, 3, 0, 1, 2, 3]


def test_uniform_pattern_covers_the_pool_evenly() -> None:
    counts = Counter(popularity("uniform", 20_000, 10, np.random.default_rng(1)))
    assert set(counts) == set(range(10))
    assert all(abs(c / 20_000 - 0.1) < 0.01 for c in counts.values())


def test_skewed_pattern_follows_zipf() -> None:
    n, alpha = 50, 1.5
    draws = popularity("skewed", 50_000, n, np.random.default_rng(2), alpha)
    counts = Counter(draws)
    probs = zipf_probabilities(n, alpha)
    assert counts[0] / 50_000 == pytest.approx(probs[0], abs=0.01)
    assert counts[0] > counts[1] > counts[4]
    assert max(draws) < n


def test_same_seed_same_popularity() -> None:
    a = popularity("skewed", 100, 20, np.random.default_rng(5))
    b = popularity("skewed", 100, 20, np.random.default_rng(5))
    assert a == b


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0])
def test_gamma_arrivals_rate_and_cv(cv: float) -> None:
    rate = 4.0
    times = gamma_arrivals(40_000, rate, cv, np.random.default_rng(3))
    gaps = np.diff(times)
    assert times[0] == 0.0
    assert np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)


def test_gamma_arrivals_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        gamma_arrivals(10, 0.0, 1.0, np.random.default_rng(0))
    assert gamma_arrivals(0, 1.0, 1.0, np.random.default_rng(0)) == []


@pytest.mark.parametrize("dist", ["fixed", "uniform", "lognormal"])
def test_lengths_stay_within_bounds(dist: str) -> None:
    values = lengths(5_000, dist, 8, 128, np.random.default_rng(4))  # type: ignore[arg-type]
    assert len(values) == 5_000
    assert all(8 <= v <= 128 for v in values)
    assert all(isinstance(v, int) for v in values)
    if dist == "fixed":
        assert set(values) == {128}
    else:
        assert len(set(values)) > 50


def test_lengths_reject_bad_bounds() -> None:
    with pytest.raises(ValueError):
        lengths(3, "uniform", 10, 5, np.random.default_rng(0))


def test_trace_is_reproducible_and_consistent() -> None:
    spec = TraceSpec(n_requests=300, rate=2.0, cv=1.5, n_adapters=40, alpha=1.0)
    trace = make_trace(spec, seed=11)
    assert trace == make_trace(spec, seed=11)
    assert trace != make_trace(spec, seed=12)
    assert len(trace) == 300
    arrivals = [t.arrival_s for t in trace]
    assert arrivals == sorted(arrivals)
    assert all(0 <= t.adapter_index < 40 for t in trace)
    assert all(spec.prompt_len[0] <= t.prompt_len <= spec.prompt_len[1] for t in trace)
    assert all(spec.output_len[0] <= t.output_len <= spec.output_len[1] for t in trace)
    faster = rescale_arrivals(trace, rate=4.0, spec_rate=2.0)
    assert [t.arrival_s for t in faster] == pytest.approx([a / 2 for a in arrivals])
    assert [t.adapter_index for t in faster] == [t.adapter_index for t in trace]


def test_prompt_from_corpus_windows() -> None:
    corpus = list(range(100, 150))
    prompt = prompt_from_corpus(corpus, 80, 3)
    assert len(prompt) == 80
    assert set(prompt) <= set(corpus)
    assert prompt == prompt_from_corpus(corpus, 80, 3)
    assert prompt != prompt_from_corpus(corpus, 80, 4)
