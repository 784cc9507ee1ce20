"""Unit tests for server.api.stream_pacing: queued token events merge into one message, the
first goes out at once, later ones at most once per interval, and a finish or error is never
merged away or reordered."""

from __future__ import annotations

import asyncio

from loraserve.server.api.stream_pacing import TokenPacer
from loraserve.server.engine.types import (
    EngineError,
    ErrorEvent,
    ErrorKind,
    FinishEvent,
    FinishReason,
    TokenEvent,
    TokenLogprob,
    Usage,
)


def _token(i: int) -> TokenEvent:
    logprob = TokenLogprob(token_id=i, logprob=-float(i), top=())
    return TokenEvent(token_ids=(i,), text=f"<{i}>", adapter_version=3, logprobs=(logprob,))


def _finish() -> FinishEvent:
    usage = Usage(1, 1, 0.0, 0.0, 0.0)
    return FinishEvent(
        "t", (9,), FinishReason.LENGTH, usage, text_delta="", new_token_ids=(), adapter_version=3
    )


def test_queued_tokens_leave_as_one_message_and_the_finish_after_them() -> None:
    async def main() -> list:
        queue: asyncio.Queue = asyncio.Queue()
        pacer = TokenPacer(queue, interval=0.0)
        for i in range(4):
            queue.put_nowait(_token(i))
        finish = _finish()
        queue.put_nowait(finish)
        queue.put_nowait(_token(99))  # never reached: the finish comes first
        return [await pacer.next(), await pacer.next(), finish]

    merged, after, finish = asyncio.run(main())
    assert merged.token_ids == (0, 1, 2, 3)
    assert merged.text == "<0><1><2><3>"
    assert [lp.token_id for lp in merged.logprobs] == [0, 1, 2, 3]
    assert merged.adapter_version == 3
    assert after is finish


def test_an_error_is_held_until_the_tokens_before_it_are_sent() -> None:
    async def main() -> list:
        queue: asyncio.Queue = asyncio.Queue()
        pacer = TokenPacer(queue, interval=0.0)
        error = ErrorEvent(EngineError(ErrorKind.INTERNAL, "boom"))
        for event in (_token(1), _token(2), error):
            queue.put_nowait(event)
        return [await pacer.next(), await pacer.next()]

    tokens, error = asyncio.run(main())
    assert tokens.token_ids == (1, 2)
    assert isinstance(error, ErrorEvent)


def test_the_first_message_is_immediate_and_later_ones_wait_out_the_interval() -> None:
    interval = 0.15

    async def main() -> tuple[float, float, tuple[int, ...]]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        pacer = TokenPacer(queue, interval=interval)
        queue.put_nowait(_token(0))
        start = loop.time()
        first = await pacer.next()
        first_at = loop.time() - start
        assert first.token_ids == (0,)

        async def produce() -> None:  # three more tokens, one every 10 ms
            for i in (1, 2, 3):
                await asyncio.sleep(0.01)
                queue.put_nowait(_token(i))

        producer = asyncio.create_task(produce())
        second = await pacer.next()
        second_at = loop.time() - start
        await producer
        return first_at, second_at, second.token_ids

    first_at, second_at, second_ids = asyncio.run(main())
    assert first_at < interval  # no wait before the first message
    assert second_at >= interval  # the next waited out the interval...
    assert second_ids == (1, 2, 3)  # ...and carries everything produced meanwhile
