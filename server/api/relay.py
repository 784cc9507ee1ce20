"""Hands engine-thread events to the RPC handlers' asyncio queues, waking the loop once a burst.

The engine thread emits one event per running request per step (32 at batch 32, hundreds of
steps a second on a GPU). Waking the event loop for each costs a Handle, a lock and a
self-pipe write apiece, on the loop that also serves every RPC and competes with the engine
thread for the GIL. The relay queues the events and schedules one drain for however many
arrive before the loop gets to it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from loraserve.server.engine.types import Event


class EventRelay:
    """One per event loop; `sink_for(queue)` is the engine sink of one request."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[Event], Event]] = []
        self._scheduled = False

    def sink_for(
        self, queue: asyncio.Queue[Event], keep: Callable[[Event], bool] | None = None
    ) -> Callable[[Event], None]:
        """A sink (called on the engine thread) that delivers to `queue`, in order; `keep`
        drops events nobody will read before they reach the loop (a unary call's tokens)."""

        def sink(event: Event) -> None:
            if keep is None or keep(event):
                self._push(queue, event)

        return sink

    def _push(self, queue: asyncio.Queue[Event], event: Event) -> None:
        with self._lock:
            self._pending.append((queue, event))
            if self._scheduled:
                return  # the drain already scheduled delivers this one too
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:
            # The loop is closed: the server is stopping and nobody reads the queues any more.
            with self._lock:
                self._pending.clear()
                self._scheduled = False

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            self._scheduled = False
        for queue, event in pending:
            queue.put_nowait(event)
