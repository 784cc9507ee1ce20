"""FairQueue: per-tenant FIFOs, least-loaded admission, token totals, heads for prefetch."""

from __future__ import annotations

from dataclasses import dataclass

from loraserve.server.engine.fair_queue import FairQueue


@dataclass(frozen=True)
class Item:
    tenant: str
    arrival: float
    cost_tokens: int = 10


def test_pop_fair_prefers_the_least_loaded_tenant_then_the_oldest() -> None:
    queue: FairQueue[Item] = FairQueue()
    items = [Item("a", 1), Item("a", 2), Item("a", 3), Item("b", 4), Item("c", 5)]
    for item in items:
        queue.append(item)
    assert len(queue) == 5 and queue.count("a") == 3 and queue.tokens("a") == 30
    load = {"a": 0}
    picked = []
    while queue:
        item = queue.pop_fair(load)
        assert item is not None
        picked.append(item)
        load[item.tenant] = load.get(item.tenant, 0) + 1
    assert [(i.tenant, i.arrival) for i in picked] == [
        ("a", 1), ("b", 4), ("c", 5), ("a", 2), ("a", 3),
    ]  # fmt: skip
    assert queue.pop_fair({}) is None and queue.tokens("a") == 0


def test_push_front_restores_order_and_totals() -> None:
    queue: FairQueue[Item] = FairQueue()
    first, second, third = Item("a", 1), Item("a", 2), Item("a", 3)
    for item in (first, second, third):
        queue.append(item)
    taken = [queue.pop_fair({}), queue.pop_fair({})]
    queue.push_front([t for t in taken if t is not None])
    assert len(queue) == 3 and queue.tokens("a") == 30
    assert [queue.pop_fair({}) for _ in range(3)] == [first, second, third]


def test_heads_round_robin_across_tenants_by_arrival() -> None:
    queue: FairQueue[Item] = FairQueue()
    for item in (Item("a", 1), Item("a", 2), Item("b", 3), Item("b", 4), Item("c", 0.5)):
        queue.append(item)
    heads = queue.heads(4)
    assert [(i.tenant, i.arrival) for i in heads] == [("c", 0.5), ("a", 1), ("b", 3), ("a", 2)]
    assert len(queue) == 5, "heads() does not remove anything"
