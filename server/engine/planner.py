"""The scheduler's decisions as plain data: which rows run, their KV blocks and adapter pages.

Nothing here touches a model or a device, so policy is unit-testable (as vLLM's scheduler
output is). The executor (server.engine.executor) turns a StepPlan into one forward.

KV memory is paged: blocks of BLOCK_SIZE tokens from a pool sized at start; a request holds
only the blocks its tokens fill. Block 0 is never handed out: padding writes go there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

BLOCK_SIZE = 16


def blocks_for(tokens: int, block_size: int = BLOCK_SIZE) -> int:
    """Blocks that hold `tokens` tokens."""
    return -(-tokens // block_size)


@dataclass(frozen=True)
class RowPlan:
    """One request's part of a forward."""

    slot: int
    """Its batch slot (0..max_batch_size-1): where its routing lives in the static buffers."""
    tokens: tuple[int, ...]
    """Tokens fed: a prompt chunk, or the last generated token."""
    start: int
    """Position of tokens[0]."""
    blocks: tuple[int, ...]
    """Its KV blocks in order (paged executor; empty for the generic path)."""
    pages: tuple[int, ...]
    """Its adapter's device pages (empty for the base model)."""


@dataclass(frozen=True)
class StepPlan:
    kind: Literal["prefill", "decode"]
    rows: tuple[RowPlan, ...]


class BlockAllocator:
    """Free-list of KV blocks 1..num_blocks-1 (block 0 is the scratch block)."""

    def __init__(self, num_blocks: int, block_size: int = BLOCK_SIZE) -> None:
        if num_blocks < 2:
            raise ValueError("the KV pool needs at least one block besides the scratch block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, 0, -1))

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Blocks a request can ever hold (all but the scratch block)."""
        return self.num_blocks - 1

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks, or None (allocating nothing) when fewer are free."""
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: tuple[int, ...] | list[int]) -> None:
        self._free.extend(blocks)


def plan_growth(held: list[int], needed: list[int], free: int) -> list[int]:
    """Which running requests to preempt so every other one gets the blocks it needs.

    held[i] / needed[i]: blocks request i holds / must hold after this step, in admission
    order. Preempts the most recently admitted first (their work is cheapest to redo), as
    vLLM does, until the growth of the rest fits in `free` plus what the preempted release.
    Returns the preempted indices, most recent first.
    """
    growth = [max(0, n - h) for h, n in zip(held, needed, strict=True)]
    preempted: list[int] = []
    want = sum(growth)
    i = len(held) - 1
    while want > free and i >= 0:
        preempted.append(i)
        want -= growth[i]
        free += held[i]
        i -= 1
    return preempted
