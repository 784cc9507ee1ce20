"""Device tier of the adapter cache: adapter weights in fixed-size pages, a budget in bytes.

An adapter of rank r takes ceil(r / page_rank) pages, so the budget buys many small adapters or
fewer large ones. An adapter in use by a running request is pinned and never evicted; unpinned
adapters stay loaded (warm) until their pages are needed or the adapter is deleted, then the
least recently used go first. Page 0 is reserved as the all-zero "no adapter" page.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from loraserve.adapters.weights import AdapterWeights
from loraserve.server.engine.accounting import EngineObserver
from loraserve.server.engine.lora import MultiLoRALinear
from loraserve.server.engine.types import AdapterKey, AdapterRef, EngineError, ErrorKind

AdapterLoader = Callable[[AdapterKey], AdapterWeights]
"""Returns one adapter version's validated weights (host tier, else disk; raises EngineError)."""
AdapterResolver = Callable[[AdapterRef], AdapterKey]
"""The current version of a named adapter (raises EngineError NOT_FOUND)."""

DEFAULT_PAGE_RANK = 8


@dataclass(frozen=True)
class Placement:
    """Where an adapter sits on the device."""

    pages: tuple[int, ...]
    rank: int


@dataclass
class _Entry:
    key: AdapterKey
    placement: Placement
    nbytes: int
    """Device bytes of the adapter's own factors (what the tenant is billed for)."""
    pins: int = 0
    doomed: bool = False
    """Deleted from the store: free the pages as soon as the last pin is released."""


class DevicePool:
    """Maps adapter versions to device pages; pins, LRU eviction, byte budget.

    Called from the engine thread, except `forget`, `tick` and the read-only views, which may
    come from any thread (hence the lock). Page writes happen only on the engine thread, between
    forward passes.
    """

    def __init__(
        self,
        layers: dict[str, MultiLoRALinear],
        *,
        budget_bytes: int,
        loader: AdapterLoader,
        page_rank: int = DEFAULT_PAGE_RANK,
        observer: EngineObserver | None = None,
    ) -> None:
        self._layers = layers
        self._loader = loader
        self._observer = observer or EngineObserver()
        self.page_rank = page_rank
        first = next(iter(layers.values()), None)
        self._itemsize = first.base_layer.weight.element_size() if first is not None else 4
        self.page_bytes = sum(
            layer.page_bytes(page_rank, self._itemsize) for layer in layers.values()
        )
        self.num_pages = budget_bytes // self.page_bytes if self.page_bytes else 0
        if self.num_pages < 1:
            raise ValueError(
                f"adapter device budget of {budget_bytes} bytes holds no page "
                f"({self.page_bytes} bytes each for this model)"
            )
        self._free: list[int] = list(range(self.num_pages, 0, -1))
        # Unpinned adapters, least recently used first; pinned ones are not in it.
        self._lru: OrderedDict[AdapterKey, None] = OrderedDict()
        self._entries: dict[AdapterKey, _Entry] = {}
        self._lock = threading.Lock()
        self._last_tick = time.monotonic()
        self._loading: AdapterKey | None = None
        """The adapter `acquire` is loading outside the lock (the engine thread loads one at a
        time), so a concurrent `forget` can doom it before it lands."""
        self._loading_doomed = False

    def pages_for(self, rank: int) -> int:
        return max(1, math.ceil(rank / self.page_rank))

    def placement(self, key: AdapterKey) -> Placement | None:
        entry = self._entries.get(key)
        return entry.placement if entry else None

    def resident(self) -> dict[AdapterKey, int]:
        """Loaded adapter versions and their pin counts (for tests and metrics)."""
        with self._lock:
            return {k: e.pins for k, e in self._entries.items()}

    def resident_bytes(self) -> int:
        """Bytes of the resident adapters' own factors."""
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def reserved_bytes(self) -> int:
        """Bytes of the pages in use (what the budget counts)."""
        with self._lock:
            return (self.num_pages - len(self._free)) * self.page_bytes

    def allocated_bytes(self) -> int:
        """Device memory actually held by the layers' page stacks."""
        return sum(layer.allocated_bytes() for layer in self._layers.values())

    def fits(self, keys: Iterable[AdapterKey]) -> bool:
        """Whether all `keys` could be pinned at once (resident, or free/evictable pages).

        A warm adapter that is itself wanted is not evictable room.
        """
        with self._lock:
            wanted = set(keys)
            needed = sum(self.pages_for(k.rank) for k in wanted if k not in self._entries)
            evictable = sum(
                len(self._entries[k].placement.pages) for k in self._lru if k not in wanted
            )
            return needed <= len(self._free) + evictable

    def acquire(self, key: AdapterKey) -> Placement:
        """Pins `key` on the device, loading it (and evicting LRU unpinned adapters) if needed."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.pins += 1
                self._lru.pop(key, None)
                self._observer.on_adapter_cache("device", "hit")
                return entry.placement
            if key.rank:
                self._check_room(key, self.pages_for(key.rank))  # before paying for a load
            self._loading, self._loading_doomed = key, False
        started = time.monotonic()
        try:
            weights = self._loader(key)  # outside the lock: may read and validate from disk
        finally:
            with self._lock:
                self._loading, doomed = None, self._loading_doomed
        needed = self.pages_for(weights.config.rank)
        with self._lock:
            self._tick_locked()  # residency so far is accounted before the set changes
            self._check_room(key, needed)
            while len(self._free) < needed:
                victim, _ = self._lru.popitem(last=False)
                self._evict(victim, pressure=True)
            pages = tuple(self._free.pop() for _ in range(needed))
            for name, (lora_a, lora_b) in weights.modules.items():
                self._layers[name].write(
                    list(pages),
                    self.page_rank,
                    self.num_pages,
                    lora_a,
                    lora_b,
                    weights.config.scale,
                )
            placement = Placement(pages=pages, rank=weights.config.rank)
            nbytes = weights.nbytes * self._itemsize // 4  # host weights are float32
            self._entries[key] = _Entry(
                key=key, placement=placement, nbytes=nbytes, pins=1, doomed=doomed
            )
        self._observer.on_adapter_cache("device", "miss", time.monotonic() - started)
        return placement

    def _check_room(self, key: AdapterKey, needed: int) -> None:
        """Raises (evicting nothing) unless free plus evictable pages can hold `needed`."""
        evictable = sum(len(self._entries[k].placement.pages) for k in self._lru)
        if len(self._free) + evictable < needed:
            raise EngineError(
                ErrorKind.RESOURCE_EXHAUSTED,
                f"adapter {key.name!r} needs {needed} device pages but running requests pin "
                f"the rest of the {self.num_pages}-page adapter budget",
            )

    def release(self, key: AdapterKey) -> None:
        """Unpins one use of `key`; it stays warm unless its adapter was deleted."""
        with self._lock:
            entry = self._entries[key]
            entry.pins -= 1
            if entry.pins == 0:
                if entry.doomed:
                    self._evict(key)
                else:
                    self._lru[key] = None

    def forget(self, tenant: str, name: str, below_version: int | None = None) -> None:
        """The adapter was deleted (or replaced by `below_version`): doom its loaded versions.

        The engine thread frees doomed pages in `collect()`, so a forward in progress never sees
        its layers change underneath it.
        """

        def matches(key: AdapterKey) -> bool:
            same = key.tenant == tenant and key.name == name
            return same and (below_version is None or key.version < below_version)

        with self._lock:
            for key, entry in self._entries.items():
                if matches(key):
                    entry.doomed = True
            if self._loading is not None and matches(self._loading):
                self._loading_doomed = True  # being loaded right now: doomed on arrival

    def collect(self) -> None:
        """Frees every doomed adapter no running request pins (engine thread, between steps)."""
        with self._lock:
            for key, entry in list(self._entries.items()):
                if entry.doomed and entry.pins == 0:
                    self._lru.pop(key, None)
                    self._evict(key)

    def tick(self) -> None:
        """Reports each tenant's device byte-seconds since the last tick (for cost metrics)."""
        with self._lock:
            self._tick_locked()

    def _tick_locked(self) -> None:
        now = time.monotonic()
        elapsed, self._last_tick = now - self._last_tick, now
        held: dict[str, float] = {}
        for entry in self._entries.values():
            held[entry.key.tenant] = held.get(entry.key.tenant, 0.0) + entry.nbytes * elapsed
        if held:
            self._observer.on_residency(held)

    def _evict(self, key: AdapterKey, *, pressure: bool = False) -> None:
        """Frees an adapter's pages; `pressure` marks an LRU eviction (vs. a delete)."""
        self._tick_locked()
        if pressure:
            self._observer.on_adapter_cache("device", "eviction")
        entry = self._entries.pop(key)
        pages = list(entry.placement.pages)
        for layer in self._layers.values():
            layer.clear(pages)
        self._free.extend(pages)
        if not self._entries:
            for layer in self._layers.values():
                layer.release_memory()
