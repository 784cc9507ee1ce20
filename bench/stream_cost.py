"""The event loop's CPU per stream message of GenerateStream's pacing alone (run by hand).

A stand-in engine thread appends one token event to every stream per step, as the scheduler
does, for `--tokens` steps; one handler per stream takes its events through
`server.api.stream_pacing.PacedEvents` and builds the stream message the servicer would send.
No gRPC and no model, so what is left is the pacing's own cost: the loop thread's CPU time per
message and per token. At a GPU's pace (a decode step every 2 ms) and the default 20 ms interval
a stream sends about one message per 10 tokens.

    python -m loraserve.bench.stream_cost --step-ms 2 --interval-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from pathlib import Path

from loraserve.bench.report import command_result
from loraserve.server.api.convert import token_logprobs_pb
from loraserve.server.api.stream_pacing import LoopWaker, PacedEvents
from loraserve.server.engine.types import FinishEvent, FinishReason, TokenEvent, Usage
from loraserve.v1 import inference_pb2


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=200, help="tokens per stream")
    parser.add_argument("--step-ms", type=float, default=2.0, help="engine step time")
    parser.add_argument("--interval-ms", type=float, default=20.0, help="stream interval")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


async def _measure(args: argparse.Namespace) -> dict:
    waker = LoopWaker(asyncio.get_running_loop())
    streams = [PacedEvents(waker, args.interval_ms / 1e3) for _ in range(args.streams)]
    usage = Usage(1, args.tokens, 0.0, 0.0, 0.0)
    step_s = args.step_ms / 1e3

    def engine() -> None:
        for i in range(args.tokens):
            started = time.perf_counter()
            for stream in streams:
                stream.sink(TokenEvent((i,), "ab", 0))
            # Busy, as a host-bound engine thread is, rather than asleep.
            while time.perf_counter() - started < step_s:
                pass
        finish = FinishEvent("", (), FinishReason.LENGTH, usage, "", (), 0)
        for stream in streams:
            stream.sink(finish)

    messages = 0

    async def handler(events: PacedEvents) -> None:
        nonlocal messages
        while True:
            event = await events.next()
            messages += 1
            if isinstance(event, FinishEvent):
                return
            assert isinstance(event, TokenEvent)
            inference_pb2.GenerateStreamResponse(
                text=event.text,
                token_ids=list(event.token_ids),
                request_id="0123456789abcdef",
                adapter_version=event.adapter_version,
                logprobs=token_logprobs_pb(event.logprobs),
            )

    thread = threading.Thread(target=engine, name="stand-in-engine")
    cpu_before = time.thread_time()
    thread.start()
    await asyncio.gather(*(handler(events) for events in streams))
    loop_cpu_s = time.thread_time() - cpu_before
    thread.join()
    tokens = args.tokens * args.streams
    return command_result(
        args,
        messages_per_stream=messages / args.streams,
        loop_cpu_per_message_us=loop_cpu_s / messages * 1e6,
        loop_cpu_per_token_us=loop_cpu_s / tokens * 1e6,
    )


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    result = asyncio.run(_measure(args))
    print(
        f"{args.streams} streams, a token each every {args.step_ms:g} ms, "
        f"{args.interval_ms:g} ms interval: {result['messages_per_stream']:.1f} messages per "
        f"stream; event loop CPU {result['loop_cpu_per_message_us']:.1f} us per message, "
        f"{result['loop_cpu_per_token_us']:.2f} us per token"
    )
    return result


if __name__ == "__main__":
    main()
