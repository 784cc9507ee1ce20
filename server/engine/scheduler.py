"""Owns the waiting queue and the running batch; runs on the engine thread.

Requests submitted from any thread wait in a bounded FIFO queue. When the engine is idle it
admits up to max_batch_size of them together, whatever their tenants and adapters (as long as
their distinct adapters fit the device slots), prefills them in one forward pass and decodes them
together, one token per row per step. Finished or cancelled rows leave the batch at the next step
and free their KV memory and adapter pins.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from server.engine import runner
from server.engine.accounting import EngineObserver, step_stats
from server.engine.detokenize import TextState
from server.engine.model import LoadedModel
from server.engine.sampling import make_generator, select_next_tokens
from server.engine.slots import AdapterResolver, SlotTable
from server.engine.types import (
    AdapterKey,
    EngineError,
    ErrorEvent,
    ErrorKind,
    EventSink,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    TokenEvent,
    Usage,
)

log = logging.getLogger(__name__)


class RequestHandle:
    """The caller's side of a submitted request: lets it cancel (client gone, deadline)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass
class Sequence:
    """One request while it runs."""

    request: GenerationRequest
    sink: EventSink
    handle: RequestHandle
    text: TextState
    generator: torch.Generator | None
    max_new_tokens: int
    key: AdapterKey | None = None
    """The adapter version this request runs on, fixed at admission."""
    slot: int = 0
    rank: int = 0
    generated: list[int] = field(default_factory=list)
    prefill_start: float = 0.0
    first_token_time: float = 0.0
    last_token_time: float = 0.0
    compute_seconds: float = 0.0
    """This request's attributed share of every step it was part of."""
    done: bool = False


@dataclass(frozen=True)
class SchedulerSettings:
    """The scheduler's bounds and pricing (taken from ServerConfig)."""

    max_batch_size: int
    max_waiting_requests: int
    price_per_device_hour: float = 0.0
    """Prices each request's attributed compute seconds for Usage.cost."""


class Scheduler:
    """Continuous loop: admit a batch, prefill it, decode it to completion, repeat."""

    def __init__(
        self,
        loaded: LoadedModel,
        slots: SlotTable,
        resolver: AdapterResolver,
        limits: SchedulerSettings,
        observer: EngineObserver | None = None,
    ) -> None:
        self._loaded = loaded
        self._slots = slots
        self._resolver = resolver
        self._limits = limits
        self._observer = observer or EngineObserver()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._collect_requested = False
        self.running: list[Sequence] = []
        self.steps = 0
        """Forward passes run so far (prefills and decode steps): tests use it to see batching."""
        self.batch_sizes: list[int] = []
        """Rows in each prefill, most recent last (bounded): tests use it to see batching."""

    # ---- any thread -------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, sink: EventSink) -> RequestHandle:
        """Queues a request; raises EngineError when the queue is full or the engine stops."""
        handle = RequestHandle(request.request_id)
        context_room = self._loaded.max_context - len(request.prompt_ids)
        seq = Sequence(
            request=request,
            sink=sink,
            handle=handle,
            text=TextState(self._loaded.tokenizer, request.sampling.stop),
            generator=make_generator(request.sampling),
            max_new_tokens=min(request.sampling.max_new_tokens, context_room),
        )
        with self._cond:
            if self._stopping:
                raise EngineError(ErrorKind.UNAVAILABLE, "the server is shutting down")
            if len(self._waiting) >= self._limits.max_waiting_requests:
                raise EngineError(
                    ErrorKind.RESOURCE_EXHAUSTED,
                    f"the waiting queue is full ({self._limits.max_waiting_requests} requests); "
                    "retry later",
                )
            self._waiting.append(seq)
            self._cond.notify()
        return handle

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def waiting_count(self) -> int:
        with self._cond:
            return len(self._waiting)

    # ---- engine thread ----------------------------------------------------------------------

    def run_forever(self) -> None:
        """The engine thread's body; returns after stop() once the queue is drained."""
        while True:
            with self._cond:
                while not self._waiting and not self._stopping and not self._collect_requested:
                    # Wake once a second while idle so adapter residency keeps being accounted.
                    if not self._cond.wait(timeout=1.0):
                        self._slots.tick()
                if self._stopping and not self._waiting:
                    return
                self._collect_requested = False
            try:
                self._slots.collect()
                batch = self._admit()
                if batch:
                    self._run_batch(batch)
            except Exception:
                # _run_batch fails its own requests; this only guards the loop itself, so one
                # unexpected error can never stop the engine thread and hang every caller.
                log.exception("engine loop iteration failed; continuing")

    def request_collect(self) -> None:
        """Wakes an idle engine so it frees doomed adapter slots now (after a delete)."""
        with self._cond:
            self._collect_requested = True
            self._cond.notify()

    def _admit(self) -> list[Sequence]:
        """Takes queued requests in arrival order while their distinct adapters fit the slots."""
        chosen: list[Sequence] = []
        keys: set[AdapterKey] = set()
        skipped: list[Sequence] = []
        failed: list[tuple[Sequence, EngineError]] = []
        with self._cond:
            while self._waiting and len(chosen) < self._limits.max_batch_size:
                seq = self._waiting.popleft()
                if seq.handle.cancelled:
                    cancelled = EngineError(ErrorKind.CANCELLED, "the request was cancelled")
                    failed.append((seq, cancelled))
                    continue
                ref = seq.request.adapter
                if ref is not None:
                    try:
                        seq.key = self._resolver(ref)
                    except EngineError as exc:
                        failed.append((seq, exc))
                        continue
                    if seq.key not in keys and not self._slots.fits(keys | {seq.key}):
                        skipped.append(seq)
                        continue
                    keys.add(seq.key)
                chosen.append(seq)
            # Requests whose adapter did not fit keep their place at the head of the queue.
            self._waiting.extendleft(reversed(skipped))
        for seq, exc in failed:
            seq.sink(ErrorEvent(exc))
        admitted: list[Sequence] = []
        for seq in chosen:
            try:
                if seq.key is not None:
                    seq.slot = self._slots.acquire(seq.key)
                    seq.rank = self._slots.rank_of(seq.slot)
            except EngineError as exc:
                seq.sink(ErrorEvent(exc))
                continue
            except Exception as exc:
                log.exception("loading adapter for request %s failed", seq.request.request_id)
                seq.sink(ErrorEvent(EngineError(ErrorKind.INTERNAL, f"adapter load failed: {exc}")))
                continue
            admitted.append(seq)
        return admitted

    def _run_batch(self, batch: list[Sequence]) -> None:
        self.running = batch
        self.batch_sizes = [*self.batch_sizes[-99:], len(batch)]
        try:
            started = time.monotonic()
            for seq in batch:
                seq.prefill_start = started
            tensors, logits = runner.prefill(
                self._loaded,
                [s.request.prompt_ids for s in batch],
                [s.slot for s in batch],
                [s.rank for s in batch],
            )
            kind, step_tokens = "prefill", [len(s.request.prompt_ids) for s in batch]
            while True:
                tokens = select_next_tokens(
                    logits, [s.request.sampling for s in batch], [s.generator for s in batch]
                )
                self._account(kind, time.monotonic() - started, batch, step_tokens)
                keep = self._advance(batch, tokens)
                if not keep:
                    break
                if len(keep) < len(batch):
                    batch = [batch[i] for i in keep]
                    self.running = batch
                    runner.keep_rows(tensors, keep, [s.rank for s in batch])
                started = time.monotonic()
                logits = runner.decode_one_token(
                    self._loaded, tensors, [s.generated[-1] for s in batch]
                )
                kind, step_tokens = "decode", [1] * len(batch)
        except Exception as exc:
            # A failed step fails only this batch's requests; the engine keeps serving.
            log.exception("engine step failed; failing %d requests", len(batch))
            for seq in batch:
                message = f"engine step failed (request {seq.request.request_id}): {exc}"
                self._retire(seq, ErrorEvent(EngineError(ErrorKind.INTERNAL, message)))
        finally:
            self.running = []

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
        self._slots.tick()

    def _advance(self, batch: list[Sequence], tokens: list[int]) -> list[int]:
        """Appends each row's token, emits events, retires finished rows; returns rows kept."""
        now = time.monotonic()
        live: list[tuple[int, Sequence, int]] = []
        produced: dict[str, int] = {}
        for row, (seq, token) in enumerate(zip(batch, tokens, strict=True)):
            if seq.handle.cancelled:
                cancelled = EngineError(ErrorKind.CANCELLED, "the request was cancelled")
                self._retire(seq, ErrorEvent(cancelled))
                continue
            if not seq.generated:
                seq.first_token_time = now
            else:
                self._observer.on_token_gap(seq.request.tenant, now - seq.last_token_time)
            seq.last_token_time = now
            seq.generated.append(token)
            produced[seq.request.tenant] = produced.get(seq.request.tenant, 0) + 1
            live.append((row, seq, token))
        # Counted before any response goes out, so metrics never lag what clients saw.
        self._observer.on_generated(produced)
        keep: list[int] = []
        eos_ids = self._loaded.eos_token_ids
        for row, seq, token in live:
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
                seq.sink(TokenEvent(token_ids=(token,), text=delta, adapter_version=version))
                keep.append(row)
            else:
                self._retire(seq, self._finish_event(seq, reason, delta, now))
        return keep

    def _finish_event(
        self, seq: Sequence, reason: FinishReason, delta: str, now: float
    ) -> FinishEvent:
        arrival = seq.request.arrival_time
        usage = Usage(
            prompt_tokens=len(seq.request.prompt_ids),
            completion_tokens=len(seq.generated),
            queue_seconds=seq.prefill_start - arrival,
            time_to_first_token_seconds=seq.first_token_time - arrival,
            total_seconds=now - arrival,
            compute_seconds=seq.compute_seconds,
            cost=seq.compute_seconds * self._limits.price_per_device_hour / 3600.0,
        )
        return FinishEvent(
            text=seq.text.text,
            token_ids=tuple(seq.generated),
            finish_reason=reason,
            usage=usage,
            text_delta=delta + seq.text.flush(),
            new_token_ids=(seq.generated[-1],),
            adapter_version=seq.key.version if seq.key else 0,
        )

    def _retire(self, seq: Sequence, event: FinishEvent | ErrorEvent) -> None:
        if seq.done:
            return
        seq.done = True
        if seq.key is not None and seq.slot:
            self._slots.release(seq.key)
            seq.slot = 0
        seq.sink(event)
