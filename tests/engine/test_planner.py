"""The planner as plain data: KV block allocation and growth, admission (free rows, free blocks,
fairness, adapter readiness), submission limits, prefill chunks and decode rows; no model."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from loraserve.server.engine.fair_queue import FairQueue
from loraserve.server.engine.planner import (
    MIN_PREFILL_CHUNK,
    BlockAllocator,
    GrowthPlan,
    Planner,
    PlannerSettings,
    RowPlan,
    StepPlan,
    blocks_for,
    plan_growth,
)
from loraserve.server.engine.types import AdapterKey, EngineError, ErrorKind
from loraserve.server.limits import LimitDefaults, TenantLimits


def test_blocks_for_rounds_up_to_whole_blocks() -> None:
    assert [blocks_for(n) for n in (1, 15, 16, 17, 32, 33)] == [1, 1, 1, 2, 2, 3]


def test_allocator_never_hands_out_the_scratch_block_and_refuses_whole() -> None:
    pool = BlockAllocator(5)
    assert pool.capacity == 4 and pool.free_count == 4
    got = pool.allocate(3)
    assert got is not None and 0 not in got and len(set(got)) == 3
    assert pool.allocate(2) is None, "a partial allocation must take nothing"
    assert pool.free_count == 1
    pool.free(got)
    assert pool.free_count == 4
    assert sorted(pool.allocate(4) or []) == [1, 2, 3, 4]


def test_allocator_needs_a_real_block() -> None:
    with pytest.raises(ValueError):
        BlockAllocator(1)


def test_growth_that_fits_preempts_nobody() -> None:
    assert plan_growth(held=[2, 3], needed=[3, 3], free=1) == []


def test_growth_preempts_the_most_recently_admitted_first() -> None:
    # Three requests each need one more block, none is free: the last admitted goes, which
    # frees its 2 blocks for the other two.
    assert plan_growth(held=[4, 3, 2], needed=[5, 4, 3], free=0) == [2]


def test_growth_preempts_as_many_as_needed() -> None:
    assert plan_growth(held=[1, 1, 1], needed=[3, 3, 2], free=0) == [2, 1]


# ---- the Planner: admission, limits, growth and chunking from request states alone -----------


@dataclass
class Req:
    """A request state as the planner reads it (the scheduler's Sequence, minus the model)."""

    tenant: str
    arrival: float
    prompt: int = 10
    max_new: int = 5
    adapter: str | None = None
    cancelled: bool = False
    prefilled: int = 0
    generated: list[int] = field(default_factory=list)
    row: int = -1
    admitted: int = 0
    blocks: list[int] = field(default_factory=list)
    pages: tuple[int, ...] = ()

    @property
    def cost_tokens(self) -> int:
        return self.prompt + self.max_new

    @property
    def wants_adapter(self) -> bool:
        return self.adapter is not None

    @property
    def context_len(self) -> int:
        return self.prompt + max(len(self.generated) - 1, 0)

    @property
    def reading(self) -> bool:
        return self.prefilled < self.context_len

    @property
    def decoding(self) -> bool:
        return bool(self.generated) and not self.reading

    @property
    def last_token(self) -> int:
        return self.generated[-1]

    def context_ids(self, start: int, end: int) -> list[int]:
        return list(range(100 + start, 100 + end))


class Adapters:
    """Adapter readiness from plain sets: what is warm, what failed, what exists, what fits."""

    def __init__(
        self,
        ready: set[str] = frozenset(),  # type: ignore[assignment]
        errors: dict[str, EngineError] | None = None,
        unknown: set[str] = frozenset(),  # type: ignore[assignment]
        capacity: int = 100,
        crowded_out: set[str] = frozenset(),  # type: ignore[assignment]
    ) -> None:
        self.ready_names, self.errors, self.unknown = set(ready), dict(errors or {}), unknown
        self.capacity = capacity
        self.crowded_out = crowded_out
        self.asked: list[str] = []

    def key_of(self, request: Req) -> AdapterKey:
        assert request.adapter is not None
        self.asked.append(request.adapter)
        if request.adapter in self.unknown:
            raise EngineError(ErrorKind.NOT_FOUND, f"adapter {request.adapter!r} not found")
        return AdapterKey(request.tenant, request.adapter, 1, rank=8)

    def take_error(self, key: AdapterKey) -> EngineError | None:
        return self.errors.pop(key.name, None)

    def ready(self, key: AdapterKey) -> bool:
        return key.name in self.ready_names

    def fits(self, keys: set[AdapterKey]) -> bool:
        return len(keys) <= self.capacity

    def can_ever_fit(self, key: AdapterKey) -> bool:
        return key.name not in self.crowded_out


def _planner(
    *, paged: bool = True, max_batch_tokens: int = 2048, max_waiting: int = 100
) -> Planner:
    return Planner(PlannerSettings(max_batch_tokens, max_waiting, paged))


def _queue(*requests: Req) -> FairQueue[Req]:
    queue: FairQueue[Req] = FairQueue()
    for request in requests:
        queue.append(request)
    return queue


def _left(queue: FairQueue[Req]) -> list[Req]:
    return queue.heads(len(queue))


def _admit(
    planner: Planner,
    queue: FairQueue[Req],
    running=(),
    *,
    rows=4,
    busy=False,
    free_blocks=100,
    adapters=None,
):  # type: ignore[no-untyped-def]
    return planner.plan_admission(
        queue,
        list(running),
        free_rows=rows,
        busy=busy,
        free_blocks=free_blocks,
        adapters=adapters or Adapters(),
    )


def test_admission_counts_free_blocks_and_keeps_arrival_order_for_kv() -> None:
    # 20 prompt tokens + the next one: 2 blocks each; 3 free blocks fit one of them.
    first, second, small = Req("a", 1, prompt=20), Req("b", 2, prompt=20), Req("c", 3, prompt=3)
    queue = _queue(first, second, small)
    plan = _admit(_planner(), queue, free_blocks=3)
    assert [(a.request, a.blocks) for a in plan.admit] == [(first, 2)]
    # The small one would fit, but does not jump the request that waits for blocks.
    assert _left(queue) == [second, small] and not plan.failed
    # Without paged KV, blocks are not counted.
    queue = _queue(first, second, small)
    plan = _admit(_planner(paged=False), queue, free_blocks=0)
    assert [a.request for a in plan.admit] == [first, second, small]
    assert all(a.blocks == 0 for a in plan.admit) and len(queue) == 0


def test_admission_fills_only_free_rows_fairly_across_tenants() -> None:
    heavy = [Req("heavy", i) for i in range(4)]
    light = [Req("light", 10 + i) for i in range(2)]
    queue = _queue(*heavy, *light)
    plan = _admit(_planner(), queue, rows=4)
    # Each pick comes from the tenant with the fewest running: heavy, light, heavy, light.
    assert [a.request for a in plan.admit] == [heavy[0], light[0], heavy[1], light[1]]
    assert _left(queue) == heavy[2:]
    # Load counts the running requests: with two heavy rows running, the light one goes first.
    queue = _queue(Req("heavy", 0), Req("light", 5))
    plan = _admit(_planner(), queue, [Req("heavy", -2), Req("heavy", -1)], rows=1)
    assert [a.request.tenant for a in plan.admit] == ["light"]


def test_cancelled_and_unknown_adapter_requests_fail_without_taking_a_row() -> None:
    gone, unknown, fine = Req("a", 1, cancelled=True), Req("a", 2, adapter="x"), Req("a", 3)
    queue = _queue(gone, unknown, fine)
    plan = _admit(_planner(), queue, rows=1, adapters=Adapters(unknown={"x"}))
    assert [a.request for a in plan.admit] == [fine]
    assert [(r, e.kind) for r, e in plan.failed] == [
        (gone, ErrorKind.CANCELLED),
        (unknown, ErrorKind.NOT_FOUND),
    ]
    assert len(queue) == 0


def test_a_cold_adapters_request_waits_without_stalling_others() -> None:
    cold = Req("a", 1, adapter="cold")
    warm, base, cold_too = Req("b", 2, adapter="warm"), Req("c", 3), Req("a", 4, adapter="cold")
    adapters = Adapters(ready={"warm"})
    queue = _queue(cold, warm, base, cold_too)
    plan = _admit(_planner(), queue, busy=True, adapters=adapters)
    # While rows decode the cold one keeps its place and loads in the background, once.
    assert [a.request for a in plan.admit] == [warm, base]
    assert [a.key.name for a in plan.admit if a.key] == ["warm"]
    assert [k.name for k in plan.load] == ["cold"]
    assert _left(queue) == [cold, cold_too]
    # Once loaded, it is admitted.
    adapters.ready_names.add("cold")
    plan = _admit(_planner(), queue, busy=True, adapters=adapters)
    assert [a.request for a in plan.admit] == [cold, cold_too] and plan.load == ()
    # An idle engine admits a cold adapter's request at once: it loads when pinned.
    queue = _queue(Req("a", 1, adapter="cold2"))
    plan = _admit(_planner(), queue, busy=False, adapters=Adapters())
    assert len(plan.admit) == 1 and plan.load == ()


def test_a_failed_background_load_fails_its_request_and_adapters_must_fit_together() -> None:
    broken = EngineError(ErrorKind.INTERNAL, "adapter 'bad' is unusable")
    bad, one, two, one_again = (
        Req("a", 1, adapter="bad"),
        Req("a", 2, adapter="one"),
        Req("b", 3, adapter="two"),
        Req("a", 4, adapter="one"),
    )
    queue = _queue(bad, one, two, one_again)
    adapters = Adapters(ready={"one", "two"}, errors={"bad": broken}, capacity=1)
    plan = _admit(_planner(), queue, busy=True, adapters=adapters)
    assert plan.failed == ((bad, broken),)
    # Only one distinct adapter fits: the second waits, the first's other request joins.
    assert [a.request for a in plan.admit] == [one, one_again]
    assert _left(queue) == [two]


def test_an_adapter_crowded_out_by_pins_fails_instead_of_waiting_forever() -> None:
    crowded, other = Req("a", 1, adapter="big"), Req("b", 2, adapter="small")
    queue = _queue(crowded, other)
    adapters = Adapters(ready={"small"}, crowded_out={"big"})
    plan = _admit(_planner(), queue, busy=True, adapters=adapters)
    assert [a.request for a in plan.admit] == [other]
    assert [(r, e.kind) for r, e in plan.failed] == [(crowded, ErrorKind.RESOURCE_EXHAUSTED)]
    assert "pinned" in plan.failed[0][1].message and len(queue) == 0


def test_submit_refusal_names_the_limit_and_whose_it_is() -> None:
    planner = _planner(max_waiting=10)
    request = Req("acme", 1, prompt=30, max_new=20)  # costs 50 tokens
    own = TenantLimits.resolve(LimitDefaults(max_queued_tokens=60), {"max_requests": 2})
    ok = planner.submit_refusal(request, waiting=0, in_flight=1, queued_tokens=10, limits=own)
    assert ok is None
    refused = planner.submit_refusal(request, waiting=0, in_flight=2, queued_tokens=0, limits=own)
    assert refused is not None and refused.kind is ErrorKind.RESOURCE_EXHAUSTED
    assert "'acme' has 2 requests waiting or running" in refused.message
    assert "limit 2, this tenant's max_requests in the tenants file" in refused.message
    refused = planner.submit_refusal(request, waiting=0, in_flight=0, queued_tokens=11, limits=own)
    assert refused is not None and "would have 61 tokens queued" in refused.message
    assert "limit 60, the server default --tenant-max-queued-tokens" in refused.message
    full = planner.submit_refusal(request, waiting=10, in_flight=0, queued_tokens=0, limits=own)
    assert full is not None and "waiting queue is full (10 requests)" in full.message


def _decoding(tenant: str, admitted: int, tokens: int, blocks: int, row: int) -> Req:
    """A decoding request whose next token is its `tokens`-th, holding `blocks` blocks."""
    return Req(
        tenant,
        admitted,
        prompt=tokens - 1,
        generated=[7],
        prefilled=tokens - 1,
        row=row,
        admitted=admitted,
        blocks=list(range(blocks)),
    )


def test_growth_preempts_the_latest_admitted_and_grows_the_rest() -> None:
    # Each next token opens a new block (token 17, 33, 49): 3 blocks wanted, 1 free.
    old, mid, new = (
        _decoding("a", 1, 17, 1, row=2),
        _decoding("b", 2, 33, 2, row=0),
        _decoding("c", 3, 49, 3, row=1),
    )
    reading = Req("d", 0, prompt=40, row=3, admitted=4, blocks=[1, 2, 3])
    plan = _planner().plan_growth([mid, reading, new, old], free_blocks=1)
    # Preempting the latest (3 blocks) frees room for the other two.
    assert plan.preempt == (new,)
    assert plan.grow == ((old, 1), (mid, 1))
    # Enough room: nobody is preempted; a request whose block has room does not grow.
    plan = _planner().plan_growth([old, mid, _decoding("e", 5, 20, 2, row=5)], free_blocks=2)
    assert plan.preempt == () and plan.grow == ((old, 1), (mid, 1))
    # Without paged KV nothing grows.
    assert _planner(paged=False).plan_growth([old, mid], 0) == GrowthPlan((), ())


def test_prefill_reads_chunks_under_the_token_budget() -> None:
    planner = _planner(max_batch_tokens=32)
    decoding = _decoding("a", 1, 5, 1, row=0)
    long, short = Req("b", 1, prompt=40, row=1), Req("c", 2, prompt=10, row=2)
    plan = planner.plan_prefill([decoding, long, short])
    assert plan is not None and plan.kind == "prefill"
    # 32 tokens less one for the decoding row: the long prompt takes all 31, the short waits.
    assert [(r.slot, r.start, len(r.tokens)) for r in plan.rows] == [(1, 0, 31)]
    assert plan.rows[0].tokens == tuple(range(100, 131))
    long.prefilled = 31
    plan = planner.plan_prefill([decoding, long, short])
    assert plan is not None
    assert [(r.slot, r.start, len(r.tokens)) for r in plan.rows] == [(1, 31, 9), (2, 0, 10)]
    # However many rows decode, prefill progresses by at least MIN_PREFILL_CHUNK tokens.
    busy = [_decoding("a", i, 5, 1, row=i) for i in range(40)]
    plan = planner.plan_prefill([*busy, Req("d", 0, prompt=100, row=50)])
    assert plan is not None and [len(r.tokens) for r in plan.rows] == [MIN_PREFILL_CHUNK]
    assert planner.plan_prefill(busy) is None


def test_decode_plans_every_decoding_row_in_slot_order_with_its_blocks_and_pages() -> None:
    first = _decoding("a", 1, 17, 2, row=4)
    second = _decoding("b", 2, 5, 1, row=1)
    second.pages = (3, 4)
    plan = _planner().plan_decode([first, Req("c", 0, prompt=9, row=2), second])
    assert plan == StepPlan(
        "decode",
        (
            RowPlan(slot=1, tokens=(7,), start=4, blocks=(0,), pages=(3, 4)),
            RowPlan(slot=4, tokens=(7,), start=16, blocks=(0, 1), pages=()),
        ),
    )
    assert _planner().plan_decode([Req("c", 0, prompt=9, row=2)]) is None


def test_decode_feeds_the_rows_of_the_launched_step_from_its_output() -> None:
    # async_decode: `launched` is the step on the device; its rows' tokens are not read yet.
    kept = _decoding("a", 1, 17, 2, row=4)
    joined = _decoding("b", 2, 5, 1, row=1)  # prefilled since the launch: its token is known
    launched = [Req("c", 0, row=0), kept]  # index 1 of that step's output is `kept`'s token
    plan = _planner().plan_decode([kept, joined], fed_from=launched)
    assert plan is not None
    assert [(r.slot, r.feed) for r in plan.rows] == [(1, -1), (4, 1)]
    # A request equal in every field to a launched one is still a different request.
    twin = _decoding("a", 1, 17, 2, row=4)
    plan = _planner().plan_decode([twin], fed_from=launched)
    assert plan is not None and plan.rows[0].feed == -1


def test_prefetch_candidates_are_the_next_heads_that_need_an_adapter() -> None:
    a1, a2 = Req("a", 1, adapter="x"), Req("a", 2, adapter="y")
    b1, c1 = Req("b", 3), Req("c", 4, adapter="z")
    queue = _queue(a1, a2, b1, c1)
    # Round-robin over the tenants' heads (a1, b1, c1, then a2), base-model requests dropped.
    assert _planner().prefetch_candidates(queue, 3) == [a1, c1]
    assert _planner().prefetch_candidates(queue, 4) == [a1, c1, a2]
    assert len(queue) == 4  # nothing is taken off the queue
