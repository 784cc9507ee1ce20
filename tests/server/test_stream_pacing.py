"""Unit tests for server.api.stream_pacing: queued token events merge into one message, the
first goes out at once, later ones at most once per interval, tokens meanwhile wake nothing, a
finish or an error wakes the handler at once and is never merged away or reordered, and the
engine thread's wake-ups reach the loop once per burst."""

from __future__ import annotations

import asyncio
import random
import threading
import time

from loraserve.server.api.stream_pacing import LoopWaker, PacedEvents, merge_tokens
from loraserve.server.engine.types import (
    EngineError,
    ErrorEvent,
    ErrorKind,
    Event,
    FinishEvent,
    FinishReason,
    TokenEvent,
    TokenLogprob,
    Usage,
)


def _token(i: int) -> TokenEvent:
    logprob = TokenLogprob(token_id=i, logprob=-float(i), top=())
    return TokenEvent(token_ids=(i,), text=f"<{i}>", adapter_version=3, logprobs=(logprob,))


def _finish(tail: int | None = None) -> FinishEvent:
    """A finish; with `tail`, the finishing step's own token rides on it."""
    usage = Usage(1, 1, 0.0, 0.0, 0.0)
    own = () if tail is None else (tail,)
    return FinishEvent(
        "t",
        (9,),
        FinishReason.LENGTH,
        usage,
        text_delta="" if tail is None else f"<{tail}>",
        new_token_ids=own,
        adapter_version=3,
        new_logprobs=tuple(TokenLogprob(token_id=t, logprob=-float(t), top=()) for t in own),
    )


class CountingWaker(LoopWaker):
    """A LoopWaker that counts the wake-ups asked of it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.wakes = 0

    def wake(self, callback) -> None:  # type: ignore[no-untyped-def]
        self.wakes += 1
        super().wake(callback)


def test_queued_tokens_and_the_finish_leave_as_one_last_message() -> None:
    async def main() -> list[Event]:
        events = PacedEvents(LoopWaker(asyncio.get_running_loop()), interval=0.0)
        for i in range(4):
            events.sink(_token(i))
        events.sink(_finish(tail=4))
        events.sink(_token(99))  # never reached: the finish ends the stream
        return [await events.next()]

    (last,) = asyncio.run(main())
    assert isinstance(last, FinishEvent)
    assert last.new_token_ids == (0, 1, 2, 3, 4)
    assert last.text_delta == "<0><1><2><3><4>"
    assert [lp.token_id for lp in last.new_logprobs] == [0, 1, 2, 3, 4]
    assert last.usage.completion_tokens == 1 and last.text == "t"  # the rest is the finish's


def test_a_finish_alone_is_returned_as_it_is() -> None:
    async def main() -> Event:
        events = PacedEvents(LoopWaker(asyncio.get_running_loop()), interval=0.0)
        finish = _finish()
        events.sink(finish)
        return await events.next()

    assert isinstance(asyncio.run(main()), FinishEvent)


def test_an_error_is_held_until_the_tokens_before_it_are_sent() -> None:
    async def main() -> list[Event]:
        events = PacedEvents(LoopWaker(asyncio.get_running_loop()), interval=0.0)
        error = ErrorEvent(EngineError(ErrorKind.INTERNAL, "boom"))
        for event in (_token(1), _token(2), error):
            events.sink(event)
        return [await events.next(), await events.next()]

    tokens, error = asyncio.run(main())
    assert isinstance(tokens, TokenEvent) and tokens.token_ids == (1, 2)
    assert isinstance(error, ErrorEvent)


def test_the_first_message_is_immediate_and_later_ones_wait_out_the_interval() -> None:
    interval = 0.15

    async def main() -> tuple[float, float, Event, int]:
        loop = asyncio.get_running_loop()
        waker = CountingWaker(loop)
        events = PacedEvents(waker, interval=interval)
        events.sink(_token(0))
        start = loop.time()
        first = await events.next()
        first_at = loop.time() - start
        assert isinstance(first, TokenEvent) and first.token_ids == (0,)

        async def produce() -> None:  # three more tokens, one every 10 ms
            for i in (1, 2, 3):
                await asyncio.sleep(0.01)
                events.sink(_token(i))

        producer = asyncio.create_task(produce())
        second = await events.next()
        second_at = loop.time() - start
        await producer
        return first_at, second_at, second, waker.wakes

    first_at, second_at, second, wakes = asyncio.run(main())
    assert first_at < interval  # no wait before the first message
    assert second_at >= interval  # the next waited out the interval...
    assert isinstance(second, TokenEvent) and second.token_ids == (1, 2, 3)  # ...with everything
    assert wakes == 0  # tokens produced while the handler waits out its interval wake nothing


def test_a_finish_wakes_the_handler_before_its_interval_is_over() -> None:
    interval = 30.0  # far longer than the test may take: only an early wake-up can pass it

    async def main() -> Event:
        events = PacedEvents(LoopWaker(asyncio.get_running_loop()), interval=interval)
        events.sink(_token(0))
        await events.next()  # the first message starts the interval

        def engine() -> None:
            time.sleep(0.02)
            events.sink(_token(1))
            events.sink(_finish(tail=2))

        thread = threading.Thread(target=engine)
        thread.start()
        try:
            return await asyncio.wait_for(events.next(), timeout=interval / 2)
        finally:
            thread.join()

    last = asyncio.run(main())
    assert isinstance(last, FinishEvent) and last.new_token_ids == (1, 2)


def test_a_unary_call_drops_tokens_on_the_engine_thread() -> None:
    async def main() -> tuple[Event, int]:
        waker = CountingWaker(asyncio.get_running_loop())
        events = PacedEvents(waker, interval=0.0, keep_tokens=False)
        reader = asyncio.create_task(events.next())
        await asyncio.sleep(0)  # the handler now waits for its first event

        def engine() -> None:
            for i in range(5):
                events.sink(_token(i))
            events.sink(_finish())

        thread = threading.Thread(target=engine)
        thread.start()
        thread.join()
        return await reader, waker.wakes

    event, wakes = asyncio.run(main())
    assert isinstance(event, FinishEvent) and event.new_token_ids == ()
    assert wakes == 1  # the finish only


def test_every_token_arrives_in_order_from_a_racing_engine_thread() -> None:
    """No wake-up is lost when the engine appends while the handler decides to wait."""

    async def read_all(events: PacedEvents) -> list[int]:
        got: list[int] = []
        while True:
            event = await events.next()
            if isinstance(event, FinishEvent):
                return got + list(event.new_token_ids)
            assert isinstance(event, TokenEvent)
            got += event.token_ids

    async def main(interval: float) -> list[int]:
        events = PacedEvents(LoopWaker(asyncio.get_running_loop()), interval=interval)
        rng = random.Random(0)

        def engine() -> None:
            for i in range(2000):
                events.sink(_token(i))
                if rng.random() < 0.05:
                    time.sleep(0.0002)
            events.sink(_finish(tail=2000))

        thread = threading.Thread(target=engine)
        thread.start()
        try:
            return await asyncio.wait_for(read_all(events), timeout=60)
        finally:
            thread.join()

    for interval in (0.0, 0.002):
        assert asyncio.run(main(interval)) == list(range(2001))


def test_merged_tokens_keep_their_order_and_the_first_prompt_logprobs() -> None:
    prompt = (TokenLogprob(token_id=5, logprob=-1.0, top=()),)
    first = TokenEvent((1,), "a", 2, prompt_logprobs=prompt)
    merged = merge_tokens([first, TokenEvent((2, 3), "bc", 2), TokenEvent((4,), "", 2)])
    assert merged.token_ids == (1, 2, 3, 4) and merged.text == "abc"
    assert merged.prompt_logprobs == prompt and merged.adapter_version == 2
    assert merge_tokens([first]) is first


def test_wake_ups_from_the_engine_thread_reach_the_loop_once_per_burst() -> None:
    async def main() -> tuple[list[int], int]:
        loop = asyncio.get_running_loop()
        wakes = 0
        schedule = loop.call_soon_threadsafe

        def counting(callback, *args):  # type: ignore[no-untyped-def]
            nonlocal wakes
            wakes += 1
            return schedule(callback, *args)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        waker = LoopWaker(loop)
        ran: list[int] = []
        # Hold the loop while the "engine" runs: every wake-up arrives before the first drain.
        thread = threading.Thread(
            target=lambda: [waker.wake(lambda i=i: ran.append(i)) for i in range(100)]
        )
        thread.start()
        thread.join()
        await asyncio.sleep(0)
        return ran, wakes

    ran, wakes = asyncio.run(main())
    assert ran == list(range(100))
    assert wakes == 1


def test_a_closed_loop_drops_wake_ups_instead_of_failing_the_engine_thread() -> None:
    loop = asyncio.new_event_loop()
    waker = LoopWaker(loop)
    events = PacedEvents(waker, interval=0.0)
    loop.close()
    events._wake_on = events._wake_on.ANY_EVENT  # as if its handler were waiting
    events.sink(_token(1))  # no exception: the server is stopping
    waker.wake(lambda: None)
