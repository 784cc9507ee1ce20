"""One request's engine events on their way to its RPC handler, paced into stream messages.

The engine thread appends every event (`PacedEvents.sink`); the handler on the event loop takes
them (`next`). Every stream message costs the loop a protobuf message, a gRPC write and a
wake-up, and the loop shares the GIL with the engine thread, so the loop must do work per
message, never per token:

- the first token leaves at once (time to first token is unchanged);
- after it, a stream sends at most one message per `--stream-interval-seconds`, carrying every
  token produced meanwhile. While it waits out the interval, appended tokens do not wake the
  loop at all: the handler's own timer collects them;
- a finish or an error wakes the handler at once, whatever the interval: the tokens still
  held leave with the finish in one last message (or ahead of the error), so a finished
  request is never held back.

Wake-ups go through a LoopWaker: one loop callback per engine step, however many requests the
step woke.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from enum import Enum

from loraserve.server.engine.types import Event, FinishEvent, TokenEvent


class LoopWaker:
    """Runs callbacks on the event loop from the engine thread, one loop wake-up per burst.

    Waking the loop costs a Handle, a lock and a self-pipe write; the engine wakes many
    requests in one step, and this schedules one drain for however many arrive before the loop
    gets to it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[Callable[[], None]] = []
        self._scheduled = False

    def wake(self, callback: Callable[[], None]) -> None:
        """Runs `callback` on the loop soon (from any thread; never blocks)."""
        with self._lock:
            self._pending.append(callback)
            if self._scheduled:
                return  # the drain already scheduled runs this one too
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:
            # The loop is closed: the server is stopping and nobody waits any more.
            with self._lock:
                self._pending.clear()
                self._scheduled = False

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            self._scheduled = False
        for callback in pending:
            callback()


class _WakeOn(Enum):
    NOTHING = 0
    """The handler is not waiting (busy, or collecting tokens on its own timer)."""
    ANY_EVENT = 1
    """The handler waits for the next event of any kind."""
    LAST_EVENT = 2
    """The handler waits out the interval: only a finish or an error wakes it early."""


class PacedEvents:
    """One request's events; the engine calls `sink`, the handler awaits `next`.

    With keep_tokens=False (a unary call) token events are dropped on the engine thread and
    only the finish or the error ever reaches the loop."""

    def __init__(self, waker: LoopWaker, interval: float, keep_tokens: bool = True) -> None:
        self._waker = waker
        self._interval = interval
        self._keep_tokens = keep_tokens
        self._lock = threading.Lock()
        """Makes "append, then see whether the handler waits" (engine thread) and "see nothing
        to take, then wait" (loop) exclusive, so no wake-up is ever lost."""
        self._events: deque[Event] = deque()
        self._last_queued = False
        """A finish or an error is in _events (set on the engine thread)."""
        self._wake_on = _WakeOn.NOTHING
        self._waiter: asyncio.Future[None] | None = None
        self._sent_at: float | None = None
        """Loop time the last token message left (None before the first)."""
        self._held: Event | None = None
        """An error taken while merging, returned by the next `next()` after the tokens."""

    def sink(self, event: Event) -> None:
        """Appends one event (called on the engine thread; never blocks)."""
        is_token = isinstance(event, TokenEvent)
        if is_token and not self._keep_tokens:
            return
        with self._lock:
            self._events.append(event)
            if not is_token:
                self._last_queued = True
            wake = self._wake_on is _WakeOn.ANY_EVENT or (
                self._wake_on is _WakeOn.LAST_EVENT and not is_token
            )
            if wake:
                self._wake_on = _WakeOn.NOTHING
        if wake:
            self._waker.wake(self._wake)

    async def next(self) -> Event:
        """The next event to send; a TokenEvent (or a FinishEvent) carries every token
        produced by the time it leaves."""
        if self._held is not None:
            event, self._held = self._held, None
            return event
        loop = asyncio.get_running_loop()
        if self._sent_at is not None and self._interval > 0:
            # Wait out the interval on this stream's own timer first, whether or not tokens
            # are there yet: the engine's tokens meanwhile wake nothing.
            deadline = self._sent_at + self._interval
            while not self._last_queued and (left := deadline - loop.time()) > 0:
                await self._wait(_WakeOn.LAST_EVENT, left)
        while not self._events:
            await self._wait(_WakeOn.ANY_EVENT, None)
        event = self._events.popleft()
        if not isinstance(event, TokenEvent):
            return event
        tokens = [event]
        while self._events:
            later = self._events.popleft()
            if isinstance(later, TokenEvent):
                tokens.append(later)
                continue
            self._sent_at = loop.time()
            if isinstance(later, FinishEvent):
                return _finish_with(merge_tokens(tokens), later)
            self._held = later  # the error goes out after these tokens
            break
        self._sent_at = loop.time()
        return merge_tokens(tokens)

    async def _wait(self, wake_on: _WakeOn, timeout: float | None) -> None:
        """Waits for an event that `wake_on` names, or `timeout` seconds. It may return early
        (a stale wake-up): the caller checks again."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._events and (wake_on is _WakeOn.ANY_EVENT or self._last_queued):
                return
            waiter = self._waiter = loop.create_future()
            self._wake_on = wake_on
        timer = None if timeout is None else loop.call_later(timeout, self._wake)
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            with self._lock:
                self._wake_on = _WakeOn.NOTHING
                self._waiter = None

    def _wake(self) -> None:
        """On the loop: ends the current wait, if any."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def merge_tokens(events: list[TokenEvent]) -> TokenEvent:
    """Consecutive token events of one request as one (one stream message)."""
    if len(events) == 1:
        return events[0]
    first = events[0]
    return TokenEvent(
        token_ids=tuple(t for e in events for t in e.token_ids),
        text="".join(e.text for e in events),
        adapter_version=first.adapter_version,
        logprobs=tuple(lp for e in events for lp in e.logprobs),
        prompt_logprobs=first.prompt_logprobs,
    )


def _finish_with(tokens: TokenEvent, finish: FinishEvent) -> FinishEvent:
    """The finish carrying the not yet sent `tokens` before its own (the stream's last
    message)."""
    return replace(
        finish,
        text_delta=tokens.text + finish.text_delta,
        new_token_ids=tokens.token_ids + finish.new_token_ids,
        new_logprobs=tokens.logprobs + finish.new_logprobs,
    )
