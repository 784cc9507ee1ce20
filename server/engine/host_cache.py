"""Host-memory tier of the adapter cache: validated adapters in CPU memory, LRU, byte budget.

Sits between the durable store on disk (slow: read, checksum, validate) and the device pages
(fast to fill from here). Adapters that queued requests will need are prefetched into it on a
background thread, and the device pool's cold loads read through it on theirs, so loading
overlaps with the engine's compute; each version is read from disk at most once at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future

from loraserve.adapters.weights import AdapterWeights
from loraserve.server.engine.accounting import EngineObserver
from loraserve.server.engine.compute_threads import helper_pool
from loraserve.server.engine.types import AdapterKey, forgotten_versions

log = logging.getLogger(__name__)

StoreLoader = Callable[..., AdapterWeights]
"""(key) -> weights: reads, checksums and validates one adapter version from disk (raises
EngineError). The server's (AdapterService.load) also takes `beside_checksum=`, which
HostCache.get passes on when its caller gives one."""

BesideChecksum = Callable[[AdapterWeights], None]
"""Work on freshly validated weights that may run while their checksum is still computed."""


class HostCache:
    """LRU of validated adapters in host memory, bounded in bytes; thread-safe."""

    def __init__(
        self,
        load: StoreLoader,
        budget_bytes: int,
        observer: EngineObserver | None = None,
        prefetch_workers: int = 1,
    ) -> None:
        self._load = load
        self.budget_bytes = budget_bytes
        self._observer = observer or EngineObserver()
        self._entries: OrderedDict[AdapterKey, AdapterWeights] = OrderedDict()
        self._bytes = 0
        self._inflight: dict[AdapterKey, Future[AdapterWeights]] = {}
        self._queued: dict[AdapterKey, Future[AdapterWeights]] = {}
        """Prefetches submitted and maybe not started yet (a subset of _inflight)."""
        self._dropped: set[AdapterKey] = set()
        """Forgotten while being loaded: the load must not land in memory."""
        self._lock = threading.Lock()
        self._pool = helper_pool("adapter-prefetch", prefetch_workers)

    def get(
        self, key: AdapterKey, *, beside_checksum: BesideChecksum | None = None
    ) -> AdapterWeights:
        """The adapter's weights: from memory, from a load in flight, or from disk now.

        A load from disk here is registered as in flight too, so a prefetch or another thread's
        `get` of the same version (the device pool's cold loader and the scheduler's prefetch
        can ask at once) waits for it instead of reading the files a second time.

        beside_checksum: passed to the store loader on a read from disk (and called only then):
        work on the validated weights that may overlap the checksum (see AdapterService.load).
        """
        with self._lock:
            weights = self._entries.get(key)
            if weights is not None:
                self._entries.move_to_end(key)
                self._observer.on_adapter_cache("host", "hit")
                return weights
            future = self._inflight.get(key)
            queued = self._queued.pop(key, None)
            if future is not None and future is queued and future.cancel():
                # A prefetch still waiting for the prefetch thread (busy with another read,
                # maybe a slow one): read it here instead of waiting behind that one.
                future = None
            if future is None:
                mine: Future[AdapterWeights] = Future()
                self._inflight[key] = mine
                self._dropped.discard(key)
        if future is not None:
            return future.result()
        started = time.monotonic()
        try:
            if beside_checksum is None:
                weights = self._load(key)
            else:
                weights = self._load(key, beside_checksum=beside_checksum)
        except BaseException as exc:
            with self._lock:
                self._inflight.pop(key, None)
            mine.set_exception(exc)
            raise
        self._observer.on_adapter_cache("host", "miss", time.monotonic() - started)
        self._insert(key, weights)  # before leaving _inflight: no gap for a second read
        with self._lock:
            self._inflight.pop(key, None)
        mine.set_result(weights)
        return weights

    def prefetch(self, key: AdapterKey) -> None:
        """Starts loading `key` in the background unless it is here or on its way."""
        with self._lock:
            if key in self._entries or key in self._inflight:
                return
            self._dropped.discard(key)
            future = self._pool.submit(self._prefetch, key)
            self._inflight[key] = self._queued[key] = future

    def _prefetch(self, key: AdapterKey) -> AdapterWeights:
        try:
            started = time.monotonic()
            weights = self._load(key)
            self._observer.on_adapter_cache("host", "prefetch", time.monotonic() - started)
            self._insert(key, weights)
            return weights
        except Exception:
            # The request that needs it will load it itself and report the error.
            log.debug("prefetch of %s failed", key, exc_info=True)
            raise
        finally:
            with self._lock:
                self._inflight.pop(key, None)
                self._queued.pop(key, None)

    def _insert(self, key: AdapterKey, weights: AdapterWeights) -> None:
        with self._lock:
            if key in self._entries or key in self._dropped:
                self._dropped.discard(key)
                return
            self._entries[key] = weights
            self._bytes += weights.nbytes
            while self._bytes > self.budget_bytes and len(self._entries) > 1:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self._observer.on_adapter_cache("host", "eviction")

    def forget(
        self,
        tenant: str,
        name: str,
        below_version: int | None = None,
        *,
        version: int | None = None,
    ) -> None:
        """Drops a deleted (or replaced) adapter's versions from host memory."""
        matches = forgotten_versions(tenant, name, below_version, version)

        with self._lock:
            for key in list(self._entries):
                if matches(key):
                    self._bytes -= self._entries.pop(key).nbytes
            self._dropped.update(k for k in self._inflight if matches(k))

    def contains(self, key: AdapterKey) -> bool:
        """Whether this adapter version is in host memory now (not counting loads in flight)."""
        with self._lock:
            return key in self._entries

    def resident(self) -> list[AdapterKey]:
        with self._lock:
            return list(self._entries)

    def resident_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
