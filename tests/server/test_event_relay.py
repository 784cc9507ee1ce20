"""Unit tests for server.api.relay: engine-thread events reach their queues in order, with one
loop wake-up per burst, and a unary call's token events never reach the loop."""

from __future__ import annotations

import asyncio
import threading

from loraserve.server.api.relay import EventRelay
from loraserve.server.engine.types import EngineError, ErrorEvent, ErrorKind, TokenEvent


def _token(i: int) -> TokenEvent:
    return TokenEvent(token_ids=(i,), text=str(i), adapter_version=0)


def test_events_from_the_engine_thread_arrive_in_order_with_one_wake_per_burst() -> None:
    async def main() -> tuple[list[list[int]], int]:
        loop = asyncio.get_running_loop()
        wakes = 0
        schedule = loop.call_soon_threadsafe

        def counting(callback, *args):  # type: ignore[no-untyped-def]
            nonlocal wakes
            wakes += 1
            return schedule(callback, *args)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        relay = EventRelay(loop)
        queues = [asyncio.Queue() for _ in range(4)]
        sinks = [relay.sink_for(q) for q in queues]

        def engine_step() -> None:  # as the scheduler does: one event per row, 25 steps
            for step in range(25):
                for sink in sinks:
                    sink(_token(step))

        thread = threading.Thread(target=engine_step)
        # Hold the loop while the "engine" runs: every event arrives before the first drain.
        thread.start()
        thread.join()
        got = [[(await q.get()).token_ids[0] for _ in range(25)] for q in queues]
        return got, wakes

    got, wakes = asyncio.run(main())
    assert got == [list(range(25))] * 4
    assert wakes == 1


def test_a_sink_with_a_filter_drops_events_before_they_reach_the_loop() -> None:
    async def main() -> list[object]:
        relay = EventRelay(asyncio.get_running_loop())
        queue: asyncio.Queue = asyncio.Queue()
        sink = relay.sink_for(queue, lambda e: not isinstance(e, TokenEvent))
        failure = ErrorEvent(EngineError(ErrorKind.INTERNAL, "x"))
        thread = threading.Thread(target=lambda: [sink(_token(1)), sink(failure)])
        thread.start()
        thread.join()
        await asyncio.sleep(0)
        return [queue.get_nowait() for _ in range(queue.qsize())]

    assert [type(e) for e in asyncio.run(main())] == [ErrorEvent]


def test_a_closed_loop_drops_events_instead_of_failing_the_engine_thread() -> None:
    loop = asyncio.new_event_loop()
    relay = EventRelay(loop)
    sink = relay.sink_for(asyncio.Queue())
    loop.close()
    sink(_token(1))  # no exception: the server is stopping
    sink(_token(2))
