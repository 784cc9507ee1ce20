"""Unit tests for operator holds in server.engine.device_pool.DevicePool (PinAdapter, --preload).

A held adapter is never evicted, counts against the page budget, and a hold that would not fit
beside the other holds is refused with RESOURCE_EXHAUSTED; unholding makes it evictable again.
Same pool, layers and fake loader as test_device_pool (4 pages of rank 2).
"""

from __future__ import annotations

import pytest
from test_device_pool import NUM_PAGES, PAGE_BYTES, PAGE_RANK, FakeLoader, key, make_pool

from loraserve.server.engine.device_pool import DevicePool
from loraserve.server.engine.types import AdapterKey, EngineError, ErrorKind

# Ranks (test_device_pool.RANKS): a 1 page, b 2 pages, c 2 pages, d-g 1 page, h 3 pages.
A, B, C, D, E, F, G, H = (key(n) for n in "abcdefgh")


def check_state(
    pool: DevicePool, layers: object, loader: FakeLoader, expected: dict[AdapterKey, int]
) -> None:
    """The pool holds exactly `expected` (key -> request pins), on distinct pages; held and
    request-pinned pages are not room for anything else, every other page is."""
    assert pool.resident() == expected
    placements = {k: pool.placement(k) for k in expected}
    used = [p for placement in placements.values() if placement for p in placement.pages]
    assert len(set(used)) == len(used), f"two adapters share a page: {placements}"
    assert pool.resident_bytes() == sum(loader.weights(k).nbytes for k in expected)
    held = pool.held()
    taken = sum(
        len(placement.pages)
        for k, placement in placements.items()
        if placement and (expected[k] > 0 or k in held)
    )
    available = NUM_PAGES - taken
    fresh = [key(f"fresh{i}", rank=PAGE_RANK) for i in range(NUM_PAGES + 1)]
    assert pool.fits(fresh[:available])
    assert not pool.fits(fresh[: available + 1])


@pytest.fixture
def loader() -> FakeLoader:
    return FakeLoader()


def test_a_held_adapter_is_never_evicted_under_pressure(loader: FakeLoader) -> None:
    pool, layers = make_pool(loader)
    pool.hold(A)
    assert pool.held() == {A: PAGE_BYTES}
    check_state(pool, layers, loader, {A: 0})
    # Three more one-page adapters fill the pool; each new one evicts an unheld LRU one.
    for k in (D, E, F, G):
        pool.acquire(k)
        pool.release(k)
    assert pool.is_resident(A)
    assert not pool.is_resident(D), "the LRU unheld adapter went instead"
    check_state(pool, layers, loader, {A: 0, E: 0, F: 0, G: 0})
    # A three-page adapter evicts all three unheld ones, never the held one.
    pool.acquire(H)
    check_state(pool, layers, loader, {A: 0, H: 1})
    assert loader.loads[A] == 1


def test_held_pages_are_not_room_for_requests(loader: FakeLoader) -> None:
    pool, layers = make_pool(loader)
    pool.hold(B)  # 2 of 4 pages
    assert not pool.fits([H])  # 3 pages: only 2 are not held
    assert not pool.can_ever_fit(H)
    assert pool.can_ever_fit(C)
    with pytest.raises(EngineError) as caught:
        pool.acquire(H)
    assert caught.value.kind is ErrorKind.RESOURCE_EXHAUSTED
    check_state(pool, layers, loader, {B: 0})


def test_a_hold_that_would_not_fit_beside_other_holds_is_refused_with_bytes(
    loader: FakeLoader,
) -> None:
    pool, layers = make_pool(loader)
    pool.hold(B)
    pool.hold(A)  # 3 of 4 pages held
    with pytest.raises(EngineError) as caught:
        pool.hold(C)  # 2 pages, 1 left
    assert caught.value.kind is ErrorKind.RESOURCE_EXHAUSTED
    message = caught.value.message
    assert f"needs {2 * PAGE_BYTES} bytes" in message
    assert f"only {PAGE_BYTES} bytes are not pinned" in message
    assert f"budget {NUM_PAGES * PAGE_BYTES} bytes" in message
    assert loader.loads[C] == 0, "refused before reading anything"
    check_state(pool, layers, loader, {A: 0, B: 0})
    # check_hold counts a hold that is about to be replaced as free.
    pool.check_hold(C, replacing=B)


def test_unhold_makes_the_adapter_evictable_again(loader: FakeLoader) -> None:
    pool, layers = make_pool(loader)
    pool.hold(B)
    pool.hold(C)  # all 4 pages held
    with pytest.raises(EngineError):
        pool.acquire(A)
    assert pool.unhold(B)
    assert not pool.unhold(B), "already released"
    assert pool.held() == {C: 2 * PAGE_BYTES}
    pool.acquire(A)  # evicts B, now the LRU unheld adapter
    check_state(pool, layers, loader, {A: 1, C: 0})


def test_a_held_adapter_in_use_stays_held_after_its_requests_finish(loader: FakeLoader) -> None:
    pool, layers = make_pool(loader)
    pool.acquire(A)  # a running request
    pool.hold(A)
    pool.release(A)
    check_state(pool, layers, loader, {A: 0})
    for k in (D, E, F, G):
        pool.acquire(k)
        pool.release(k)
    assert pool.held() == {A: PAGE_BYTES}


def test_forget_ends_the_hold_and_collect_frees_the_pages(loader: FakeLoader) -> None:
    pool, layers = make_pool(loader)
    pool.hold(A)
    pool.forget("t", "a")
    assert pool.held() == {}
    pool.collect()
    check_state(pool, layers, loader, {})


def test_a_replaced_version_loses_its_hold(loader: FakeLoader) -> None:
    pool, layers = make_pool(loader)
    pool.hold(A)
    pool.forget("t", "a", below_version=2)
    pool.collect()
    assert pool.held() == {}
    check_state(pool, layers, loader, {})
