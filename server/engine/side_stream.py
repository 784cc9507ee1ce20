"""A CUDA stream that runs work beside the current one, for the own forward's LoRA shrinks.

A fused projection's adapter shrink (xa = A x) reads only the projection's input, as the base
matmul (W0 x) does, so the two can run at once: the shrink on this stream, the matmul on the
current one, then the expand (y += B xa) on the current stream once both are done. At decode the
shrink is a few microseconds of short programs and the matmul leaves SMs idle, so the shrink's
time can hide behind the matmul's instead of adding to it (`--lora-overlap`).

`beside()` orders its work after everything already enqueued on the current stream (the input
and the routing are ready) and `join()` orders the current stream's next work after it. Both
are stream waits on events, which CUDA graph capture records as graph edges: captured, the two
branches are parallel nodes of one graph and replays cost no host work. Tensors the side work
writes are allocated on the current stream before `beside()`, so the caching allocator never
hands their memory to other work while the side stream may still use it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import torch


class Beside(Protocol):
    """What the forward needs of a side stream (tests substitute a recording one)."""

    def beside(self) -> AbstractContextManager[None]: ...

    def join(self) -> None: ...


class InlineSide:
    """Where there are no streams (CPU): the side work runs inline, in order."""

    @contextmanager
    def beside(self) -> Iterator[None]:
        yield

    def join(self) -> None:
        pass


def side_for(device: torch.device) -> Beside:
    """A SideStream on a CUDA device, else InlineSide."""
    return SideStream(device) if device.type == "cuda" else InlineSide()


class SideStream:
    """One side stream on a CUDA device; high priority, because both branches must finish
    before the expand and the side one is the shorter: its programs should not queue behind
    the matmul's when they contend for SMs (graphs keep the priority a kernel was captured
    with)."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device, priority=-1)

    @contextmanager
    def beside(self) -> Iterator[None]:
        current = torch.cuda.current_stream(self.stream.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            yield

    def join(self) -> None:
        torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
