"""Unit tests for server.engine.host_cache.HostCache: load once, LRU by bytes, prefetch, forget.

A fake loader builds adapters of known byte sizes, counts its calls per key, and can block a
load on a threading.Event (to prove that a prefetch overlaps with other work, and that a get()
of an adapter in flight waits for it instead of loading it twice) or fail it. Every blocking wait
has a timeout, so a regression fails the test instead of hanging it.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import torch

from loraserve.adapters.config import LoraAdapterConfig
from loraserve.adapters.weights import AdapterWeights
from loraserve.server.engine.accounting import EngineObserver
from loraserve.server.engine.host_cache import HostCache
from loraserve.server.engine.types import AdapterKey, EngineError, ErrorKind

WAIT = 5.0
"""Seconds any wait may take before the test fails."""
WIDTH = 4
"""d_in = d_out of the fake adapters' one module: rank r holds 2 * r * WIDTH floats."""


def key(name: str, version: int = 1, tenant: str = "t") -> AdapterKey:
    return AdapterKey(tenant, name, version)


def weights_of(rank: int) -> AdapterWeights:
    config = LoraAdapterConfig(
        rank=rank, alpha=float(rank), use_rslora=False, target_modules=["m"], raw={}
    )
    a = torch.ones(rank, WIDTH)  # (r, d_in)
    b = torch.ones(WIDTH, rank)  # (d_out, r)
    return AdapterWeights(config=config, modules={"m": (a, b)})


def size_of(rank: int) -> int:
    return 2 * rank * WIDTH * 4


@dataclass
class FakeLoader:
    """Loads rank-`ranks[name]` adapters (default 1: 32 bytes), counting calls per key."""

    ranks: dict[str, int] = field(default_factory=dict)
    calls: Counter[AdapterKey] = field(default_factory=Counter)
    gates: dict[AdapterKey, threading.Event] = field(default_factory=dict)
    """A load of such a key blocks until its event is set."""
    started: dict[AdapterKey, threading.Event] = field(default_factory=dict)
    """Set when a load of the key begins."""
    failing: set[AdapterKey] = field(default_factory=set)
    """Loads of these keys raise EngineError(NOT_FOUND) naming the attempt number."""
    threads: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def began(self, k: AdapterKey) -> threading.Event:
        with self.lock:
            return self.started.setdefault(k, threading.Event())

    def __call__(self, k: AdapterKey) -> AdapterWeights:
        with self.lock:
            self.calls[k] += 1
            attempt = self.calls[k]
            self.threads.append(threading.current_thread().name)
        self.began(k).set()
        gate = self.gates.get(k)
        if gate is not None:
            assert gate.wait(WAIT), f"test never opened the gate of {k}"
        if k in self.failing:
            raise EngineError(ErrorKind.NOT_FOUND, f"{k.name} attempt {attempt} failed")
        return weights_of(self.ranks.get(k.name, 1))


@dataclass
class RecordingObserver(EngineObserver):
    events: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_adapter_cache(self, tier: str, event: str, seconds: float = 0.0) -> None:
        assert seconds >= 0.0
        with self.lock:
            self.events.append((tier, event))

    def count(self, event: str) -> int:
        with self.lock:
            return self.events.count(("host", event))


@pytest.fixture
def loader() -> FakeLoader:
    return FakeLoader()


@pytest.fixture
def observer() -> RecordingObserver:
    return RecordingObserver()


MakeCache = Callable[..., HostCache]
"""make_cache(budget=...) -> a HostCache over the test's loader and observer."""


@pytest.fixture
def make_cache(loader: FakeLoader, observer: RecordingObserver) -> Iterator[MakeCache]:
    caches: list[HostCache] = []

    def make(budget: int = 10_000) -> HostCache:
        cache = HostCache(loader, budget, observer)
        caches.append(cache)
        return cache

    yield make
    for gate in loader.gates.values():
        gate.set()  # never leave a worker blocked
    for cache in caches:
        cache.close()


def check(cache: HostCache, loader: FakeLoader, resident: list[AdapterKey]) -> None:
    """The cache holds exactly `resident`, least recently used first, and their bytes."""
    assert cache.resident() == resident
    sizes = [size_of(loader.ranks.get(k.name, 1)) for k in resident]
    assert cache.resident_bytes() == sum(sizes)


def test_get_loads_once_then_hits(
    make_cache: MakeCache, loader: FakeLoader, observer: RecordingObserver
) -> None:
    cache = make_cache()
    a = key("a")
    check(cache, loader, [])
    first = cache.get(a)
    assert loader.calls == {a: 1}
    assert observer.events == [("host", "miss")]
    assert first.nbytes == size_of(1)
    check(cache, loader, [a])

    assert cache.get(a) is first
    assert cache.get(a) is first
    assert loader.calls == {a: 1}, "a resident adapter must not be reloaded"
    assert observer.events == [("host", "miss"), ("host", "hit"), ("host", "hit")]
    check(cache, loader, [a])

    cache.prefetch(a)  # already here: nothing to do
    assert loader.calls == {a: 1}
    assert observer.events == [("host", "miss"), ("host", "hit"), ("host", "hit")]


def test_lru_eviction_by_bytes_keeps_the_most_recent(
    make_cache: MakeCache, loader: FakeLoader, observer: RecordingObserver
) -> None:
    loader.ranks = {"big": 8}  # 256 bytes; the others 32
    cache = make_cache(budget=3 * size_of(1) + 10)
    a, b, c, d, big = key("a"), key("b"), key("c"), key("d"), key("big")
    cache.get(a)
    cache.get(b)
    cache.get(c)
    check(cache, loader, [a, b, c])  # 96 bytes: at the budget, nothing evicted
    assert observer.count("eviction") == 0
    cache.get(a)  # a is now the most recent: LRU order b, c, a
    check(cache, loader, [b, c, a])

    cache.get(d)
    check(cache, loader, [c, a, d])  # b, least recently used, went
    assert observer.count("eviction") == 1

    cache.get(big)  # larger than the whole budget: everything else goes, it stays
    check(cache, loader, [big])
    assert observer.count("eviction") == 4
    cache.get(big)
    assert loader.calls[big] == 1

    cache.get(b)  # b reloads; big goes since the two exceed the budget
    assert loader.calls[b] == 2
    check(cache, loader, [b])
    assert observer.count("eviction") == 5
    assert observer.count("miss") == 6
    assert observer.count("hit") == 2


def test_prefetch_loads_in_the_background_and_get_waits_for_it(
    make_cache: MakeCache, loader: FakeLoader, observer: RecordingObserver
) -> None:
    cache = make_cache()
    a, b = key("a"), key("b")
    gate = loader.gates[a] = threading.Event()

    cache.prefetch(a)  # returns while the load is blocked
    assert loader.began(a).wait(WAIT)
    assert loader.threads[0].startswith("adapter-prefetch"), "not loaded on the prefetch thread"
    check(cache, loader, [])  # in flight, not yet resident
    cache.prefetch(a)  # already on its way: not submitted twice
    # Other work overlaps with the prefetch: b loads in this thread meanwhile.
    cache.get(b)
    check(cache, loader, [b])

    result: list[AdapterWeights] = []
    waiter = threading.Thread(target=lambda: result.append(cache.get(a)))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive(), "get() of an adapter in flight must wait for the prefetch"
    assert loader.calls == {a: 1, b: 1}

    gate.set()
    waiter.join(WAIT)
    assert not waiter.is_alive()
    assert loader.calls == {a: 1, b: 1}, "the waiting get() must not load a second time"
    assert result[0].nbytes == size_of(1)
    check(cache, loader, [b, a])
    assert cache.get(a) is result[0]
    assert observer.events == [("host", "miss"), ("host", "prefetch"), ("host", "hit")]


def test_a_get_does_not_wait_behind_a_slow_prefetch_of_another_adapter(
    make_cache: MakeCache, loader: FakeLoader, observer: RecordingObserver
) -> None:
    """One prefetch thread: a read that hangs (a slow disk, a big file) holds it, and the
    prefetches queued behind it have not started. A get of one of those reads it at once in
    its own thread instead of waiting behind the slow one; the queued prefetch never runs."""
    cache = make_cache()
    slow, queued = key("slow"), key("queued")
    gate = loader.gates[slow] = threading.Event()
    cache.prefetch(slow)
    assert loader.began(slow).wait(WAIT)
    cache.prefetch(queued)  # behind `slow` on the one prefetch thread
    got = cache.get(queued)  # would wait for the gate if it waited for the queued prefetch
    assert got.nbytes == size_of(1) and loader.calls == {slow: 1, queued: 1}
    assert not loader.threads[-1].startswith("adapter-prefetch"), "read in the caller"
    gate.set()
    assert cache.get(slow).nbytes == size_of(1)
    check(cache, loader, [queued, slow])
    assert loader.calls == {slow: 1, queued: 1}, "the cancelled prefetch never read again"


def test_failing_prefetch_does_not_poison_later_gets(
    make_cache: MakeCache, loader: FakeLoader, observer: RecordingObserver
) -> None:
    cache = make_cache()
    a, b = key("a"), key("b")
    loader.failing.add(a)
    gate = loader.gates[a] = threading.Event()
    cache.prefetch(a)
    assert loader.began(a).wait(WAIT)

    # A get() that comes while the prefetch is in flight waits for it and gets its error.
    errors: list[BaseException] = []

    def wait_for_a() -> None:
        try:
            cache.get(a)
        except BaseException as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait_for_a)
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()
    gate.set()
    waiter.join(WAIT)
    assert not waiter.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], EngineError)
    assert loader.calls[a] == 1

    # The single prefetch worker runs b only after a's prefetch has entirely finished.
    cache.prefetch(b)
    assert loader.began(b).wait(WAIT)
    assert a not in cache.resident()  # the failure cached nothing
    cache.get(b)  # b's prefetch done too (waited for, or a hit)
    check(cache, loader, [b])

    # A later get() loads again and raises the loader's own (new) error, not the old one.
    with pytest.raises(EngineError, match="attempt 2") as caught:
        cache.get(a)
    assert caught.value.kind is ErrorKind.NOT_FOUND
    assert loader.calls[a] == 2
    # Once the store serves it again, get() returns it.
    loader.failing.clear()
    weights = cache.get(a)
    assert loader.calls[a] == 3
    assert cache.get(a) is weights
    assert observer.count("prefetch") == 1  # b's: a failed load reports nothing
    assert observer.count("miss") == 1
    check(cache, loader, [b, a])


def test_forget_drops_versions_below_or_all(make_cache: MakeCache, loader: FakeLoader) -> None:
    cache = make_cache()
    v1, v2, v3 = key("a", 1), key("a", 2), key("a", 3)
    other_name, other_tenant = key("b", 1), key("a", 1, tenant="u")
    for k in (v1, v2, v3, other_name, other_tenant):
        cache.get(k)
    check(cache, loader, [v1, v2, v3, other_name, other_tenant])

    cache.forget("t", "a", below_version=3)  # v3 replaced v1 and v2
    check(cache, loader, [v3, other_name, other_tenant])
    cache.forget("t", "a", below_version=3)  # idempotent
    cache.forget("t", "c")  # nothing of that name
    check(cache, loader, [v3, other_name, other_tenant])

    cache.forget("t", "a")  # deleted: every version
    check(cache, loader, [other_name, other_tenant])
    cache.forget("u", "a")
    cache.forget("t", "b")
    check(cache, loader, [])
    assert cache.resident_bytes() == 0

    cache.get(v3)  # forgotten versions load again on demand
    assert loader.calls[v3] == 2
    check(cache, loader, [v3])


def test_forget_of_one_version_keeps_the_others(make_cache: MakeCache, loader: FakeLoader) -> None:
    cache = make_cache()
    v1, v2, v3, other_tenant = key("a", 1), key("a", 2), key("a", 3), key("a", 2, tenant="u")
    for k in (v1, v2, v3, other_tenant):
        cache.get(k)
    cache.forget("t", "a", version=2)  # `delete a@2`: v1 and v3 are still stored and valid
    check(cache, loader, [v1, v3, other_tenant])
    cache.forget("t", "a", version=7)  # never cached: no effect
    check(cache, loader, [v1, v3, other_tenant])


def test_forget_during_an_inflight_prefetch_leaves_nothing_behind(
    make_cache: MakeCache, loader: FakeLoader
) -> None:
    """An adapter deleted while its prefetch is running must not land in the cache afterwards."""
    cache = make_cache()
    a, b = key("a"), key("b")
    gate = loader.gates[a] = threading.Event()
    cache.prefetch(a)
    assert loader.began(a).wait(WAIT)
    cache.forget("t", "a")  # deleted while its bytes are being read
    gate.set()
    cache.prefetch(b)  # the single worker starts b once a's prefetch has finished
    assert loader.began(b).wait(WAIT)
    assert a not in cache.resident(), "a deleted adapter's weights stayed in host memory"


def test_a_get_in_flight_is_shared_by_prefetch_and_other_gets(
    make_cache: MakeCache, loader: FakeLoader, observer: RecordingObserver
) -> None:
    """The device pool's cold loader and the scheduler's prefetch may ask for the same adapter
    at once: it is read from disk once; a failed read is not remembered."""
    cache = make_cache()
    a = key("a")
    gate = loader.gates[a] = threading.Event()
    results: list[AdapterWeights] = []
    first = threading.Thread(target=lambda: results.append(cache.get(a)))
    first.start()
    assert loader.began(a).wait(WAIT)
    cache.prefetch(a)  # the read in flight covers it
    second = threading.Thread(target=lambda: results.append(cache.get(a)))
    second.start()
    second.join(0.2)
    assert second.is_alive(), "a second get() must wait for the read in flight"
    gate.set()
    first.join(WAIT)
    second.join(WAIT)
    assert loader.calls == {a: 1}
    assert len(results) == 2 and results[0] is results[1]
    check(cache, loader, [a])
    assert observer.count("miss") == 1 and observer.count("prefetch") == 0

    b = key("b")
    loader.failing.add(b)
    with pytest.raises(EngineError):
        cache.get(b)
    loader.failing.discard(b)
    cache.get(b)  # a failed read is not remembered: the next get reads again
    assert loader.calls[b] == 2
    check(cache, loader, [a, b])


def test_beside_checksum_reaches_a_disk_read_only() -> None:
    """get(beside_checksum=) hands the callback to the store loader on a read from disk; a
    hit (validated and verified long ago) does not call it: its caller does that work after."""
    received: list[object] = []

    def store_load(key: AdapterKey, *, beside_checksum=None) -> AdapterWeights:  # type: ignore[no-untyped-def]
        received.append(beside_checksum)
        weights = weights_of(1)
        if beside_checksum is not None:
            beside_checksum(weights)
        return weights

    cache = HostCache(store_load, 1 << 20)
    try:
        called: list[AdapterWeights] = []
        first = cache.get(key("a"), beside_checksum=called.append)
        assert called == [first] and received == [called.append]
        assert cache.get(key("a"), beside_checksum=called.append) is first
        assert called == [first] and len(received) == 1, "a hit reads nothing, calls nothing"
        cache.get(key("b"))  # without one, the store loader is called as before
        assert received[-1] is None
    finally:
        cache.close()
