"""The scheduler's decisions as plain data: which requests run, their KV blocks and adapter pages.

`Planner` holds every policy of the engine loop: the per-tenant limits at submission, fair
admission by free rows, free KV blocks and adapter readiness, preemption when a running request
cannot grow, and the prefill chunks under the token budget. It reads request states and
returns plans (AdmissionPlan, GrowthPlan, StepPlan); it allocates nothing, loads nothing and
runs nothing, so it is unit-testable without a model, a tensor or a thread (as vLLM's
scheduler output is). The scheduler (server.engine.scheduler) feeds it and applies its plans:
it pins adapters, allocates blocks, assigns rows and hands each StepPlan to the executor
(server.engine.executor), which owns the model, the KV memory, the static buffers and graphs.

KV memory is paged: blocks of BLOCK_SIZE tokens from a pool sized at start; a request holds
only the blocks its tokens fill. Block 0 is never handed out: padding writes go there.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, NamedTuple, Protocol, TypeVar

from loraserve.server.engine.fair_queue import FairQueue, Queued
from loraserve.server.engine.types import AdapterKey, EngineError, ErrorKind
from loraserve.server.limits import TenantLimits

BLOCK_SIZE = 16


def blocks_for(tokens: int, block_size: int = BLOCK_SIZE) -> int:
    """Blocks that hold `tokens` tokens."""
    return -(-tokens // block_size)


class RowPlan(NamedTuple):
    """One request's part of a forward.

    A NamedTuple, not a frozen dataclass: the planner builds one per running row per step, and
    a frozen dataclass's __init__ costs twice as much.
    """

    slot: int
    """Its batch slot (0..max_batch_size-1): where its routing lives in the static buffers."""
    tokens: tuple[int, ...]
    """Tokens fed: a prompt chunk, or the last generated token."""
    start: int
    """Position of tokens[0]."""
    blocks: tuple[int, ...]
    """Its KV blocks in order (paged executor; empty for the generic path)."""
    pages: tuple[int, ...]
    """Its adapter's device pages (empty for the base model)."""
    feed: int = -1
    """Decode with async_decode: its input token is row `feed` of the previous decode step's
    output, still on the device (tokens holds a placeholder); -1: tokens holds it."""


@dataclass(frozen=True)
class StepPlan:
    kind: Literal["prefill", "decode"]
    rows: tuple[RowPlan, ...]


class BlockAllocator:
    """Free-list of KV blocks 1..num_blocks-1 (block 0 is the scratch block)."""

    def __init__(self, num_blocks: int, block_size: int = BLOCK_SIZE) -> None:
        if num_blocks < 2:
            raise ValueError("the KV pool needs at least one block besides the scratch block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, 0, -1))

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Blocks a request can ever hold (all but the scratch block)."""
        return self.num_blocks - 1

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks, or None (allocating nothing) when fewer are free."""
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: tuple[int, ...] | list[int]) -> None:
        self._free.extend(blocks)


def plan_growth(held: list[int], needed: list[int], free: int) -> list[int]:
    """Which running requests to preempt so every other one gets the blocks it needs.

    held[i] / needed[i]: blocks request i holds / must hold after this step, in admission
    order. Preempts the most recently admitted first (their work is cheapest to redo), as
    vLLM does, until the growth of the rest fits in `free` plus what the preempted release.
    Returns the preempted indices, most recent first.
    """
    growth = [max(0, n - h) for h, n in zip(held, needed, strict=True)]
    preempted: list[int] = []
    want = sum(growth)
    i = len(held) - 1
    while want > free and i >= 0:
        preempted.append(i)
        want -= growth[i]
        free += held[i]
        i -= 1
    return preempted


MIN_PREFILL_CHUNK = 16
"""Prefill always progresses by at least this many tokens per iteration, however busy decoding."""


class PlannedRequest(Queued, Protocol):
    """What the planner reads of a request (the scheduler's Sequence), beyond what the fair
    queue reads; it never writes it."""

    @property
    def cancelled(self) -> bool: ...

    @property
    def wants_adapter(self) -> bool:
        """Runs on an adapter (not the base model)."""
        ...

    @property
    def context_len(self) -> int: ...

    @property
    def prefilled(self) -> int: ...

    @property
    def reading(self) -> bool: ...

    @property
    def decoding(self) -> bool: ...

    @property
    def row(self) -> int: ...

    @property
    def admitted(self) -> int: ...

    @property
    def blocks(self) -> list[int]: ...

    @property
    def pages(self) -> tuple[int, ...]: ...

    @property
    def last_token(self) -> int: ...

    def context_ids(self, start: int, end: int) -> list[int]: ...


R = TypeVar("R", bound=PlannedRequest)


class AdapterReadiness(Protocol[R]):
    """The adapter tier's answers the planner needs, asked lazily, in admission order.

    Lazily because the answers are not free: resolving a request's adapter version reads the
    store and fixes the version the request runs on, so only the requests the planner actually
    considers are resolved (the rest keep their place, and the version current when they are
    considered). The scheduler answers from its DevicePool; tests answer from dicts.
    """

    def key_of(self, request: R) -> AdapterKey:
        """The adapter version the request runs on; raises EngineError (NOT_FOUND, ...)."""
        ...

    def take_error(self, key: AdapterKey) -> EngineError | None:
        """The error a background load of `key` failed with, once."""
        ...

    def ready(self, key: AdapterKey) -> bool:
        """Pinning `key` now would not wait for a load (resident, or loaded and copied)."""
        ...

    def fits(self, keys: set[AdapterKey]) -> bool:
        """All `keys` could be pinned at once."""
        ...

    def can_ever_fit(self, key: AdapterKey) -> bool:
        """`key` fits the device budget beside the operator-pinned adapters (pins never leave
        on their own, so a request that cannot fit would wait forever)."""
        ...


def cancelled_error() -> EngineError:
    """The error of a request whose caller went away (disconnect or deadline)."""
    return EngineError(ErrorKind.CANCELLED, "the request was cancelled")


def crowded_out(key: AdapterKey) -> EngineError:
    """The refusal of a request whose adapter cannot fit beside the pinned adapters."""
    return EngineError(
        ErrorKind.RESOURCE_EXHAUSTED,
        f"adapter {key.name!r} does not fit in the device adapter budget beside the pinned "
        "adapters; ask an operator to unpin some (or raise --adapter-device-bytes)",
    )


@dataclass(frozen=True)
class Admission(Generic[R]):
    request: R
    key: AdapterKey | None
    """The adapter version to pin (None: the base model)."""
    blocks: int
    """KV blocks to allocate (0 without paged KV)."""


@dataclass(frozen=True)
class AdmissionPlan(Generic[R]):
    """Who joins the batch this iteration, who fails before joining, which adapters to load."""

    admit: tuple[Admission[R], ...]
    """In admission order; each takes the next free row."""
    failed: tuple[tuple[R, EngineError], ...]
    """Taken off the queue and failed (cancelled, unknown adapter, a failed background load)."""
    load: tuple[AdapterKey, ...]
    """Cold adapters whose requests wait while rows decode: start loading them in the
    background (each once, in the order first wanted)."""


@dataclass(frozen=True)
class GrowthPlan(Generic[R]):
    """The KV growth of one decode step."""

    preempt: tuple[R, ...]
    """Requests to preempt (most recently admitted first): free their blocks, slot and pin and
    requeue them at the head, to recompute their context when readmitted."""
    grow: tuple[tuple[R, int], ...]
    """(request, blocks to add) for every other decoding request that needs more."""


@dataclass(frozen=True)
class PlannerSettings:
    max_batch_tokens: int
    """Tokens per iteration: prefill chunks plus one per decoding row."""
    max_waiting_requests: int
    """Queue bound across tenants."""
    paged: bool
    """KV memory is paged (admission counts blocks; decoding rows grow and may be preempted)."""


class Planner:
    """The engine loop's policy, as functions from request states to plans."""

    def __init__(self, settings: PlannerSettings) -> None:
        self.settings = settings

    def submit_refusal(
        self,
        request: PlannedRequest,
        *,
        waiting: int,
        in_flight: int,
        queued_tokens: int,
        limits: TenantLimits,
    ) -> EngineError | None:
        """RESOURCE_EXHAUSTED naming the limit (and whose it is) when queueing `request` would
        exceed one; None when it may be queued.

        `waiting`: requests queued in all; `in_flight`: the tenant's requests waiting or
        running; `queued_tokens`: the cost of the tenant's waiting requests.
        """
        tenant = request.tenant

        def refuse(message: str) -> EngineError:
            return EngineError(ErrorKind.RESOURCE_EXHAUSTED, f"{message}; retry later")

        if waiting >= self.settings.max_waiting_requests:
            return refuse(
                f"the waiting queue is full ({self.settings.max_waiting_requests} requests)"
            )
        if in_flight >= limits.max_requests.value:
            return refuse(
                f"tenant {tenant!r} has {in_flight} requests waiting or running "
                f"({limits.max_requests.describe()})"
            )
        queued = queued_tokens + request.cost_tokens
        if queued > limits.max_queued_tokens.value:
            return refuse(
                f"tenant {tenant!r} would have {queued} tokens queued "
                f"({limits.max_queued_tokens.describe()})"
            )
        return None

    def plan_admission(
        self,
        waiting: FairQueue[R],
        running: Iterable[R],
        *,
        free_rows: int,
        busy: bool,
        free_blocks: int,
        adapters: AdapterReadiness[R],
    ) -> AdmissionPlan[R]:
        """Fills up to `free_rows` rows from `waiting`, fairly across tenants.

        Each pick comes from the tenant with the fewest requests running (FairQueue.pop_fair).
        With paged KV a request is admitted only if the blocks of its context and next token
        are free; when they are not, admission stops (arrival order for KV: nobody behind it
        jumps the queue). A request whose adapter is not ready while rows decode (`busy`) keeps
        its place and its adapter is loaded in the background, so it never stalls the rows
        decoding (an idle engine loads it when pinning: nobody would be stalled); one whose
        adapter does not fit the device budget beside this pass's others keeps its place too.

        Admitted and failed requests are taken off `waiting`; every other keeps its place.
        """
        admit: list[Admission[R]] = []
        failed: list[tuple[R, EngineError]] = []
        skipped: list[R] = []
        load: dict[AdapterKey, None] = {}
        new_keys: set[AdapterKey] = set()
        tenant_load = collections.Counter(r.tenant for r in running)
        paged = self.settings.paged
        while waiting and len(admit) < free_rows:
            request = waiting.pop_fair(tenant_load)
            if request is None:
                break
            if request.cancelled:
                failed.append((request, cancelled_error()))
                continue
            need = blocks_for(request.context_len + 1) if paged else 0
            if paged and need > free_blocks:
                skipped.append(request)
                break
            key: AdapterKey | None = None
            if request.wants_adapter:
                try:
                    key = adapters.key_of(request)
                except EngineError as exc:
                    failed.append((request, exc))
                    continue
                load_error = adapters.take_error(key)
                if load_error is not None:
                    failed.append((request, load_error))
                    continue
                if not adapters.can_ever_fit(key):
                    failed.append((request, crowded_out(key)))
                    continue
                if not adapters.ready(key) and busy:
                    load[key] = None
                    skipped.append(request)
                    continue
                if key not in new_keys and not adapters.fits(new_keys | {key}):
                    skipped.append(request)
                    continue
                new_keys.add(key)
            free_blocks -= need
            admit.append(Admission(request, key, need))
            tenant_load[request.tenant] += 1
        # Requests whose adapter did not fit (or is loading) keep their place at the head.
        waiting.push_front(skipped)
        return AdmissionPlan(tuple(admit), tuple(failed), tuple(load))

    def prefetch_candidates(self, waiting: FairQueue[R], limit: int) -> list[R]:
        """The queued requests likely to be admitted next (up to `limit`, the tenants' heads
        round-robin) that run on an adapter: the scheduler warms those adapters in host
        memory ahead of admission."""
        return [r for r in waiting.heads(limit) if r.wants_adapter]

    def plan_growth(self, running: Iterable[R], free_blocks: int) -> GrowthPlan[R]:
        """Gives every decoding request the block its next token needs, preempting the most
        recently admitted when the pool runs out (paged KV; nothing otherwise)."""
        if not self.settings.paged:
            return GrowthPlan((), ())
        decoding = [r for r in running if r.decoding]
        if all(blocks_for(r.prefilled + 1) <= len(r.blocks) for r in decoding):
            return GrowthPlan((), ())  # most steps: a block holds BLOCK_SIZE tokens
        decoding.sort(key=lambda r: r.admitted)
        needed = [blocks_for(r.prefilled + 1) for r in decoding]
        held = [len(r.blocks) for r in decoding]
        preempted = plan_growth(held, needed, free_blocks)
        gone = set(preempted)
        grow = tuple(
            (r, need - have)
            for i, (r, need, have) in enumerate(zip(decoding, needed, held, strict=True))
            if i not in gone and need > have
        )
        return GrowthPlan(tuple(decoding[i] for i in preempted), grow)

    def plan_prefill(self, running: Iterable[R]) -> StepPlan | None:
        """The next context chunk of every request still reading it, under the token budget
        (`max_batch_tokens` minus one per decoding row, but at least MIN_PREFILL_CHUNK), in
        row order; None when nobody reads."""
        running = list(running)
        reading = [r for r in running if r.reading]
        if not reading:
            return None
        decoding = sum(1 for r in running if r.decoding)
        budget = max(self.settings.max_batch_tokens - decoding, MIN_PREFILL_CHUNK)
        rows: list[RowPlan] = []
        for request in reading:
            if budget <= 0:
                break
            take = min(request.context_len - request.prefilled, budget)
            chunk = request.context_ids(request.prefilled, request.prefilled + take)
            rows.append(row_plan(request, chunk, request.prefilled))
            budget -= take
        return StepPlan("prefill", tuple(rows))

    def plan_decode(self, running: Iterable[R], fed_from: Sequence[R] = ()) -> StepPlan | None:
        """One token for every decoding request, in row order; None when nobody decodes.

        `fed_from`: the rows of a decode step launched but not read yet (async_decode); a
        request among them takes its token from that step's output (RowPlan.feed), since
        `last_token` does not hold it yet.
        """
        decoding = sorted((r for r in running if r.decoding), key=lambda r: r.row)
        if not decoding:
            return None
        feeds = {id(r): i for i, r in enumerate(fed_from)}
        rows = tuple(
            row_plan(r, (r.last_token,), r.prefilled, feeds.get(id(r), -1)) for r in decoding
        )
        return StepPlan("decode", rows)


def row_plan(request: PlannedRequest, tokens: Sequence[int], start: int, feed: int = -1) -> RowPlan:
    return RowPlan(
        slot=request.row,
        tokens=tuple(tokens),
        start=start,
        blocks=tuple(request.blocks),
        pages=request.pages,
        feed=feed,
    )
