"""Continuous (iteration-level) batching; owns the waiting queue and the running rows.

Runs on the engine thread. Each iteration:

1. admits queued requests into free KV rows, fairly across tenants (each free row goes to the
   tenant with the fewest running requests), while their distinct adapters fit the device
   adapter budget (the adapters are pinned for as long as the request runs), and prefetches
   the adapters of the next queued requests into host memory;
2. runs one prefill forward over the prompts still being read, in chunks under a token budget
   (`max_batch_tokens` minus the rows decoding), so a long prompt never stalls everyone's
   decoding; a request whose prompt is complete gets its first token;
3. runs one decode forward over every decoding row, whatever its tenant or adapter.

A request that finishes, is cancelled or times out leaves at the next step and frees its
slot, KV blocks and adapter pin; a request that arrives while others decode joins at the next
iteration. Every decision (limits at submission, admission, preemption, prefill chunks, the
rows of each forward) is made by server.engine.planner.Planner from the request states, as plain
data; this loop feeds it, applies its plans (pins adapters, allocates blocks, assigns rows) and
hands each StepPlan to the executor (server.engine.executor), which owns the model, KV memory,
static buffers and graphs.
With paged KV (the own Llama-family forward) a request holds only the blocks its tokens fill,
admission counts free blocks, and a request that cannot grow is preempted: its blocks and pin
are freed and it is requeued at the head, to recompute its prompt and tokens so far when
readmitted (its caller sees nothing but a pause).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from loraserve.server.engine.accounting import EngineObserver, step_stats
from loraserve.server.engine.detokenize import TextState
from loraserve.server.engine.device_pool import AdapterResolver, DevicePool
from loraserve.server.engine.executor import ExecutorSettings, make_executor
from loraserve.server.engine.fair_queue import FairQueue
from loraserve.server.engine.logprobs import PositionScoring, prompt_targets, token_logprobs
from loraserve.server.engine.model import LoadedModel
from loraserve.server.engine.planner import (
    Planner,
    PlannerSettings,
    StepPlan,
    cancelled_error,
)
from loraserve.server.engine.sampling import (
    SamplingFault,
    make_generator,
    read_tokens,
    sample_tokens,
    select_next_tokens,
)
from loraserve.server.engine.types import (
    AdapterKey,
    EngineError,
    ErrorEvent,
    ErrorKind,
    EventSink,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    TokenEvent,
    TokenLogprob,
    Usage,
)
from loraserve.server.engine.usage import AdapterUsageLedger
from loraserve.server.limits import LimitsLookup, TenantLimitTable

log = logging.getLogger(__name__)


class RequestHandle:
    """The caller's side of a submitted request: lets it cancel (client gone, deadline)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        # A plain flag: nobody waits on it, the engine reads it once a step, and one attribute
        # store is atomic; a threading.Event would build a Condition and a Lock per request.
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled


@dataclass
class Sequence:
    """One request while it waits or runs."""

    request: GenerationRequest
    sink: EventSink
    handle: RequestHandle
    text: TextState
    generator: torch.Generator | None
    max_new_tokens: int
    key: AdapterKey | None = None
    """The adapter version this request runs on, fixed at admission."""
    pages: tuple[int, ...] = ()
    """Its adapter's device pages while pinned (empty for the base model)."""
    row: int = -1
    """Its batch slot while admitted."""
    prefilled: int = 0
    """Tokens already in the KV cache (prompt, then generated ones as decoding feeds them)."""
    blocks: list[int] = field(default_factory=list)
    """Its KV blocks while admitted (paged KV only)."""
    admitted: int = 0
    """Admission counter: the most recently admitted are preempted first."""
    generated: list[int] = field(default_factory=list)
    prefill_start: float = 0.0
    first_token_time: float = 0.0
    last_token_time: float = 0.0
    compute_seconds: float = 0.0
    """This request's attributed share of every step it was part of."""
    done: bool = False
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """With LogprobOptions.logprobs: one entry per generated token."""
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    """With LogprobOptions.prompt_logprobs: prompt tokens 1.. scored so far (chunk by chunk)."""
    events_sent: int = 0
    """Events emitted so far (prompt_logprobs ride on the first)."""
    prompt_len: int = field(init=False)
    """len(request.prompt_ids), kept: the step's planning reads it several times per row."""

    def __post_init__(self) -> None:
        self.prompt_len = len(self.request.prompt_ids)

    @property
    def tenant(self) -> str:
        return self.request.tenant

    @property
    def arrival(self) -> float:
        return self.request.arrival_time

    @property
    def cost_tokens(self) -> int:
        """Tokens this request may occupy: its prompt plus the completion it may generate."""
        return self.prompt_len + self.max_new_tokens

    @property
    def context_len(self) -> int:
        """Tokens that must be in the KV cache before the next decode: the prompt and every
        generated token but the last (which the next decode step feeds)."""
        return self.prompt_len + max(len(self.generated) - 1, 0)

    def context_ids(self, start: int, end: int) -> list[int]:
        ids = self.request.prompt_ids
        if end <= len(ids):
            return ids[start:end]
        return (ids + self.generated)[start:end]

    @property
    def cancelled(self) -> bool:
        return self.handle.cancelled

    @property
    def wants_adapter(self) -> bool:
        return self.request.adapter is not None

    @property
    def last_token(self) -> int:
        return self.generated[-1]

    @property
    def reading(self) -> bool:
        """Still (re)reading its context: a new prompt, or a preempted request resuming."""
        return not self.done and self.prefilled < self.context_len

    @property
    def decoding(self) -> bool:
        return not self.done and bool(self.generated) and not self.reading

    def prompt_scoring(self, take: int) -> PositionScoring | None:
        """What prompt_logprobs wants from this request's next `take` fed tokens, or None.

        Chunk by chunk, each chunk scores the prompt tokens its positions predict; a request
        re-reading its context after preemption has them all already and asks for nothing.
        """
        options = self.request.logprobs
        if not options.prompt_logprobs or self.prefilled != len(self.prompt_logprobs):
            return None
        targets = prompt_targets(self.request.prompt_ids, self.prefilled, take)
        return PositionScoring(tuple(targets), options.top_logprobs) if targets else None


@dataclass
class LaunchedDecode:
    """A decode step queued on the device whose tokens the host has not read yet (async_decode):
    the next step is launched first, its rows fed from `codes` on the device."""

    batch: list[Sequence]
    """The step's requests, in its row order."""
    codes: torch.Tensor
    """(batch,) int64: each row's token or a negative fault code (sampling.read_tokens); on the
    host, copied there asynchronously when the step ran on a GPU."""
    copied: torch.cuda.Event | None
    """Recorded after that copy (CUDA); None when `codes` is readable now."""
    started: float


@dataclass(frozen=True)
class SchedulerSettings:
    """The scheduler's bounds and pricing (taken from EngineConfig)."""

    max_batch_size: int
    """KV rows: requests running at once."""
    max_waiting_requests: int
    max_batch_tokens: int = 2048
    """Tokens per iteration (prefill chunks plus one per decoding row)."""
    max_seq_len: int = 2048
    """Tokens per KV row (prompt plus completion)."""
    price_per_device_hour: float = 0.0
    """Prices each request's attributed compute seconds for Usage.cost."""
    kv_cache_bytes: int = 0
    """Paged KV pool size (0: from kv_cache_fraction on CUDA, full rows on CPU)."""
    kv_cache_fraction: float = 0.5
    enforce_eager: bool = False
    """No CUDA graphs, decode or prefill."""
    prefill_graph_tokens: int = 2048
    """Largest padded prefill replayed from a CUDA graph (EngineConfig.prefill_graph_tokens)."""
    attention: str = "sdpa"
    """Decode attention of the own forward (EngineConfig.attention)."""
    lora_overlap: bool = False
    """EngineConfig.lora_overlap: adapter shrinks on a side stream beside the base matmuls."""
    max_lora_rank: int = 64
    async_decode: bool = True
    """EngineConfig.async_decode: launch step N+1 before reading step N's tokens."""
    cold_join_hold_seconds: float = 0.02
    """EngineConfig.cold_join_hold_seconds: how long requests whose adapters finished loading
    in the background may wait for other queued requests' loads still in flight, so that they
    join the running batch in one prefill instead of one each."""


PREFETCH_AHEAD = 8
"""Queued requests whose adapters are prefetched into host memory ahead of admission."""


class Scheduler:
    """The engine loop: admit, prefill a chunk, decode a step, repeat."""

    def __init__(
        self,
        loaded: LoadedModel,
        pool: DevicePool,
        resolver: AdapterResolver,
        settings: SchedulerSettings,
        observer: EngineObserver | None = None,
        prefetch: Callable[[AdapterKey], None] | None = None,
        usage: AdapterUsageLedger | None = None,
        limits: LimitsLookup | None = None,
    ) -> None:
        self._loaded = loaded
        self._usage = usage
        self._limits = limits or TenantLimitTable()
        """Per-tenant max_requests / max_queued_tokens, looked up at each submission."""
        self._pool = pool
        self._prefetch = prefetch
        self._resolver = resolver
        self._settings = settings
        self._observer = observer or EngineObserver()
        self.executor = make_executor(
            loaded,
            ExecutorSettings(
                max_batch_size=settings.max_batch_size,
                max_seq_len=settings.max_seq_len,
                max_batch_tokens=settings.max_batch_tokens,
                kv_cache_bytes=settings.kv_cache_bytes,
                kv_cache_fraction=settings.kv_cache_fraction,
                enforce_eager=settings.enforce_eager,
                prefill_graph_tokens=settings.prefill_graph_tokens,
                attention=settings.attention,
                lora_overlap=settings.lora_overlap,
                max_pages_per_row=pool.pages_for(settings.max_lora_rank),
                adapter_pages=pool.num_pages,
                page_rank=pool.page_rank,
            ),
        )
        self._blocks = self.executor.allocator
        """The paged KV block pool (None on the generic path: one KV row per slot)."""
        self.planner = Planner(
            PlannerSettings(
                max_batch_tokens=settings.max_batch_tokens,
                max_waiting_requests=settings.max_waiting_requests,
                paged=self._blocks is not None,
            )
        )
        """Decides who runs, with which blocks and pages; this loop applies its plans."""
        self._adapters = _PoolReadiness(self)
        self._awaited: dict[AdapterKey, None] = {}
        """Adapters loading in the background for queued requests (plan.load), until one of
        those requests is admitted: their requests are the ones a join hold may keep waiting."""
        self._held_since: float | None = None
        """When the current join hold began (None: no request is being held)."""
        self.held_joins = 0
        """Admission passes that kept a loaded request waiting for other loads (tests)."""
        self._admissions = 0
        self.decode_seconds = 0.0
        """Wall seconds spent in decode steps (forward and sampling), for throughput figures."""
        self.decode_tokens = 0
        """Tokens those decode steps generated."""
        self.decode_steps = 0
        self._ahead = settings.async_decode and self.executor.feeds_tokens
        """Launch each decode step before reading the previous one's tokens."""
        self._launched: LaunchedDecode | None = None
        """The decode step launched and not read yet (with _ahead)."""
        self._last_read = 0.0
        """When the last launched step was read: the next one's time starts no earlier."""
        self.launched_ahead = 0
        """Decode steps launched before the previous step's tokens were read."""
        self.prefill_seconds = 0.0
        """Wall seconds spent in prefill steps (forward and sampling)."""
        self.prefill_steps = 0
        self.preemptions = 0
        """Requests preempted so far (their KV could not grow)."""
        self._rows: list[Sequence | None] = [None] * settings.max_batch_size
        self._waiting: FairQueue[Sequence] = FairQueue()
        self._in_flight: collections.Counter[str] = collections.Counter()
        """Waiting plus running requests per tenant (guarded by _cond)."""
        self._cond = threading.Condition()
        self._stopping = False
        self._collect_requested = False
        self._tasks: collections.deque[tuple[Callable[[], object], Future[object]]] = (
            collections.deque()
        )
        """Work other threads hand the engine thread (guarded by _cond): see run_on_engine."""
        self.steps = 0
        """Forward passes run so far (prefills and decode steps)."""
        self.prefill_sizes: list[int] = []
        """Rows in each prefill forward, most recent last (bounded): tests read batching here."""
        self.decode_sizes: list[int] = []
        """Requests in each decode forward, most recent last (bounded)."""

    @property
    def running(self) -> list[Sequence]:
        """Admitted requests (prefilling or decoding)."""
        return [s for s in self._rows if s is not None]

    # ---- any thread -------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, sink: EventSink) -> RequestHandle:
        """Queues a request; raises EngineError when the queue is full or the engine stops."""
        handle = RequestHandle(request.request_id)
        room = self._settings.max_seq_len - len(request.prompt_ids)
        if room < 1:
            raise EngineError(
                ErrorKind.INVALID_ARGUMENT,
                f"prompt: {len(request.prompt_ids)} tokens leave no room in the "
                f"{self._settings.max_seq_len}-token context",
            )
        seq = Sequence(
            request=request,
            sink=sink,
            handle=handle,
            text=TextState(self._loaded.tokenizer, request.sampling.stop),
            generator=make_generator(request.sampling),
            max_new_tokens=min(request.sampling.max_new_tokens, room),
        )
        with self._cond:
            if self._stopping:
                raise EngineError(ErrorKind.UNAVAILABLE, "the server is shutting down")
            self._check_limits(seq)
            self._waiting.append(seq)
            self._in_flight[seq.tenant] += 1
            self._cond.notify()
        return handle

    def _check_limits(self, seq: Sequence) -> None:
        """RESOURCE_EXHAUSTED, naming the limit, when admitting `seq` would exceed one."""
        refusal = self.planner.submit_refusal(
            seq,
            waiting=len(self._waiting),
            in_flight=self._in_flight[seq.tenant],
            queued_tokens=self._waiting.tokens(seq.tenant),
            limits=self._limits(seq.tenant),
        )
        if refusal is not None:
            raise refusal

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def waiting_count(self) -> int:
        with self._cond:
            return len(self._waiting)

    def run_on_engine(self, work: Callable[[], object]) -> Future[object]:
        """Runs `work` on the engine thread between two steps (device page writes must happen
        there); the future holds its result or exception. UNAVAILABLE once stopping."""
        future: Future[object] = Future()
        with self._cond:
            if self._stopping:
                raise EngineError(ErrorKind.UNAVAILABLE, "the server is shutting down")
            self._tasks.append((work, future))
            self._cond.notify()
        return future

    def _run_tasks(self) -> None:
        with self._cond:
            tasks, self._tasks = list(self._tasks), collections.deque()
        for work, future in tasks:
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(work())
            except BaseException as exc:
                future.set_exception(exc)

    def request_collect(self) -> None:
        """Wakes an idle engine so it frees a deleted adapter's device pages now."""
        with self._cond:
            self._collect_requested = True
            self._cond.notify()

    # ---- engine thread ----------------------------------------------------------------------

    def run_forever(self) -> None:
        """The engine thread's body; returns after stop() once nothing waits or runs."""
        while True:
            with self._cond:
                while (
                    not self._waiting
                    and not self.running
                    and self._launched is None
                    and not self._stopping
                    and not self._collect_requested
                    and not self._tasks
                ):
                    # Wake once a second while idle so adapter residency keeps being accounted.
                    if not self._cond.wait(timeout=1.0):
                        self._pool.tick()
                if self._stopping and not self._waiting and not self.running:
                    for _, future in self._tasks:
                        if future.set_running_or_notify_cancel():
                            future.set_exception(
                                EngineError(ErrorKind.UNAVAILABLE, "the server is shutting down")
                            )
                    return
                self._collect_requested = False
            try:
                self.iterate()
            except Exception:
                # Steps fail their own requests; this only guards the loop itself, so one
                # unexpected error can never stop the engine thread and hang every caller.
                log.exception("engine loop iteration failed; continuing")

    def iterate(self) -> None:
        """One scheduling iteration: admit, prefill a chunk, decode one step."""
        self._pool.collect()
        self._run_tasks()
        self._admit()
        self._prefetch_waiting(PREFETCH_AHEAD)
        self._prefill_step()
        self._decode_step()

    def _admit(self) -> None:
        """Moves queued requests into free rows as the planner decides, pinning their adapters
        and allocating their KV blocks.

        Join hold: while rows decode, a request whose adapter has just finished loading in the
        background waits (keeping its place) as long as other queued requests' loads are still
        in flight, up to cold_join_hold_seconds, so that the joiners share one prefill instead
        of each stalling the running rows with its own. Whenever a prefill runs anyway (another
        request is admitted), the held requests are admitted with it.
        """
        holding = self._join_hold()
        admitted, held = self._admit_pass(holding)
        if held and admitted:
            self._admit_pass(frozenset())  # a prefill runs anyway: the held requests join it
            held = False
        if held:
            self.held_joins += 1
            if self._held_since is None:
                self._held_since = time.monotonic()
        else:
            self._held_since = None

    def _join_hold(self) -> frozenset[AdapterKey]:
        """The loaded adapters whose requests wait this pass (empty: nobody waits)."""
        hold = self._settings.cold_join_hold_seconds
        if hold <= 0 or not self._awaited:  # most iterations: no lock taken
            return frozenset()
        with self._cond:
            if not self._waiting:
                self._awaited.clear()  # nobody queued: no load to wait for
                return frozenset()
        if not any(s is not None for s in self._rows):  # idle: nobody to stall
            return frozenset()
        if self._held_since is not None and time.monotonic() - self._held_since >= hold:
            return frozenset()
        loading = [k for k in self._awaited if self._pool.loading(k)]
        if not loading:
            return frozenset()
        return frozenset(k for k in self._awaited if k not in loading)

    def _admit_pass(self, holding: frozenset[AdapterKey]) -> tuple[int, bool]:
        """One admission pass; keys in `holding` count as not loaded yet. Returns how many
        requests were admitted and whether a loaded request was kept waiting."""
        free_rows = [i for i, s in enumerate(self._rows) if s is None]
        if not free_rows:
            return 0, False
        adapters = self._adapters if not holding else _HoldingReadiness(self._adapters, holding)
        with self._cond:
            plan = self.planner.plan_admission(
                self._waiting,
                self.running,
                free_rows=len(free_rows),
                busy=len(free_rows) < len(self._rows),  # rows are decoding
                free_blocks=self._blocks.free_count if self._blocks is not None else 0,
                adapters=adapters,
            )
        for key in plan.load:
            self._awaited[key] = None
            self._pool.request(key)
        for seq, exc in plan.failed:
            self._retire(seq, ErrorEvent(exc))
        now = time.monotonic()
        for admission in plan.admit:
            seq = admission.request
            try:
                if admission.key is not None:
                    seq.pages = self._pool.acquire(admission.key).pages
            except EngineError as exc:
                self._retire(seq, ErrorEvent(exc))
                continue
            except Exception as exc:
                log.exception("loading adapter for request %s failed", seq.request.request_id)
                error = EngineError(ErrorKind.INTERNAL, f"adapter load failed: {exc}")
                self._retire(seq, ErrorEvent(error))
                continue
            if self._blocks is not None:
                blocks = self._blocks.allocate(admission.blocks)
                assert blocks is not None, "the planner counted free blocks"
                seq.blocks = blocks
            seq.row = free_rows.pop(0)
            if not seq.prefill_start:
                seq.prefill_start = now
            self._admissions += 1
            seq.admitted = self._admissions
            self._rows[seq.row] = seq
            if admission.key is not None:
                self._awaited.pop(admission.key, None)
        held = isinstance(adapters, _HoldingReadiness) and adapters.held
        return len(plan.admit), held

    def _prefill_step(self) -> None:
        """Feeds the next prompt chunk of every request still reading its prompt."""
        self._drop_cancelled()
        plan = self.planner.plan_prefill(self.running)
        if plan is None:
            return
        inputs = plan.rows
        batch = self._batch_of(plan)
        scoring: dict[int, PositionScoring] = {}
        for i, (seq, row) in enumerate(zip(batch, inputs, strict=True)):
            wanted = seq.prompt_scoring(len(row.tokens))
            if wanted is not None:
                scoring[i] = wanted
        self.prefill_sizes = [*self.prefill_sizes[-99:], len(batch)]
        started = time.monotonic()
        try:
            if scoring:
                logits, scored = self.executor.execute_scored(plan, scoring)  # (batch, vocab)
                for i, entries in scored.items():
                    batch[i].prompt_logprobs.extend(entries)
            else:
                logits = self.executor.execute(plan)  # (batch, vocab)
            for seq, row_input in zip(batch, inputs, strict=True):
                seq.prefilled += len(row_input.tokens)
            # A resumed (preempted) request already has its next token: it only re-reads.
            complete = [i for i, s in enumerate(batch) if not s.reading and not s.generated]
            sampled, tokens, entries = self._sample(logits, [batch[i] for i in complete], complete)
        except Exception as exc:
            self._fail_step(batch, exc)
            return
        elapsed = time.monotonic() - started
        self.prefill_seconds += elapsed
        self.prefill_steps += 1
        self._account("prefill", elapsed, batch, [len(r.tokens) for r in inputs])
        self._advance(sampled, tokens, entries)

    def _decode_step(self) -> None:
        """One token for every decoding request, in one forward over rows 0..highest.

        With async_decode the step is launched before the previous step's tokens are read:
        rows continuing from that step take their token from its output on the device, and
        the host reads and emits the previous step's tokens while the device computes this
        one. A row that finished at the previous step (end of sequence, a stop sequence) was
        computed once more in vain; its result is dropped.
        """
        self._drop_cancelled()
        if self._launched is not None and not self._may_launch_ahead():
            self._read_launched()
        self._grow_blocks()
        fed_from = self._launched.batch if self._launched is not None else ()
        plan = self.planner.plan_decode(self._continuing(), fed_from)
        if plan is None:
            self._read_launched()
            return
        decoding = self._batch_of(plan)
        self.decode_sizes = [*self.decode_sizes[-99:], len(decoding)]
        started = time.monotonic()
        ahead = self._launched is not None or self._may_launch_ahead()
        try:
            logits = self.executor.execute(plan)  # (batch, vocab)
            for seq in decoding:
                seq.prefilled += 1
            if ahead:
                launched = self._launch_sampling(logits, decoding, started)
                self.launched_ahead += 1
            else:
                sampled, tokens, entries = self._sample(
                    logits, decoding, list(range(len(decoding)))
                )
        except Exception as exc:
            self._read_launched()
            self._fail_step([s for s in decoding if not s.done], exc)
            return
        if ahead:
            # The device computes this step while the host reads and emits the previous one.
            self._read_launched()
            self._launched = launched
            return
        elapsed = time.monotonic() - started
        self._count_decode(elapsed, decoding)
        self._advance(sampled, tokens, entries)

    def _may_launch_ahead(self) -> bool:
        """Whether the next decode step may run before the previous one's tokens are read: the
        executor takes fed tokens, and no decoding row asks for logprobs (read from the
        step's logits, which the next step's graph overwrites)."""
        return self._ahead and not any(
            s.request.logprobs.logprobs and s.decoding for s in self.running
        )

    def _continuing(self) -> list[Sequence]:
        """Running requests, less those whose launched token will be their last (length)."""
        if self._launched is None:
            return self.running
        ending = {id(s) for s in self._launched.batch if len(s.generated) + 1 >= s.max_new_tokens}
        return [s for s in self.running if id(s) not in ending]

    def _launch_sampling(
        self, logits: torch.Tensor, decoding: list[Sequence], started: float
    ) -> LaunchedDecode:
        """Queues the step's sampling and the copy of its tokens to the host; reads nothing."""
        codes = sample_tokens(
            logits, [s.request.sampling for s in decoding], [s.generator for s in decoding]
        )  # (batch,) on the logits' device
        self.executor.remember_tokens(codes)
        copied: torch.cuda.Event | None = None
        if codes.is_cuda:
            codes = codes.to("cpu", non_blocking=True)  # into pinned memory, queued
            copied = torch.cuda.Event()
            copied.record()
        return LaunchedDecode(batch=decoding, codes=codes, copied=copied, started=started)

    def _read_launched(self) -> None:
        """Reads the launched step's tokens (waiting for the device if it is not done) and
        advances its requests that are still running."""
        launched, self._launched = self._launched, None
        if launched is None:
            return
        try:
            if launched.copied is not None:
                launched.copied.synchronize()
            chosen = read_tokens(launched.codes.tolist())
        except Exception as exc:
            self._fail_step([s for s in launched.batch if not s.done], exc)
            return
        now = time.monotonic()
        live = [(s, t) for s, t in zip(launched.batch, chosen, strict=True) if not s.done]
        if live:  # else every row had finished at the step before: nothing to account
            self._count_decode(now - max(launched.started, self._last_read), [s for s, _ in live])
        self._last_read = now
        sampled, tokens, _ = self._without_faults([s for s, _ in live], [t for _, t in live])
        self._advance(sampled, tokens)

    def _count_decode(self, elapsed: float, batch: list[Sequence]) -> None:
        self.decode_seconds += elapsed
        self.decode_tokens += len(batch)
        self.decode_steps += 1
        self._account("decode", elapsed, batch, [1] * len(batch))

    def _batch_of(self, plan: StepPlan) -> list[Sequence]:
        """The requests of a plan's rows, in its order."""
        batch: list[Sequence] = []
        for row in plan.rows:
            seq = self._rows[row.slot]
            assert seq is not None, "the planner planned an empty slot"
            batch.append(seq)
        return batch

    def _grow_blocks(self) -> None:
        """Gives every decoding request the blocks its next token needs, preempting as the
        planner decides when the pool runs out (paged KV only)."""
        if self._blocks is None:
            return
        growth = self.planner.plan_growth(self._continuing(), self._blocks.free_count)
        if growth.preempt and self._launched is not None:
            # A preempted request recomputes its tokens so far: read the launched ones first.
            self._read_launched()
            growth = self.planner.plan_growth(self.running, self._blocks.free_count)
        for seq in growth.preempt:
            self._preempt(seq)
        for seq, more in growth.grow:
            blocks = self._blocks.allocate(more)
            assert blocks is not None, "the planner left room"
            seq.blocks.extend(blocks)

    def _preempt(self, seq: Sequence) -> None:
        """Frees a running request's KV blocks, slot and pin and requeues it at the head."""
        log.info("preempting request %s: the KV pool is full", seq.request.request_id)
        self.preemptions += 1
        self._free_resources(seq)
        seq.prefilled = 0
        with self._cond:
            self._waiting.push_front([seq])

    def _key_of(self, seq: Sequence) -> AdapterKey:
        """The adapter version a request runs on, resolved once (at prefetch or admission)."""
        if seq.key is None:
            assert seq.request.adapter is not None
            seq.key = self._resolver(seq.request.adapter)
        return seq.key

    def _prefetch_waiting(self, limit: int) -> None:
        """Starts loading the adapters of the next queued requests into host memory, so they
        are ready (from memory, not disk) by the time those requests are admitted."""
        if self._prefetch is None:
            return
        with self._cond:
            upcoming = self.planner.prefetch_candidates(self._waiting, limit)
        for seq in upcoming:
            try:
                key = self._key_of(seq)
            except EngineError:
                continue  # admission reports it
            if self._pool.placement(key) is None:
                self._prefetch(key)

    def _sample(
        self, logits: torch.Tensor, seqs: list[Sequence], rows: list[int]
    ) -> tuple[list[Sequence], list[int], list[TokenLogprob | None]]:
        """The sequences that got a token, their tokens, and each one's logprob entry (None
        where the request did not ask); a row whose sampling fails (non-finite logits) is
        retired alone, so it cannot fail the rest of the step."""
        if not seqs:
            return [], [], []
        picked = logits[rows] if len(rows) != logits.shape[0] else logits  # (len(seqs), vocab)
        chosen = select_next_tokens(
            picked, [s.request.sampling for s in seqs], [s.generator for s in seqs]
        )
        sampled, tokens, sampled_rows = self._without_faults(seqs, chosen)
        return sampled, tokens, self._token_logprobs(picked, sampled_rows, sampled, tokens)

    def _without_faults(
        self, seqs: list[Sequence], chosen: list[int | SamplingFault]
    ) -> tuple[list[Sequence], list[int], list[int]]:
        """The sequences that got a token, their tokens and their indexes in `seqs`; a row
        whose sampling failed retires its request alone."""
        sampled: list[Sequence] = []
        tokens: list[int] = []
        rows: list[int] = []
        for row, (seq, token) in enumerate(zip(seqs, chosen, strict=True)):
            if isinstance(token, SamplingFault):
                message = f"sampling failed: {token} (request {seq.request.request_id})"
                self._retire(seq, ErrorEvent(EngineError(ErrorKind.INTERNAL, message)))
            else:
                sampled.append(seq)
                tokens.append(token)
                rows.append(row)
        return sampled, tokens, rows

    @staticmethod
    def _token_logprobs(
        picked: torch.Tensor, sampled_rows: list[int], sampled: list[Sequence], tokens: list[int]
    ) -> list[TokenLogprob | None]:
        """Logprob entries of the sampled rows that asked, in one vectorised pass over those
        rows only (none asked: no work). picked: (rows, vocab); sampled_rows: each sampled
        sequence's row in it."""
        asking = [i for i, s in enumerate(sampled) if s.request.logprobs.logprobs]
        entries: list[TokenLogprob | None] = [None] * len(sampled)
        if not asking:
            return entries
        computed = token_logprobs(
            picked[[sampled_rows[i] for i in asking]],  # (asking, vocab)
            [tokens[i] for i in asking],
            [sampled[i].request.logprobs.top_logprobs for i in asking],
            [sampled[i].request.sampling.temperature for i in asking],
        )
        for i, entry in zip(asking, computed, strict=True):
            entries[i] = entry
        return entries

    def _drop_cancelled(self) -> None:
        for seq in self.running:
            if seq.handle.cancelled:
                self._retire(seq, ErrorEvent(cancelled_error()))

    def _fail_step(self, batch: list[Sequence], exc: Exception) -> None:
        """A failed step fails only the requests in it; the engine keeps serving.

        Running out of memory (device or host) is RESOURCE_EXHAUSTED: the caller may retry;
        the allocator's cached blocks are released so the next, smaller step can fit.
        """
        if isinstance(exc, torch.OutOfMemoryError | MemoryError):
            log.error("out of memory in an engine step; failing %d requests", len(batch))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            kind, what = ErrorKind.RESOURCE_EXHAUSTED, "out of memory; retry later"
        else:
            log.error("engine step failed; failing %d requests", len(batch), exc_info=exc)
            kind, what = ErrorKind.INTERNAL, f"engine step failed: {exc}"
        for seq in batch:
            message = f"{what} (request {seq.request.request_id})"
            self._retire(seq, ErrorEvent(EngineError(kind, message)))

    def _account(self, kind: str, seconds: float, batch: list[Sequence], tokens: list[int]) -> None:
        """Splits one step's wall time across its rows (and so tenants) by token share."""
        self.steps += 1
        stats, shares = step_stats(
            kind,
            seconds,
            [s.request.tenant for s in batch],
            tokens,
            [s.key for s in batch],
        )
        for seq, share in zip(batch, shares, strict=True):
            seq.compute_seconds += share
        self._observer.on_step(stats)
        self._pool.tick()

    def _advance(
        self,
        batch: list[Sequence],
        tokens: list[int],
        entries: list[TokenLogprob | None] | None = None,
    ) -> None:
        """Appends each request's new token (and logprob entry), emits events, retires
        finished requests."""
        now = time.monotonic()
        produced: dict[str, int] = {}
        since: dict[tuple[str, float], int] = {}
        """(tenant, previous token's time) -> rows: the rows read together share their gap."""
        if entries is not None:
            for seq, entry in zip(batch, entries, strict=True):
                if entry is not None:
                    seq.logprobs.append(entry)
        for seq, token in zip(batch, tokens, strict=True):
            tenant = seq.request.tenant
            if not seq.generated:
                seq.first_token_time = now
            else:
                key = (tenant, seq.last_token_time)
                since[key] = since.get(key, 0) + 1
            seq.last_token_time = now
            seq.generated.append(token)
            produced[tenant] = produced.get(tenant, 0) + 1
        # Counted before any response goes out, so metrics never lag what clients saw.
        if since:
            gaps: dict[tuple[str, float], int] = {}
            for (tenant, last), rows in since.items():
                gap = (tenant, now - last)
                gaps[gap] = gaps.get(gap, 0) + rows
            self._observer.on_token_gaps(gaps)
        self._observer.on_generated(produced)
        eos_ids = self._loaded.eos_token_ids
        for seq, token in zip(batch, tokens, strict=True):
            delta = seq.text.update(seq.generated)
            reason: FinishReason | None = None
            if seq.text.stopped:
                reason = FinishReason.STOP
            elif token in eos_ids and not seq.request.sampling.ignore_eos:
                reason = FinishReason.EOS
            elif len(seq.generated) >= seq.max_new_tokens:
                reason = FinishReason.LENGTH
            if reason is None:
                version = seq.key.version if seq.key else 0
                event = TokenEvent(
                    token_ids=(token,),
                    text=delta,
                    adapter_version=version,
                    logprobs=tuple(seq.logprobs[-1:]) if seq.request.logprobs.logprobs else (),
                    prompt_logprobs=() if seq.events_sent else tuple(seq.prompt_logprobs),
                )
                self._emit(seq, event)
            else:
                self._retire(seq, self._finish_event(seq, reason, delta, now))

    def _finish_event(
        self, seq: Sequence, reason: FinishReason, delta: str, now: float
    ) -> FinishEvent:
        arrival = seq.request.arrival_time
        usage = Usage(
            prompt_tokens=seq.prompt_len,
            completion_tokens=len(seq.generated),
            queue_seconds=seq.prefill_start - arrival,
            time_to_first_token_seconds=seq.first_token_time - arrival,
            total_seconds=now - arrival,
            compute_seconds=seq.compute_seconds,
            cost=seq.compute_seconds * self._settings.price_per_device_hour / 3600.0,
        )
        return FinishEvent(
            text=seq.text.text,
            token_ids=tuple(seq.generated),
            finish_reason=reason,
            usage=usage,
            text_delta=delta + seq.text.flush(),
            new_token_ids=(seq.generated[-1],),
            adapter_version=seq.key.version if seq.key else 0,
            logprobs=tuple(seq.logprobs),
            new_logprobs=tuple(seq.logprobs[-1:]),
            prompt_logprobs=tuple(seq.prompt_logprobs),
        )

    def _emit(self, seq: Sequence, event: TokenEvent | FinishEvent | ErrorEvent) -> None:
        """Hands an event to the caller; a failing sink must not break the engine loop."""
        seq.events_sent += 1
        try:
            seq.sink(event)
        except Exception:
            log.exception("event sink of request %s failed", seq.request.request_id)
            seq.handle.cancel()

    def _retire(self, seq: Sequence, event: FinishEvent | ErrorEvent) -> None:
        """Frees the request's row and adapter pin, then tells the caller."""
        if seq.done:
            return
        seq.done = True
        with self._cond:
            self._in_flight[seq.tenant] -= 1
            if self._in_flight[seq.tenant] <= 0:
                del self._in_flight[seq.tenant]
        self._free_resources(seq)
        if isinstance(event, FinishEvent) and seq.key is not None and self._usage is not None:
            # Before the caller hears of it, so usage read after a response includes it.
            self._usage.record(seq.key, event.usage)
        self._emit(seq, event)

    def _free_resources(self, seq: Sequence) -> None:
        if 0 <= seq.row < len(self._rows) and self._rows[seq.row] is seq:
            self._rows[seq.row] = None
        seq.row = -1
        if self._blocks is not None and seq.blocks:
            self._blocks.free(seq.blocks)
            seq.blocks = []
        if seq.key is not None and seq.pages:
            self._pool.release(seq.key)
            seq.pages = ()


class _HoldingReadiness:
    """_PoolReadiness with some loaded adapters reported as still loading (a join hold)."""

    def __init__(self, inner: _PoolReadiness, holding: frozenset[AdapterKey]) -> None:
        self._inner = inner
        self._holding = holding
        self.held = False
        """Whether some request was kept waiting for a key in `holding`."""

    def key_of(self, request: Sequence) -> AdapterKey:
        return self._inner.key_of(request)

    def take_error(self, key: AdapterKey) -> EngineError | None:
        return self._inner.take_error(key)

    def ready(self, key: AdapterKey) -> bool:
        if key in self._holding and self._inner.ready(key):
            self.held = True
            return False
        return self._inner.ready(key)

    def fits(self, keys: set[AdapterKey]) -> bool:
        return self._inner.fits(keys)

    def can_ever_fit(self, key: AdapterKey) -> bool:
        return self._inner.can_ever_fit(key)


class _PoolReadiness:
    """The planner's view of the adapter tiers: the scheduler's resolver and DevicePool."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self._pool = scheduler._pool

    def key_of(self, request: Sequence) -> AdapterKey:
        return self._scheduler._key_of(request)

    def take_error(self, key: AdapterKey) -> EngineError | None:
        return self._pool.take_error(key)

    def ready(self, key: AdapterKey) -> bool:
        return self._pool.ready(key)

    def fits(self, keys: set[AdapterKey]) -> bool:
        return self._pool.fits(keys)

    def can_ever_fit(self, key: AdapterKey) -> bool:
        return self._pool.can_ever_fit(key)
