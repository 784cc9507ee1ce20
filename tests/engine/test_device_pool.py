"""Unit tests for server.engine.device_pool.DevicePool: pages, pinning, LRU eviction, deletion.

The pool drives real MultiLoRALinear layers (small nn.Linear) and a fake loader that counts its
loads and returns adapters of given ranks, so adapters take one to three pages (the last one
often partial). After every call the whole observable state is checked: resident versions and
pins, bytes, placements (distinct pages, never page 0), free pages (via fits), and what every
layer's pages actually hold (each adapter's A and scale * B, all other pages zero).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from loraserve.adapters.config import LoraAdapterConfig
from loraserve.adapters.weights import AdapterWeights
from loraserve.server.engine import cold_loader as cold_loader_module
from loraserve.server.engine import device_pool as device_pool_module
from loraserve.server.engine.accounting import EngineObserver
from loraserve.server.engine.cold_loader import ColdLoadSettings
from loraserve.server.engine.device_pool import DevicePool
from loraserve.server.engine.lora import LoRAContext, LoRAGroup, MultiLoRALinear
from loraserve.server.engine.types import AdapterKey, EngineError, ErrorKind

LAYER_SHAPES = {"l0": (8, 6), "l1": (8, 4), "l2": (5, 8)}
"""Layer name -> (d_in, d_out)."""
PAGE_RANK = 2
PAGE_BYTES = PAGE_RANK * sum(d_in + d_out for d_in, d_out in LAYER_SHAPES.values()) * 4
NUM_PAGES = 4
BUDGET = NUM_PAGES * PAGE_BYTES + PAGE_BYTES - 1
"""Just short of a fifth page."""

RANKS = {"a": 2, "b": 4, "c": 3, "d": 1, "e": 1, "f": 1, "g": 1, "h": 5}
"""Adapter name -> rank; pages: a 1, b 2, c 2 (partial), d-g 1, h 3 (partial). Default 2."""
TARGETS = {"c": ["l2"], "d": ["l0"]}
"""Adapter name -> layers it targets (default: l0 and l1)."""


def key(name: str, version: int = 1, tenant: str = "t", rank: int | None = None) -> AdapterKey:
    return AdapterKey(tenant, name, version, rank=RANKS.get(name, 2) if rank is None else rank)


A, B, C, D, E, F, G, H = (key(n) for n in "abcdefgh")


def pages_for(rank: int) -> int:
    return -(-rank // PAGE_RANK)


@dataclass
class FakeLoader:
    """Builds deterministic adapter weights per key and counts loads."""

    loads: Counter[AdapterKey] = field(default_factory=Counter)
    fail_with: Exception | None = None
    on_load: Callable[[], None] | None = None

    def weights(self, k: AdapterKey) -> AdapterWeights:
        rank = RANKS.get(k.name, 2)
        targets = TARGETS.get(k.name, ["l0", "l1"])
        seed = sum(map(ord, f"{k.tenant}/{k.name}/{k.version}"))
        generator = torch.Generator().manual_seed(seed)
        modules = {}
        for name in targets:
            d_in, d_out = LAYER_SHAPES[name]
            a = torch.randn(rank, d_in, generator=generator)  # (r, d_in)
            b = torch.randn(d_out, rank, generator=generator)  # (d_out, r)
            modules[name] = (a, b)
        config = LoraAdapterConfig(
            rank=rank, alpha=2.0 * rank + 1, use_rslora=False, target_modules=targets, raw={}
        )
        return AdapterWeights(config=config, modules=modules)

    def __call__(self, k: AdapterKey) -> AdapterWeights:
        if self.on_load is not None:
            self.on_load()
        if self.fail_with is not None:
            raise self.fail_with
        self.loads[k] += 1
        return self.weights(k)


@dataclass
class RecordingObserver(EngineObserver):
    events: list[tuple[str, str, float]] = field(default_factory=list)
    residency: list[dict[str, float]] = field(default_factory=list)

    def on_adapter_cache(self, tier: str, event: str, seconds: float = 0.0) -> None:
        self.events.append((tier, event, seconds))

    def on_residency(self, tenant_byte_seconds: dict[str, float]) -> None:
        self.residency.append(dict(tenant_byte_seconds))


def make_layers(dtype: torch.dtype = torch.float32) -> dict[str, MultiLoRALinear]:
    torch.manual_seed(0)
    context = LoRAContext()
    return {
        name: MultiLoRALinear(nn.Linear(d_in, d_out).to(dtype), context=context)
        for name, (d_in, d_out) in LAYER_SHAPES.items()
    }


def make_pool(
    loader: FakeLoader, observer: EngineObserver | None = None
) -> tuple[DevicePool, dict[str, MultiLoRALinear]]:
    layers = make_layers()
    pool = DevicePool(
        layers, budget_bytes=BUDGET, loader=loader, page_rank=PAGE_RANK, observer=observer
    )
    return pool, layers


def check_state(
    pool: DevicePool,
    layers: dict[str, MultiLoRALinear],
    loader: FakeLoader,
    expected: dict[AdapterKey, int],
) -> None:
    """The pool holds exactly `expected` (key -> pins); the layers hold exactly their weights."""
    assert pool.resident() == expected
    assert pool.resident_bytes() == sum(loader.weights(k).nbytes for k in expected)
    placements = {k: pool.placement(k) for k in expected}
    used: list[int] = []
    pinned = 0
    for k, placement in placements.items():
        assert placement is not None, k
        rank = loader.weights(k).config.rank
        assert placement.rank == rank
        assert len(placement.pages) == pool.pages_for(rank) == pages_for(rank)
        assert all(1 <= p <= NUM_PAGES for p in placement.pages), placement
        used.extend(placement.pages)
        if expected[k] > 0:
            pinned += len(placement.pages)
    assert len(set(used)) == len(used), f"two adapters share a page: {placements}"
    assert pool.reserved_bytes() == len(used) * PAGE_BYTES
    assert pool.allocated_bytes() == sum(layer.allocated_bytes() for layer in layers.values())

    # Free pages, as fits() reports them for adapters that are not loaded (warm ones evictable).
    available = NUM_PAGES - pinned
    fresh = [key(f"fresh{i}", rank=PAGE_RANK) for i in range(NUM_PAGES + 1)]
    assert pool.fits(fresh[:available])
    assert not pool.fits(fresh[: available + 1])
    if available:
        assert pool.fits([key("wide", rank=available * PAGE_RANK)])
    assert not pool.fits([key("wide", rank=available * PAGE_RANK + 1)])

    # What every layer's pages hold.
    for name, layer in layers.items():
        want: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for k, placement in placements.items():
            assert placement is not None
            weights = loader.weights(k)
            if name not in weights.modules:
                continue
            a, b = weights.modules[name]
            b = b * weights.config.scale
            for i, page in enumerate(placement.pages):
                lo, hi = i * PAGE_RANK, min((i + 1) * PAGE_RANK, a.shape[0])
                want[page] = (a[lo:hi], b[:, lo:hi])
        assert layer.occupied == set(want), name
        if not expected:
            assert layer.lora_a is None and layer.lora_b is None, f"{name} memory not released"
            assert layer.allocated_bytes() == 0
            continue
        if layer.lora_a is None:
            assert not want, name
            continue
        assert layer.lora_b is not None
        size = layer.lora_a.shape[0]
        assert size <= NUM_PAGES + 1
        assert not layer.lora_a[0].any() and not layer.lora_b[0].any(), "page 0 must stay zero"
        for page in range(size):
            if page in want:
                a, b = want[page]
                n = a.shape[0]
                torch.testing.assert_close(layer.lora_a[page, :n], a)
                torch.testing.assert_close(layer.lora_b[page, :, :n], b)
                assert not layer.lora_a[page, n:].any(), (name, page)
                assert not layer.lora_b[page, :, n:].any(), (name, page)
            else:
                assert not layer.lora_a[page].any(), (name, page)
                assert not layer.lora_b[page].any(), (name, page)


@pytest.fixture
def loader() -> FakeLoader:
    return FakeLoader()


def test_budget_sets_the_number_of_pages(loader: FakeLoader) -> None:
    pool, layers = make_pool(loader)
    assert pool.page_rank == PAGE_RANK
    assert pool.page_bytes == PAGE_BYTES
    assert pool.num_pages == NUM_PAGES
    assert [pool.pages_for(r) for r in (0, 1, 2, 3, 4, 5)] == [1, 1, 1, 2, 2, 3]
    assert pool.placement(A) is None
    assert pool.fits([])
    check_state(pool, layers, loader, {})

    exact = DevicePool(make_layers(), budget_bytes=PAGE_BYTES, loader=loader, page_rank=PAGE_RANK)
    assert exact.num_pages == 1
    with pytest.raises(ValueError, match="holds no page"):
        DevicePool(make_layers(), budget_bytes=PAGE_BYTES - 1, loader=loader, page_rank=PAGE_RANK)
    # Half-precision layers: a page takes half the bytes, so the budget buys twice the pages.
    half = DevicePool(
        make_layers(torch.bfloat16), budget_bytes=BUDGET, loader=loader, page_rank=PAGE_RANK
    )
    assert half.page_bytes == PAGE_BYTES // 2
    assert half.num_pages == 2 * NUM_PAGES + 1
    half.acquire(A)
    assert half.resident_bytes() == loader.weights(A).nbytes // 2  # host weights are float32
    assert half.reserved_bytes() == PAGE_BYTES // 2


def test_acquire_loads_once_pins_and_release_keeps_warm(loader: FakeLoader) -> None:
    pool, layers = make_pool(loader)

    placement = pool.acquire(B)
    assert loader.loads == {B: 1}
    assert pool.placement(B) == placement
    check_state(pool, layers, loader, {B: 1})

    assert pool.acquire(B) == placement
    assert loader.loads == {B: 1}, "a resident adapter must not be reloaded"
    check_state(pool, layers, loader, {B: 2})

    pool.release(B)
    check_state(pool, layers, loader, {B: 1})
    pool.release(B)
    check_state(pool, layers, loader, {B: 0})  # warm: still loaded, unpinned

    assert pool.acquire(B) == placement
    assert loader.loads == {B: 1}, "a warm adapter must not be reloaded"
    check_state(pool, layers, loader, {B: 1})

    pool.acquire(C)  # a partial last page, in another layer
    check_state(pool, layers, loader, {B: 1, C: 1})
    assert layers["l2"].lora_a is not None


def test_out_of_pages_evicts_least_recently_used_unpinned(loader: FakeLoader) -> None:
    pool, layers = make_pool(loader)
    pool.acquire(A)
    check_state(pool, layers, loader, {A: 1})
    placement_b = pool.acquire(B)
    check_state(pool, layers, loader, {A: 1, B: 1})
    pool.acquire(D)
    check_state(pool, layers, loader, {A: 1, B: 1, D: 1})  # all four pages in use
    pool.release(B)  # B unpinned first, so B is least recently used
    check_state(pool, layers, loader, {A: 1, B: 0, D: 1})
    pool.release(A)
    pool.release(D)
    check_state(pool, layers, loader, {A: 0, B: 0, D: 0})
    pool.acquire(A)  # touching A again: LRU order is now B, D, A
    pool.release(A)
    check_state(pool, layers, loader, {A: 0, B: 0, D: 0})

    placement_c = pool.acquire(C)
    assert set(placement_c.pages) == set(placement_b.pages), "C must take B's pages (LRU)"
    assert pool.placement(B) is None
    check_state(pool, layers, loader, {A: 0, C: 1, D: 0})  # B's l0/l1 pages zeroed, C in l2

    pool.release(C)  # LRU order: D, A, C
    placement_b = pool.acquire(B)  # two pages: D and A both go, C stays
    assert pool.placement(D) is None and pool.placement(A) is None
    check_state(pool, layers, loader, {B: 1, C: 0})
    assert loader.loads == {A: 1, B: 2, C: 1, D: 1}

    pool.acquire(A)  # one page: C (two pages) is evicted for it, one page left free
    check_state(pool, layers, loader, {A: 1, B: 1})
    pool.acquire(E)
    check_state(pool, layers, loader, {A: 1, B: 1, E: 1})
    assert pool.reserved_bytes() == NUM_PAGES * PAGE_BYTES


def test_all_pinned_raises_resource_exhausted(loader: FakeLoader) -> None:
    pool, layers = make_pool(loader)
    pool.acquire(A)
    pool.acquire(B)
    pool.acquire(D)
    check_state(pool, layers, loader, {A: 1, B: 1, D: 1})
    assert not pool.fits([E])
    with pytest.raises(EngineError) as caught:
        pool.acquire(E)
    assert caught.value.kind is ErrorKind.RESOURCE_EXHAUSTED
    check_state(pool, layers, loader, {A: 1, B: 1, D: 1})
    # A resident key can still be pinned again.
    pool.acquire(A)
    check_state(pool, layers, loader, {A: 2, B: 1, D: 1})
    # Once a pin goes, the adapter that did not fit gets its page.
    pool.release(D)
    pool.acquire(E)
    check_state(pool, layers, loader, {A: 2, B: 1, E: 1})


def test_too_few_evictable_pages_raise_without_evicting(loader: FakeLoader) -> None:
    """An acquire that cannot succeed must not throw warm adapters away on its way to failing."""
    pool, layers = make_pool(loader)
    pool.acquire(B)
    pool.acquire(A)
    pool.release(A)
    check_state(pool, layers, loader, {A: 0, B: 1})  # one page free, A's one page evictable
    assert not pool.fits([H])  # H needs three pages
    with pytest.raises(EngineError) as caught:
        pool.acquire(H)
    assert caught.value.kind is ErrorKind.RESOURCE_EXHAUSTED
    check_state(pool, layers, loader, {A: 0, B: 1})


def test_fits_counts_pages_by_rank(loader: FakeLoader) -> None:
    pool, layers = make_pool(loader)
    assert pool.fits([H])  # 3 pages
    assert pool.fits([H, A])  # 3 + 1
    assert not pool.fits([H, B])  # 3 + 2
    assert pool.fits([key("x", rank=4 * PAGE_RANK)])
    assert not pool.fits([key("x", rank=4 * PAGE_RANK + 1)])
    assert pool.fits([H, H, A]), "a key listed twice needs its pages once"
    # The rank on the key is what counts: the same name with another rank plans other pages.
    assert not pool.fits([key("h", rank=9)])

    pool.acquire(B)
    check_state(pool, layers, loader, {B: 1})
    assert pool.fits([B, A, D])  # B is resident: only A and D need pages
    assert not pool.fits([H])
    assert not pool.fits([B, H])
    assert not pool.fits([B, A, D, E])


def test_fits_counts_resident_keys_as_free(loader: FakeLoader) -> None:
    pool, layers = make_pool(loader)
    pool.acquire(A)
    pool.acquire(B)
    pool.acquire(D)
    check_state(pool, layers, loader, {A: 1, B: 1, D: 1})
    assert pool.fits([A, B, D])
    assert pool.fits([A])
    assert not pool.fits([E])
    assert not pool.fits([A, E])
    pool.release(B)
    check_state(pool, layers, loader, {A: 1, B: 0, D: 1})
    assert pool.fits([A, B, D])
    assert pool.fits([C])  # B's two pages are evictable
    assert pool.fits([A, E, F])
    assert not pool.fits([H])


def test_fits_does_not_count_a_warm_wanted_key_as_evictable(loader: FakeLoader) -> None:
    """A warm (unpinned) key that the set itself needs cannot also make room for a new key."""
    pool, layers = make_pool(loader)
    pool.acquire(A)
    pool.acquire(B)
    pool.acquire(D)
    for k in (A, B, D):
        pool.release(k)
    check_state(pool, layers, loader, {A: 0, B: 0, D: 0})
    assert pool.fits([A, B, D])
    assert pool.fits([A, B, E])  # E evicts D
    assert pool.fits([A, C])  # C's two pages come from B's and D's
    # A, B and D take all four pages; E needs a fifth. Pinning them all must fail, so must fits().
    assert not pool.fits([A, B, D, E])
    assert not pool.fits([B, H])  # 2 + 3
    for k in (A, B, D):
        pool.acquire(k)
    with pytest.raises(EngineError):
        pool.acquire(E)
    check_state(pool, layers, loader, {A: 1, B: 1, D: 1})


def test_forget_dooms_versions_below_and_collect_frees_unpinned(loader: FakeLoader) -> None:
    pool, layers = make_pool(loader)
    old, new = key("b", version=1), key("b", version=2)
    pool.acquire(old)
    pool.release(old)
    pool.acquire(new)
    check_state(pool, layers, loader, {old: 0, new: 1})

    pool.forget("t", "b", below_version=2)
    check_state(pool, layers, loader, {old: 0, new: 1})  # doomed, not freed until collect()
    pool.collect()
    check_state(pool, layers, loader, {new: 1})

    # A deleted adapter's pinned version stays for its running request, then goes on release.
    pool.forget("t", "b")
    pool.collect()
    check_state(pool, layers, loader, {new: 1})
    pool.release(new)
    check_state(pool, layers, loader, {})


def test_forget_matches_tenant_name_and_version_exactly(loader: FakeLoader) -> None:
    pool, layers = make_pool(loader)
    v1, v3 = key("b", version=1), key("b", version=3)
    other_tenant = key("b", version=1, tenant="u")
    pool.acquire(v3)
    pool.acquire(other_tenant)
    check_state(pool, layers, loader, {v3: 1, other_tenant: 1})
    pool.forget("t", "b", below_version=3)  # v3 is the replacement: kept
    pool.forget("t", "a")  # another adapter: no effect
    pool.forget("v", "b")  # another tenant: no effect
    for k in (v3, other_tenant):
        pool.release(k)
    pool.collect()
    check_state(pool, layers, loader, {v3: 0, other_tenant: 0})

    pool.acquire(v1)  # evicts v3 (LRU); v1 then is the only "b" of tenant t
    check_state(pool, layers, loader, {v1: 1, other_tenant: 0})
    pool.forget("t", "b", below_version=2)
    pool.release(v1)  # doomed and unpinned: freed on release
    check_state(pool, layers, loader, {other_tenant: 0})


def test_pinned_doomed_adapter_survives_collect_and_is_freed_on_last_release(
    loader: FakeLoader,
) -> None:
    pool, layers = make_pool(loader)
    pool.acquire(B)
    pool.acquire(B)
    pool.acquire(C)
    pool.forget("t", "b")
    pool.collect()
    check_state(pool, layers, loader, {B: 2, C: 1})
    pool.release(B)
    pool.collect()
    check_state(pool, layers, loader, {B: 1, C: 1})
    pool.acquire(B)  # a doomed version still pinned can be pinned again (no reload)
    assert loader.loads[B] == 1
    pool.release(B)
    pool.release(B)
    check_state(pool, layers, loader, {C: 1})
    assert layers["l0"].lora_a is not None, "C is still resident: stacks stay allocated"


def test_forget_of_one_version_dooms_only_it_and_waits_for_its_pins(loader: FakeLoader) -> None:
    pool, layers = make_pool(loader)
    v1, v2, v3 = key("d", version=1), key("d", version=2), key("d", version=3)
    for k in (v1, v2, v3):
        pool.acquire(k)
    pool.release(v1)
    pool.release(v3)
    pool.forget("t", "d", version=2)  # `delete b@2` while a request runs on it
    pool.collect()
    check_state(pool, layers, loader, {v1: 0, v2: 1, v3: 0})  # the running request keeps v2
    pool.release(v2)
    pool.collect()
    check_state(pool, layers, loader, {v1: 0, v3: 0})


def test_forget_during_a_load_dooms_the_version_being_loaded(loader: FakeLoader) -> None:
    """An adapter deleted while acquire() reads it serves its request, then must not stay warm."""
    pool, layers = make_pool(loader)
    loader.on_load = lambda: pool.forget("t", "b")  # another thread deletes it mid-load
    pool.acquire(B)
    loader.on_load = None
    check_state(pool, layers, loader, {B: 1})
    pool.release(B)
    pool.collect()
    check_state(pool, layers, loader, {})


def test_evicting_everything_releases_layer_memory(loader: FakeLoader) -> None:
    pool, layers = make_pool(loader)
    assert pool.allocated_bytes() == 0
    pool.acquire(B)
    pool.acquire(C)
    assert all(layer.lora_a is not None for layer in layers.values())
    assert pool.allocated_bytes() > 0
    pool.release(B)
    pool.release(C)
    pool.forget("t", "b")
    pool.forget("t", "c")
    pool.collect()
    check_state(pool, layers, loader, {})  # asserts lora_a/lora_b are None everywhere
    assert pool.allocated_bytes() == 0
    assert pool.reserved_bytes() == 0
    # And the pool works again afterwards, with all its pages.
    pool.acquire(H)
    pool.acquire(A)
    check_state(pool, layers, loader, {A: 1, H: 1})


def test_loader_error_propagates_and_leaves_the_pool_unchanged(loader: FakeLoader) -> None:
    pool, layers = make_pool(loader)
    pool.acquire(A)
    pool.acquire(B)
    pool.acquire(D)
    pool.release(B)
    check_state(pool, layers, loader, {A: 1, B: 0, D: 1})
    loader.fail_with = EngineError(ErrorKind.NOT_FOUND, "gone")
    with pytest.raises(EngineError) as caught:
        pool.acquire(C)
    assert caught.value.kind is ErrorKind.NOT_FOUND
    check_state(pool, layers, loader, {A: 1, B: 0, D: 1})  # B was not evicted for nothing

    loader.fail_with = ValueError("corrupt file")
    with pytest.raises(ValueError, match="corrupt"):
        pool.acquire(C)
    check_state(pool, layers, loader, {A: 1, B: 0, D: 1})

    loader.fail_with = None
    pool.acquire(C)
    check_state(pool, layers, loader, {A: 1, C: 1, D: 1})


class FakeClock:
    """Stands in for the `time` module inside device_pool: monotonic() only."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def _totals(reports: list[dict[str, float]]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for report in reports:
        for tenant, byte_seconds in report.items():
            totals[tenant] = totals.get(tenant, 0.0) + byte_seconds
    return totals


def test_observer_gets_cache_events_and_residency(
    loader: FakeLoader, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    monkeypatch.setattr(device_pool_module, "time", clock)
    observer = RecordingObserver()

    def slow_load() -> None:
        clock.now += 0.5

    loader.on_load = slow_load
    pool, layers = make_pool(loader, observer)
    other = key("a", tenant="u")
    nbytes = {k: loader.weights(k).nbytes for k in (B, D, H, other)}

    pool.acquire(B)  # loaded from t=1000.5
    assert observer.events == [("device", "miss", 0.5)]
    assert observer.residency == [], "nothing was resident before the first load"
    clock.now += 2.0
    pool.acquire(other)  # loaded from t=1003
    assert observer.events[-1] == ("device", "miss", 0.5)
    # Residency up to the moment the set changed (the other's load time included).
    assert observer.residency == [{"t": nbytes[B] * 2.5}]
    pool.acquire(B)
    assert observer.events[-1] == ("device", "hit", 0.0)
    clock.now += 3.0
    pool.tick()  # t=1006
    assert observer.residency[-1] == pytest.approx({"t": nbytes[B] * 3, "u": nbytes[other] * 3})
    check_state(pool, layers, loader, {B: 2, other: 1})

    pool.release(B)
    pool.release(B)
    pool.release(other)
    pool.acquire(D)  # the last free page, from t=1006.5: no eviction
    pool.release(D)  # LRU order: B, other, D
    observer.events.clear()
    clock.now += 1.0
    pool.acquire(H)  # t=1008, three pages: B (two) and then the other (one) are evicted
    assert [e[:2] for e in observer.events] == [
        ("device", "eviction"),
        ("device", "eviction"),
        ("device", "miss"),
    ]
    check_state(pool, layers, loader, {D: 0, H: 1})
    # Every byte-second is reported exactly once: from each load to its eviction.
    assert _totals(observer.residency) == pytest.approx(
        {"t": nbytes[B] * 7.5 + nbytes[D] * 1.5, "u": nbytes[other] * 5.0}
    )
    clock.now += 2.0
    pool.tick()
    assert observer.residency[-1] == pytest.approx({"t": (nbytes[D] + nbytes[H]) * 2.0})

    pool.forget("t", "d")
    pool.forget("t", "h")
    pool.collect()  # H is pinned: only D goes
    check_state(pool, layers, loader, {H: 1})
    pool.release(H)
    check_state(pool, layers, loader, {})
    reports = len(observer.residency)
    clock.now += 5.0
    pool.tick()
    assert len(observer.residency) == reports, "an empty pool reports no residency"
    assert _totals(observer.residency) == pytest.approx(
        {"t": nbytes[B] * 7.5 + nbytes[D] * 3.5 + nbytes[H] * 2.0, "u": nbytes[other] * 5.0}
    )


# ---- cold loads in the background -----------------------------------------------------------

WAIT = 60.0
"""Upper bound on any wait for a background load (a hang guard, never a timing assertion)."""


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.001)


@dataclass
class Gate:
    """Holds the fake loader's reads until opened; `entered` is set once one is waiting."""

    opened: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)

    def __call__(self) -> None:
        self.entered.set()
        if not self.opened.wait(WAIT):
            raise TimeoutError("the test never opened the gate")


@pytest.fixture
def cold_pools() -> Iterator[list[DevicePool]]:
    """Pools whose loader threads are closed after the test."""
    pools: list[DevicePool] = []
    yield pools
    for pool in pools:
        pool.close()


def make_cold_pool(
    loader: FakeLoader, pools: list[DevicePool], settings: ColdLoadSettings | None = None
) -> tuple[DevicePool, dict[str, MultiLoRALinear]]:
    layers = make_layers()
    pool = DevicePool(
        layers, budget_bytes=BUDGET, loader=loader, page_rank=PAGE_RANK, cold=settings
    )
    pools.append(pool)
    return pool, layers


def test_background_load_stages_then_acquire_commits_the_same_pages(
    loader: FakeLoader, cold_pools: list[DevicePool]
) -> None:
    pool, layers = make_cold_pool(loader, cold_pools)
    pool.request(C)
    wait_for(lambda: pool.ready(C), "C to load")
    check_state(pool, layers, loader, {})  # loaded, but no page is written before acquire
    assert pool.cold_pending() == 1
    pool.request(C)  # already staged: nothing starts
    pool.acquire(C)
    check_state(pool, layers, loader, {C: 1})
    assert loader.loads[C] == 1
    assert pool.cold_pending() == 0
    pool.request(C)  # resident: nothing starts
    assert pool.cold_pending() == 0 and pool.ready(C)


def test_acquire_waits_for_the_load_in_flight_instead_of_reading_again(
    loader: FakeLoader, cold_pools: list[DevicePool]
) -> None:
    pool, layers = make_cold_pool(loader, cold_pools)
    gate = Gate()
    loader.on_load = gate
    pool.request(B)
    assert gate.entered.wait(WAIT)
    assert not pool.ready(B)
    opener = threading.Thread(target=lambda: (time.sleep(0.05), gate.opened.set()))
    opener.start()
    pool.acquire(B)  # blocks until the background read ends, then commits it
    opener.join()
    check_state(pool, layers, loader, {B: 1})
    assert loader.loads[B] == 1


def test_collect_commits_finished_loads_as_warm_evicting_lru(
    loader: FakeLoader, cold_pools: list[DevicePool]
) -> None:
    """A load whose request went away does not hold staging memory: it becomes warm."""
    pool, layers = make_cold_pool(loader, cold_pools)
    pool.acquire(A)
    pool.acquire(B)
    pool.acquire(D)
    pool.release(A)
    pool.release(B)  # four pages used: A, B warm (LRU in that order), D pinned
    pool.request(H)  # three pages
    wait_for(lambda: pool.ready(H), "H to load")
    check_state(pool, layers, loader, {A: 0, B: 0, D: 1})
    pool.collect()
    check_state(pool, layers, loader, {D: 1, H: 0})  # A and B were evicted for it, D was not
    assert pool.cold_pending() == 0


def test_a_finished_load_stays_staged_while_every_page_is_pinned(
    loader: FakeLoader, cold_pools: list[DevicePool]
) -> None:
    pool, layers = make_cold_pool(loader, cold_pools)
    for k in (A, B, D):
        pool.acquire(k)
    pool.request(C)
    wait_for(lambda: pool.ready(C), "C to load")
    pool.collect()
    check_state(pool, layers, loader, {A: 1, B: 1, D: 1})
    assert pool.cold_pending() == 1
    assert not pool.fits([C])
    with pytest.raises(EngineError) as caught:
        pool.acquire(C)
    assert caught.value.kind is ErrorKind.RESOURCE_EXHAUSTED
    assert pool.cold_pending() == 1, "a refused commit keeps the loaded adapter"
    pool.release(B)
    pool.collect()
    check_state(pool, layers, loader, {A: 1, C: 0, D: 1})
    assert pool.cold_pending() == 0
    assert loader.loads[C] == 1


def test_ready_marks_a_warm_adapter_recently_used(
    loader: FakeLoader, cold_pools: list[DevicePool]
) -> None:
    """A request about to be admitted touches its warm adapter, so others are evicted first."""
    pool, layers = make_cold_pool(loader, cold_pools)
    for k in (A, B, D):
        pool.acquire(k)
    for k in (A, B, D):
        pool.release(k)  # LRU order: A, B, D
    assert pool.ready(A)  # now B, D, A
    pool.acquire(H)  # three pages: B (two) and D (one) go, A stays
    check_state(pool, layers, loader, {A: 0, H: 1})


def test_a_delete_during_a_background_load_leaves_nothing(
    loader: FakeLoader, cold_pools: list[DevicePool]
) -> None:
    pool, layers = make_cold_pool(loader, cold_pools)
    gate = Gate()
    loader.on_load = gate
    pool.request(B)
    assert gate.entered.wait(WAIT)
    pool.forget("t", "b")  # deleted while its bytes are being read
    gate.opened.set()
    wait_for(lambda: pool.cold_pending() == 0, "the load to end")
    error = pool.take_error(B)
    assert error is not None and error.kind is ErrorKind.NOT_FOUND
    assert "'b'" in error.message
    pool.collect()
    check_state(pool, layers, loader, {})
    assert not pool.ready(B)


def test_a_delete_drops_a_staged_load(loader: FakeLoader, cold_pools: list[DevicePool]) -> None:
    pool, layers = make_cold_pool(loader, cold_pools)
    pool.request(B)
    pool.request(D)
    wait_for(lambda: pool.ready(B) and pool.ready(D), "B and D to load")
    pool.forget("t", "b")
    assert not pool.ready(B)
    assert pool.cold_pending() == 1
    pool.collect()
    check_state(pool, layers, loader, {D: 0})


def test_a_failed_background_load_is_reported_once_then_forgotten(
    loader: FakeLoader, cold_pools: list[DevicePool]
) -> None:
    pool, layers = make_cold_pool(loader, cold_pools)
    pool.acquire(A)
    loader.fail_with = EngineError(ErrorKind.NOT_FOUND, "gone")
    pool.request(C)
    wait_for(lambda: pool.cold_pending() == 0, "the load to fail")
    pool.request(C)  # a failure waiting to be taken is not retried behind the caller's back
    assert pool.cold_pending() == 0
    error = pool.take_error(C)
    assert error is not None and error.kind is ErrorKind.NOT_FOUND
    assert pool.take_error(C) is None, "reported once"

    loader.fail_with = ValueError("corrupt file")
    pool.request(C)
    wait_for(lambda: pool.cold_pending() == 0, "the load to fail")
    for _ in range(cold_loader_module.FAILURE_TTL):
        pool.collect()  # nobody took it for as many engine iterations
    assert pool.take_error(C) is None, "an untaken failure must not fail a later request"

    pool.request(C)
    wait_for(lambda: pool.cold_pending() == 0, "the load to fail")
    error = pool.take_error(C)
    assert error is not None and error.kind is ErrorKind.INTERNAL
    assert "adapter load failed: corrupt file" in error.message
    check_state(pool, layers, loader, {A: 1})

    loader.fail_with = None
    pool.request(C)
    wait_for(lambda: pool.ready(C), "C to load")
    pool.acquire(C)
    check_state(pool, layers, loader, {A: 1, C: 1})


def test_at_most_max_pending_loads_are_in_flight_or_staged(
    loader: FakeLoader, cold_pools: list[DevicePool]
) -> None:
    pool, layers = make_cold_pool(loader, cold_pools, ColdLoadSettings(workers=1, max_pending=2))
    gate = Gate()
    loader.on_load = gate
    for k in (A, B, D):
        pool.request(k)
    assert pool.cold_pending() == 2, "D must wait for room"
    gate.opened.set()
    wait_for(lambda: pool.ready(A) and pool.ready(B), "A and B to load")
    pool.request(D)
    assert not pool.ready(D) and pool.cold_pending() == 2, "staged loads count too"
    pool.acquire(A)  # committing one makes room
    pool.request(D)
    wait_for(lambda: pool.ready(D), "D to load")
    pool.acquire(B)
    pool.acquire(D)
    check_state(pool, layers, loader, {A: 1, B: 1, D: 1})
    assert sum(loader.loads.values()) == 3


def _count_calls(
    monkeypatch: pytest.MonkeyPatch, calls: list[str], targets: list[tuple[object, str]]
) -> None:
    for owner, name in targets:
        real = getattr(owner, name)

        def spy(*args: object, _name: str = name, _real=real, **kwargs: object) -> object:
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(owner, name, spy)


COMMIT_OPS = [
    (torch, "tensor"),
    (torch, "_foreach_copy_"),
    (torch.Tensor, "index_copy_"),
    (torch.Tensor, "index_fill_"),
]
"""What a commit may launch: a page index built from host data, multi-tensor copies, index
copies and fills."""


def test_a_commit_writes_consecutive_pages_in_one_copy_per_dtype(
    loader: FakeLoader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Committing an adapter (engine thread, between two forwards) into consecutive pages
    writes every layer's factors and the groups' live flags as slices in one multi-tensor copy
    per dtype, building no index from host data: per layer, each was a kernel launch on CUDA
    (and once a blocking host-to-device copy), about a hundred per adapter. Into pages that
    are not consecutive, one page index serves every layer. Pages and flags end up as before."""
    layers = make_layers()
    fused = LoRAGroup([layers["l0"], layers["l1"]])  # same d_in, like q/k/v
    alone = LoRAGroup([layers["l2"]])
    pool = DevicePool(layers, budget_bytes=BUDGET, loader=loader, page_rank=PAGE_RANK)
    pool.acquire(C)  # rank 3, l2 only: pages 1 and 2
    calls: list[str] = []
    with monkeypatch.context() as patched:
        _count_calls(patched, calls, COMMIT_OPS)
        placement = pool.acquire(B)  # rank 4, l0 and l1: pages 3 and 4
    assert placement.pages == (3, 4)
    assert calls == ["_foreach_copy_", "_foreach_copy_"]  # float32 pages, int32 live flags
    check_state(pool, layers, loader, {B: 1, C: 1})
    assert fused.live is not None and alone.live is not None
    c_pages = pool.placement(C)
    assert c_pages is not None
    assert fused.live.nonzero().flatten().tolist() == sorted(placement.pages)
    assert alone.live.nonzero().flatten().tolist() == sorted(c_pages.pages)
    pool.release(C)
    pool.forget("t", "c")
    pool.collect()  # clearing syncs the flags from the members' occupancy
    assert not alone.live.any()
    assert fused.live.nonzero().flatten().tolist() == sorted(placement.pages)

    pool.release(B)
    assert pool.acquire(D).pages == (2,)  # C's pages 1 and 2 were freed; D takes one
    calls.clear()
    with monkeypatch.context() as patched:
        _count_calls(patched, calls, COMMIT_OPS)
        split = pool.acquire(H)  # three pages: 1 and, evicting B, 3 and 4
    assert split.pages == (1, 3, 4)
    assert calls.count("tensor") == 1  # one page index for every layer
    assert "_foreach_copy_" not in calls
    check_state(pool, layers, loader, {D: 1, H: 1})
    pool.close()


def test_fused_groups_name_each_group_of_two_or_more_in_member_order() -> None:
    layers = make_layers()
    LoRAGroup([layers["l1"], layers["l0"]])
    LoRAGroup([layers["l2"]])  # one member: staged and written as a plain layer's pages
    assert device_pool_module.fused_groups(layers) == (("l1", "l0"),)
    assert device_pool_module.fused_groups({"l1": layers["l1"]}) == ()  # l0 is not served


def test_a_background_load_stages_fused_groups_so_the_commit_stacks_nothing(
    loader: FakeLoader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loader thread lays a fully targeted group's pages out as the group's stacks hold
    them; the engine thread's commit then copies them as they are, launching no stack or
    concatenation between two forwards. The pages end up exactly the adapter's."""
    layers = make_layers()
    LoRAGroup([layers["l0"], layers["l1"]])
    pool = DevicePool(layers, budget_bytes=BUDGET, loader=loader, page_rank=PAGE_RANK)
    pool.request(B)  # l0 and l1: the whole group
    deadline = time.monotonic() + 10
    while not pool.ready(B):
        assert time.monotonic() < deadline, "the background load never finished"
        time.sleep(0.005)
    calls: list[str] = []
    for name in ("stack", "cat"):
        real = getattr(torch, name)
        monkeypatch.setattr(
            torch, name, lambda *a, _n=name, _r=real, **k: calls.append(_n) or _r(*a, **k)
        )
    pool.acquire(B)
    monkeypatch.undo()
    assert calls == []
    check_state(pool, layers, loader, {B: 1})
    pool.close()


def test_an_eviction_for_room_zeroes_only_what_the_new_adapter_leaves(
    loader: FakeLoader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit that evicts for room zeroes the victims' pages only where the new adapter will
    not overwrite them whole: none for an adapter of the victim's layers in its pages, the whole
    fused group's pages for one that writes a member alone, and whatever pages it does not
    take. The layers end up holding exactly the resident adapters either way."""
    layers = make_layers()
    group = LoRAGroup([layers["l0"], layers["l1"]])
    pool = DevicePool(layers, budget_bytes=BUDGET, loader=loader, page_rank=PAGE_RANK)
    zeroed: list[tuple[str, list[int]]] = []
    for owner_type in (LoRAGroup, MultiLoRALinear):
        real = owner_type.zero_pages

        def spy(self, index: torch.Tensor, _real=real) -> None:
            zeroed.append(("group" if self is group else "layer", index.tolist()))
            _real(self, index)

        monkeypatch.setattr(owner_type, "zero_pages", spy)
    for k in (A, B, E):  # 1 + 2 + 1 pages of l0/l1: the pool is full
        pool.acquire(k)
        pool.release(k)
    check_state(pool, layers, loader, {A: 0, B: 0, E: 0})

    a_pages = pool.placement(A).pages  # type: ignore[union-attr]
    assert pool.acquire(F).pages == a_pages  # F (l0/l1, one page) evicts A, takes its page
    assert zeroed == []  # F's group write covers the page whole
    check_state(pool, layers, loader, {B: 0, E: 0, F: 1})

    b_pages = pool.placement(B).pages  # type: ignore[union-attr]
    placement = pool.acquire(D)  # l0 alone, one page: B (two pages, LRU) goes
    assert placement.pages[0] in b_pages
    assert zeroed == [("group", list(b_pages))]  # l1 is not D's: zeroed too, before D's write
    check_state(pool, layers, loader, {D: 1, E: 0, F: 1})

    zeroed.clear()
    e_pages = pool.placement(E).pages  # type: ignore[union-attr]
    pool.acquire(C)  # l2 alone, two pages: E goes (one free page besides)
    assert zeroed == [("group", list(e_pages))]  # C writes none of the group's pages
    check_state(pool, layers, loader, {C: 1, D: 1, F: 1})
    pool.close()
