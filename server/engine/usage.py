"""Per-adapter usage since the server started: requests, tokens, compute and cost per name.

Prometheus keeps `tenant` labels only (one series per adapter name would grow without bound as
tenants create and delete names), so the per-adapter view lives here and is read through the
Adapters API (AdapterInfo.usage). Counts are per adapter NAME, summed over its versions, per
server process since it started; nothing is persisted.

Memory stays bounded: deleting a name drops its entry, a request that finishes after its
adapter was deleted is not counted (a tombstone remembers the deleted versions), and the table
never holds more than `max_entries` names (the least recently used go first).

The engine thread records (one dict update under a lock when a request finishes); readers on
the gRPC side take the same lock only long enough to copy one entry.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace

from loraserve.server.engine.types import AdapterKey, Usage

DEFAULT_MAX_ENTRIES = 100_000
"""Adapter names tracked at once (~200 bytes each); beyond it the least recently used go."""
MAX_TOMBSTONES = 4096
"""Deleted names remembered, so a request still running at the delete does not re-create its
entry; only such races need one, so the oldest can be forgotten."""


@dataclass(frozen=True)
class AdapterUsageTotals:
    """One adapter name's use since the server started (all versions together)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    compute_seconds: float = 0.0
    cost: float = 0.0
    """compute_seconds priced as Usage.cost."""
    last_used: float = 0.0
    """Unix time of the last finished request; 0 if none."""


class AdapterUsageLedger:
    """Thread-safe totals per (tenant, adapter name), bounded in size."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max_entries = max_entries
        self._totals: OrderedDict[tuple[str, str], AdapterUsageTotals] = OrderedDict()
        self._deleted: OrderedDict[tuple[str, str], int] = OrderedDict()
        """(tenant, name) -> highest version deleted; versions are never reused (the store
        keeps a per-name counter), so a later upload of the name gets a higher one."""
        self._lock = threading.Lock()

    def record(self, key: AdapterKey, usage: Usage, now: float | None = None) -> None:
        """Adds one finished request that ran on adapter version `key`."""
        name = (key.tenant, key.name)
        when = time.time() if now is None else now
        with self._lock:
            deleted = self._deleted.get(name)
            if deleted is not None:
                if key.version <= deleted:
                    return  # finished after its adapter was deleted
                del self._deleted[name]
            old = self._totals.pop(name, AdapterUsageTotals())
            self._totals[name] = AdapterUsageTotals(
                requests=old.requests + 1,
                prompt_tokens=old.prompt_tokens + usage.prompt_tokens,
                completion_tokens=old.completion_tokens + usage.completion_tokens,
                compute_seconds=old.compute_seconds + usage.compute_seconds,
                cost=old.cost + usage.cost,
                last_used=max(old.last_used, when),
            )
            while len(self._totals) > self._max_entries:
                self._totals.popitem(last=False)

    def get(self, tenant: str, name: str) -> AdapterUsageTotals:
        """The name's totals (zeros if never used since the start)."""
        with self._lock:
            totals = self._totals.get((tenant, name))
        return replace(totals) if totals is not None else AdapterUsageTotals()

    def forget(self, tenant: str, name: str, version: int) -> None:
        """The name was deleted (its versions up to `version`): drop its totals."""
        with self._lock:
            self._totals.pop((tenant, name), None)
            self._deleted.pop((tenant, name), None)
            self._deleted[(tenant, name)] = version
            while len(self._deleted) > MAX_TOMBSTONES:
                self._deleted.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._totals)
