"""Paces one GenerateStream: a request's queued token events leave as one message, at most one
message per interval after the first.

Every stream message costs the event loop a protobuf message, a gRPC write and a wake-up, and
the loop shares the GIL with the engine thread: at one message per token, 32 streams cost the
loop about as much as a whole GPU decode step. Merging what is queued (always) and spacing the
messages (`--stream-interval-seconds`) cut that to a few messages a step, while the first
tokens still leave at once, so time to first token is unchanged.
"""

from __future__ import annotations

import asyncio

from loraserve.server.engine.types import Event, TokenEvent


class TokenPacer:
    """Reads one request's event queue; `next()` returns its next event to send."""

    def __init__(self, queue: asyncio.Queue[Event], interval: float) -> None:
        self._queue = queue
        self._interval = interval
        self._loop = asyncio.get_running_loop()
        self._sent_at: float | None = None
        """When the last token message left (None before the first)."""
        self._held: Event | None = None
        """A non-token event taken from the queue while merging, returned next."""

    async def next(self) -> Event:
        """The next event; a TokenEvent carries every token queued by the time it leaves."""
        if self._held is not None:
            event, self._held = self._held, None
            return event
        event = await self._queue.get()
        if not isinstance(event, TokenEvent):
            return event
        if self._sent_at is not None and self._interval > 0:
            await asyncio.sleep(self._sent_at + self._interval - self._loop.time())
        while not self._queue.empty():
            later = self._queue.get_nowait()
            if not isinstance(later, TokenEvent):
                self._held = later  # the finish (or error) goes out after these tokens
                break
            event = event.then(later)
        self._sent_at = self._loop.time()
        return event
