"""The planner's KV block policy as plain data: allocation, and whom to preempt."""

from __future__ import annotations

import pytest

from loraserve.server.engine.planner import BlockAllocator, blocks_for, plan_growth


def test_blocks_for_rounds_up_to_whole_blocks() -> None:
    assert [blocks_for(n) for n in (1, 15, 16, 17, 32, 33)] == [1, 1, 1, 2, 2, 3]


def test_allocator_never_hands_out_the_scratch_block_and_refuses_whole() -> None:
    pool = BlockAllocator(5)
    assert pool.capacity == 4 and pool.free_count == 4
    got = pool.allocate(3)
    assert got is not None and 0 not in got and len(set(got)) == 3
    assert pool.allocate(2) is None, "a partial allocation must take nothing"
    assert pool.free_count == 1
    pool.free(got)
    assert pool.free_count == 4
    assert sorted(pool.allocate(4) or []) == [1, 2, 3, 4]


def test_allocator_needs_a_real_block() -> None:
    with pytest.raises(ValueError):
        BlockAllocator(1)


def test_growth_that_fits_preempts_nobody() -> None:
    assert plan_growth(held=[2, 3], needed=[3, 3], free=1) == []


def test_growth_preempts_the_most_recently_admitted_first() -> None:
    # Three requests each need one more block, none is free: the last admitted goes, which
    # frees its 2 blocks for the other two.
    assert plan_growth(held=[4, 3, 2], needed=[5, 4, 3], free=0) == [2]


def test_growth_preempts_as_many_as_needed() -> None:
    assert plan_growth(held=[1, 1, 1], needed=[3, 3, 2], free=0) == [2, 1]
