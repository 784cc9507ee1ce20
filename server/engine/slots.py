"""Device adapter slots: which adapter version sits in which slot, pin counts and LRU eviction.

A slot holds one adapter version's A and B in every layer it targets. A slot in use by a running
request is pinned and never evicted; unpinned slots stay loaded (warm) until their space is needed
or their adapter is deleted. Slot 0 is reserved for "no adapter".
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from adapters.weights import AdapterWeights
from server.engine.accounting import EngineObserver
from server.engine.lora import MultiLoRALinear
from server.engine.types import AdapterKey, AdapterRef, EngineError, ErrorKind

AdapterLoader = Callable[[AdapterKey], AdapterWeights]
"""Reads and validates one adapter version from the store (raises EngineError NOT_FOUND)."""
AdapterResolver = Callable[[AdapterRef], AdapterKey]
"""The current version of a named adapter (raises EngineError NOT_FOUND)."""


@dataclass
class _Slot:
    key: AdapterKey
    rank: int
    nbytes: int
    pins: int = 0
    doomed: bool = False
    """Deleted from the store: free the slot as soon as its last pin is released."""


class SlotTable:
    """Maps adapter versions to device slots 1..num_slots.

    Called from the engine thread only, except `forget` and the read-only views, which may come
    from any thread (hence the lock).
    """

    def __init__(
        self,
        layers: dict[str, MultiLoRALinear],
        num_slots: int,
        loader: AdapterLoader,
        observer: EngineObserver | None = None,
    ) -> None:
        self._layers = layers
        self._observer = observer or EngineObserver()
        self._last_tick = time.monotonic()
        first = next(iter(layers.values()), None)
        self._itemsize = first.base_layer.weight.element_size() if first is not None else 4
        self._loader = loader
        self._num_slots = num_slots
        self._free: list[int] = list(range(num_slots, 0, -1))
        # Unpinned slots in least-recently-used order first; pinned slots are not in it.
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._slots: dict[int, _Slot] = {}
        self._by_key: dict[AdapterKey, int] = {}
        self._lock = threading.Lock()

    @property
    def num_slots(self) -> int:
        return self._num_slots

    def slot_of(self, key: AdapterKey) -> int | None:
        return self._by_key.get(key)

    def rank_of(self, slot: int) -> int:
        return self._slots[slot].rank

    def resident(self) -> dict[AdapterKey, int]:
        """Loaded adapter versions and their pin counts (for tests and metrics)."""
        with self._lock:
            return {s.key: s.pins for s in self._slots.values()}

    def resident_bytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._slots.values())

    def fits(self, keys: Iterable[AdapterKey]) -> bool:
        """Whether all `keys` could be pinned at once (resident ones, or free/evictable slots).

        A warm slot holding one of `keys` is needed for that key, so it is not evictable room.
        """
        with self._lock:
            wanted = set(keys)
            missing = {k for k in wanted if k not in self._by_key}
            evictable = sum(1 for slot in self._lru if self._slots[slot].key not in wanted)
            return len(missing) <= len(self._free) + evictable

    def acquire(self, key: AdapterKey) -> int:
        """Pins `key` in a slot, loading it (and evicting the LRU unpinned slot) if needed."""
        with self._lock:
            slot = self._by_key.get(key)
            if slot is not None:
                entry = self._slots[slot]
                entry.pins += 1
                self._lru.pop(slot, None)
                self._observer.on_adapter_cache("hit")
                return slot
            if not self._free and not self._lru:
                raise EngineError(
                    ErrorKind.RESOURCE_EXHAUSTED, "every adapter slot is pinned by running requests"
                )
        # Load outside the lock: disk I/O and validation can take a while.
        started = time.monotonic()
        weights = self._loader(key)
        with self._lock:
            self._tick_locked()  # residency so far is accounted before the set changes
            if not self._free:
                victim, _ = self._lru.popitem(last=False)
                self._evict(victim)
            slot = self._free.pop()
            for name, (lora_a, lora_b) in weights.modules.items():
                self._layers[name].set_slot(slot, lora_a, lora_b, weights.config.scale)
            # Device bytes of the adapter's own factors (weights are float32 on the host).
            nbytes = weights.nbytes * self._itemsize // 4
            self._slots[slot] = _Slot(key=key, rank=weights.config.rank, nbytes=nbytes, pins=1)
            self._by_key[key] = slot
        self._observer.on_adapter_cache("miss", time.monotonic() - started)
        return slot

    def release(self, key: AdapterKey) -> None:
        """Unpins one use of `key`; the slot stays warm unless its adapter was deleted."""
        with self._lock:
            slot = self._by_key[key]
            entry = self._slots[slot]
            entry.pins -= 1
            if entry.pins == 0:
                if entry.doomed:
                    self._evict(slot)
                else:
                    self._lru[slot] = None

    def forget(self, tenant: str, name: str, below_version: int | None = None) -> None:
        """The adapter was deleted (or replaced by `below_version`): doom its loaded versions.

        May be called from any thread; the engine thread frees doomed slots in `collect()`, so a
        forward in progress never sees its layers change underneath it.
        """
        with self._lock:
            for entry in self._slots.values():
                key = entry.key
                same_adapter = key.tenant == tenant and key.name == name
                if same_adapter and (below_version is None or key.version < below_version):
                    entry.doomed = True

    def collect(self) -> None:
        """Frees every doomed slot that no running request pins (engine thread, between steps)."""
        with self._lock:
            for slot, entry in list(self._slots.items()):
                if entry.doomed and entry.pins == 0:
                    self._lru.pop(slot, None)
                    self._evict(slot)

    def tick(self) -> None:
        """Reports each tenant's device byte-seconds since the last tick (for cost metrics)."""
        with self._lock:
            self._tick_locked()

    def _tick_locked(self) -> None:
        now = time.monotonic()
        elapsed, self._last_tick = now - self._last_tick, now
        held: dict[str, float] = {}
        for entry in self._slots.values():
            held[entry.key.tenant] = held.get(entry.key.tenant, 0.0) + entry.nbytes * elapsed
        if held:
            self._observer.on_residency(held)

    def _evict(self, slot: int) -> None:
        self._tick_locked()
        self._observer.on_adapter_cache("eviction")
        entry = self._slots.pop(slot)
        del self._by_key[entry.key]
        for layer in self._layers.values():
            layer.clear_slot(slot)
        if not self._slots:
            for layer in self._layers.values():
                layer.release_memory()
        self._free.append(slot)
