"""Unit tests for server.engine.usage.AdapterUsageLedger: sums per name, deletes, bounds."""

from __future__ import annotations

import threading

import pytest

from loraserve.server.engine.types import AdapterKey, Usage
from loraserve.server.engine.usage import AdapterUsageLedger, AdapterUsageTotals


def usage(prompt: int, completion: int, compute: float, cost: float) -> Usage:
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        queue_seconds=0.0,
        time_to_first_token_seconds=0.0,
        total_seconds=compute,
        compute_seconds=compute,
        cost=cost,
    )


def test_totals_sum_over_requests_and_versions_of_one_name() -> None:
    ledger = AdapterUsageLedger()
    ledger.record(AdapterKey("acme", "a", 1), usage(5, 3, 0.25, 0.5), now=100.0)
    ledger.record(AdapterKey("acme", "a", 2), usage(7, 4, 0.5, 1.0), now=90.0)
    assert ledger.get("acme", "a") == AdapterUsageTotals(
        requests=2,
        prompt_tokens=12,
        completion_tokens=7,
        compute_seconds=0.75,
        cost=1.5,
        last_used=100.0,  # the latest of the two, whatever the order they finished in
    )


def test_names_and_tenants_are_counted_apart() -> None:
    ledger = AdapterUsageLedger()
    ledger.record(AdapterKey("acme", "a", 1), usage(1, 1, 0.1, 0.0), now=1.0)
    ledger.record(AdapterKey("globex", "a", 1), usage(2, 2, 0.2, 0.0), now=2.0)
    ledger.record(AdapterKey("acme", "b", 1), usage(3, 3, 0.3, 0.0), now=3.0)
    assert ledger.get("acme", "a").prompt_tokens == 1
    assert ledger.get("globex", "a").prompt_tokens == 2
    assert ledger.get("acme", "b").prompt_tokens == 3
    assert ledger.get("globex", "b") == AdapterUsageTotals()
    assert len(ledger) == 3


def test_delete_drops_the_entry_and_ignores_requests_finishing_after_it() -> None:
    ledger = AdapterUsageLedger()
    ledger.record(AdapterKey("acme", "a", 2), usage(5, 3, 0.25, 0.0), now=1.0)
    ledger.forget("acme", "a", version=2)
    assert len(ledger) == 0
    # A request that ran on the deleted version finishes afterwards: not counted.
    ledger.record(AdapterKey("acme", "a", 2), usage(5, 3, 0.25, 0.0), now=2.0)
    assert ledger.get("acme", "a") == AdapterUsageTotals()
    assert len(ledger) == 0
    # A new upload of the name gets a higher version: counted from zero.
    ledger.record(AdapterKey("acme", "a", 3), usage(1, 1, 0.1, 0.0), now=3.0)
    assert ledger.get("acme", "a").requests == 1


def test_memory_stays_bounded_when_names_come_and_go_forever() -> None:
    ledger = AdapterUsageLedger(max_entries=10)
    for i in range(1000):
        ledger.record(AdapterKey("acme", f"n{i}", 1), usage(1, 1, 0.0, 0.0), now=float(i))
        if i % 2:
            ledger.forget("acme", f"n{i}", 1)
    assert len(ledger) == 9  # the cap of 10, less the last name, deleted after its use
    # The least recently used went first: the newest surviving names are still there.
    assert ledger.get("acme", "n998").requests == 1
    assert ledger.get("acme", "n0") == AdapterUsageTotals()


def test_max_entries_must_be_positive() -> None:
    with pytest.raises(ValueError):
        AdapterUsageLedger(max_entries=0)


def test_concurrent_records_are_all_counted() -> None:
    ledger = AdapterUsageLedger()
    key = AdapterKey("acme", "a", 1)

    def work() -> None:
        for _ in range(500):
            ledger.record(key, usage(1, 2, 0.0, 0.0), now=1.0)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    totals = ledger.get("acme", "a")
    assert (totals.requests, totals.prompt_tokens, totals.completion_tokens) == (2000, 2000, 4000)
