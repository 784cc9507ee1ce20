"""The waiting queue, fair across tenants: one FIFO per tenant, admission by least load.

A tenant that floods the server only lengthens its own queue: when a row frees up, the next
request comes from the tenant with the fewest requests running (ties: the oldest head), so a
light tenant's requests keep getting admitted however many a heavy tenant has queued.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from typing import Generic, Protocol, TypeVar


class Queued(Protocol):
    """What the queue needs of a waiting request."""

    @property
    def tenant(self) -> str: ...

    @property
    def arrival(self) -> float: ...

    @property
    def cost_tokens(self) -> int: ...


T = TypeVar("T", bound=Queued)


class FairQueue(Generic[T]):
    """Per-tenant FIFOs with per-tenant totals. Not thread-safe: the scheduler holds its lock."""

    def __init__(self) -> None:
        self._queues: dict[str, collections.deque[T]] = {}
        self._tokens: collections.Counter[str] = collections.Counter()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def count(self, tenant: str) -> int:
        queue = self._queues.get(tenant)
        return len(queue) if queue else 0

    def tokens(self, tenant: str) -> int:
        """Prompt plus requested completion tokens of the tenant's waiting requests."""
        return self._tokens[tenant]

    def append(self, item: T) -> None:
        self._queues.setdefault(item.tenant, collections.deque()).append(item)
        self._tokens[item.tenant] += item.cost_tokens
        self._size += 1

    def push_front(self, items: Iterable[T]) -> None:
        """Returns items taken out (in their original order) to the heads of their queues."""
        for item in reversed(list(items)):
            self._queues.setdefault(item.tenant, collections.deque()).appendleft(item)
            self._tokens[item.tenant] += item.cost_tokens
            self._size += 1

    def pop_fair(self, load: Mapping[str, int]) -> T | None:
        """The head of the least-loaded tenant's queue (ties: the oldest head)."""
        best: tuple[int, float, str] | None = None
        for tenant, queue in self._queues.items():
            if queue:
                key = (load.get(tenant, 0), queue[0].arrival, tenant)
                if best is None or key < best:
                    best = key
        if best is None:
            return None
        queue = self._queues[best[2]]
        item = queue.popleft()
        if not queue:
            del self._queues[best[2]]
        self._tokens[item.tenant] -= item.cost_tokens
        self._size -= 1
        return item

    def heads(self, limit: int) -> list[T]:
        """Up to `limit` requests likely to be admitted next: the tenants' heads, round-robin."""
        out: list[T] = []
        depth = 0
        while len(out) < limit:
            layer = [q[depth] for q in self._queues.values() if len(q) > depth]
            if not layer:
                break
            out.extend(sorted(layer, key=lambda item: item.arrival)[: limit - len(out)])
            depth += 1
        return out
