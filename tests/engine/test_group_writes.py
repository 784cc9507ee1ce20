"""LoRAGroup.write_pages and clear_pages: the cold-load commit and the eviction of one
adapter's pages in a fused group. Each must leave the same stacks, live flags, live index and
member bookkeeping as writing or clearing each member on its own (MultiLoRALinear.write_pages,
.clear), with every member targeted, some, or one alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loraserve.server.engine.lora import (
    LiveIndex,
    LoRAContext,
    LoRAGroup,
    MemberPages,
    MultiLoRALinear,
    PageCopies,
)

OUTS = (6, 2, 2)
"""q, k, v widths: one wide member and two narrow ones (GQA)."""
D_IN, PAGE_RANK, NUM_PAGES = 8, 2, 6


def _group(outs: tuple[int, ...], reserve: bool) -> tuple[LoRAGroup, LiveIndex]:
    torch.manual_seed(0)
    context, index = LoRAContext(), LiveIndex()
    members = [MultiLoRALinear(nn.Linear(D_IN, out), context=context) for out in outs]
    group = LoRAGroup(members, kind="qkv", index=index)
    if reserve:
        group.reserve(NUM_PAGES, PAGE_RANK)
    return group, index


def _pages(member: MultiLoRALinear, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, PAGE_RANK, member.in_features, generator=gen)  # (n, page_rank, d_in)
    b = torch.randn(n, member.out_features, PAGE_RANK, generator=gen)  # (n, d_out, page_rank)
    return a, b


def _stacked(parts: list[MemberPages]) -> tuple[torch.Tensor, torch.Tensor]:
    """The members' pages in the stacks' layout, as the cold loader stages a whole group."""
    return (
        torch.stack([a for _, a, _ in parts], dim=1),  # (n, members, page_rank, d_in)
        torch.cat([b for _, _, b in parts], dim=1),  # (n, sum(outs), page_rank)
    )


def _assert_same(
    x: LoRAGroup, x_index: LiveIndex, y: LoRAGroup, y_index: LiveIndex, live: set[int]
) -> None:
    """Two groups hold the same stacks, live flags, live index and member occupancy."""
    assert x.a is not None and y.a is not None
    assert torch.equal(x.a, y.a) and torch.equal(x.b, y.b)
    assert torch.equal(x.live, y.live)
    assert x.live_pages == y.live_pages == live
    assert x_index.kinds_for(live) == y_index.kinds_for(live) == {"qkv"}
    for m, n in zip(x.members, y.members, strict=True):
        assert m.occupied == n.occupied


@pytest.mark.parametrize("stack", [False, True], ids=["parts", "staged stacked"])
@pytest.mark.parametrize("reserve", [True, False])
@pytest.mark.parametrize(
    ("outs", "written"),
    [(OUTS, (0, 1, 2)), (OUTS, (0, 2)), (OUTS, (1,)), ((6,), (0,))],
    ids=["all members", "q and v", "k alone", "one-member group"],
)
def test_group_write_equals_member_writes(
    stack: bool, reserve: bool, outs: tuple[int, ...], written: tuple[int, ...]
) -> None:
    grouped, grouped_index = _group(outs, reserve)
    single, single_index = _group(outs, reserve)
    pages = [4, 2]  # out of order: the index decides where each page lands
    index = torch.tensor(pages)
    for adapter_pages, seed in ((pages, 1), ([1], 2)):  # a second adapter beside the first
        at = torch.tensor(adapter_pages)
        parts = [
            (grouped.members[j], *_pages(grouped.members[j], len(adapter_pages), seed + j))
            for j in written
        ]
        generations = [m.generation for m in grouped.members]
        stacked = _stacked(parts) if stack and len(written) == len(outs) else None
        grouped.write_pages(adapter_pages, NUM_PAGES, parts, at, stacked)
        for j in written:
            a, b = _pages(single.members[j], len(adapter_pages), seed + j)
            single.members[j].write_pages(adapter_pages, NUM_PAGES, a, b, at)
        for j, member in enumerate(grouped.members):
            bumped = member.generation > generations[j]
            if j in written:
                assert bumped, "a written member's gathered pages must go stale"
            elif reserve:
                assert not bumped, "fixed stacks: an untouched member's gathers stay valid"
    _assert_same(grouped, grouped_index, single, single_index, {1, 2, 4})
    # Members left out hold zeros on the adapter's pages: their rows get the base output.
    for j, member in enumerate(grouped.members):
        if j not in written:
            assert member.lora_a is not None and not member.lora_a[index].any()


@pytest.mark.parametrize("reserve", [True, False])
@pytest.mark.parametrize("written", [(0, 1, 2), (0, 2), (1,)], ids=["all", "q and v", "k"])
def test_group_clear_equals_member_clears(reserve: bool, written: tuple[int, ...]) -> None:
    grouped, grouped_index = _group(OUTS, reserve)
    single, single_index = _group(OUTS, reserve)
    for group in (grouped, single):
        for adapter_pages, seed in (([4, 2], 1), ([1], 2)):
            at = torch.tensor(adapter_pages)
            parts = [
                (group.members[j], *_pages(group.members[j], len(adapter_pages), seed + j))
                for j in written
            ]
            group.write_pages(adapter_pages, NUM_PAGES, parts, at)
    generations = [m.generation for m in grouped.members]
    grouped.clear_pages([4, 2], torch.tensor([4, 2]))
    for member in single.members:
        member.clear([4, 2])
    assert grouped.a is not None and single.a is not None
    assert torch.equal(grouped.a, single.a) and torch.equal(grouped.b, single.b)
    assert not grouped.a[[4, 2]].any() and not grouped.b[[4, 2]].any()
    assert grouped.a[1].any(), "the other adapter's page is untouched"
    assert torch.equal(grouped.live, single.live)
    assert grouped.live_pages == single.live_pages == {1}
    assert grouped_index.kinds_for([2, 4]) == single_index.kinds_for([2, 4]) == frozenset()
    assert grouped_index.kinds_for([1]) == {"qkv"}
    for j, (g, s) in enumerate(zip(grouped.members, single.members, strict=True)):
        assert g.occupied == s.occupied
        assert (g.generation > generations[j]) == (j in written)


def test_clearing_pages_no_member_holds_changes_nothing() -> None:
    group, index = _group(OUTS, reserve=True)
    at = torch.tensor([3])
    group.write_pages([3], NUM_PAGES, [(group.members[0], *_pages(group.members[0], 1, 5))], at)
    assert group.a is not None
    before = group.a.clone(), [m.generation for m in group.members]
    group.clear_pages([5], torch.tensor([5]))
    assert torch.equal(group.a, before[0]) and [m.generation for m in group.members] == before[1]
    assert index.kinds_for([3]) == {"qkv"}


def test_clearing_held_and_free_pages_together_clears_the_held_ones() -> None:
    group, index = _group(OUTS, reserve=True)
    at = torch.tensor([4, 2])
    parts = [(m, *_pages(m, 2, 7 + j)) for j, m in enumerate(group.members)]
    group.write_pages([4, 2], NUM_PAGES, parts, at)
    group.clear_pages([5, 4], torch.tensor([5, 4]))  # 5 is free: only 4 is cleared
    assert group.a is not None and group.b is not None
    assert not group.a[4].any() and not group.b[4].any() and group.a[2].any()
    assert group.live_pages == {2} and group.live is not None
    assert group.live.tolist()[2] == 1 and group.live.tolist()[4] == 0
    assert index.kinds_for([4]) == frozenset() and index.kinds_for([2]) == {"qkv"}
    assert all(m.occupied == {2} for m in group.members)


@pytest.mark.parametrize("reserve", [True, False])
@pytest.mark.parametrize("outs", [OUTS, (6,)], ids=["q/k/v stacked", "one member"])
def test_a_run_write_equals_an_indexed_write(reserve: bool, outs: tuple[int, ...]) -> None:
    """LoRAGroup.write_run (the commit's path into consecutive pages, queued as slice copies)
    leaves the stacks, live flags, live index and member bookkeeping of write_pages."""
    by_run, run_index = _group(outs, reserve)
    by_index, index_index = _group(outs, reserve)
    for first, n, seed in ((3, 2, 1), (1, 1, 4)):
        pages = list(range(first, first + n))
        run_parts = [(m, *_pages(m, n, seed + j)) for j, m in enumerate(by_run.members)]
        index_parts = [(m, *_pages(m, n, seed + j)) for j, m in enumerate(by_index.members)]
        stacked = _stacked(run_parts) if len(outs) > 1 else None
        copies = PageCopies()
        by_run.write_run(first, NUM_PAGES, run_parts, stacked, copies)
        copies.flush()
        by_index.write_pages(pages, NUM_PAGES, index_parts, torch.tensor(pages))
    _assert_same(by_run, run_index, by_index, index_index, {1, 3, 4})
    for r, i in zip(by_run.members, by_index.members, strict=True):
        assert r.occupied == {1, 3, 4} and r.generation == i.generation


def test_an_unfused_layer_run_write_equals_an_indexed_write() -> None:
    context = LoRAContext()
    torch.manual_seed(0)
    by_run = MultiLoRALinear(nn.Linear(D_IN, 6), context=context)
    by_index = MultiLoRALinear(nn.Linear(D_IN, 6), context=context)
    a, b = _pages(by_run, 2, 3)
    copies = PageCopies()
    by_run.write_run(2, NUM_PAGES, a, b, copies)
    copies.flush()
    by_index.write_pages([2, 3], NUM_PAGES, a, b, torch.tensor([2, 3]))
    assert by_run.lora_a is not None and by_index.lora_a is not None
    assert torch.equal(by_run.lora_a, by_index.lora_a)
    assert torch.equal(by_run.lora_b, by_index.lora_b)
    assert by_run.occupied == by_index.occupied == {2, 3}


def test_a_run_written_again_after_the_stacks_moved_lands_in_the_new_stacks() -> None:
    """After the stacks are freed and made again (an unreserved group emptied, then written),
    the same run of pages is written into the new stacks, all live again."""
    group, index = _group(OUTS, reserve=False)

    def write(seed: int) -> list[MemberPages]:
        parts = [(m, *_pages(m, 2, seed + j)) for j, m in enumerate(group.members)]
        copies = PageCopies()
        group.write_run(3, NUM_PAGES, parts, _stacked(parts), copies)
        copies.flush()
        return parts

    write(1)
    group.clear_pages([3, 4], torch.tensor([3, 4]))
    group.release_memory()
    assert group.a is None
    parts = write(5)  # the same run of pages, into stacks made anew
    assert group.a is not None and group.b is not None and group.live is not None
    stacked = _stacked(parts)
    assert torch.equal(group.a[3:5], stacked[0]) and torch.equal(group.b[3:5], stacked[1])
    assert group.live.tolist()[3:5] == [1, 1] and group.live_pages == {3, 4}
    assert index.kinds_for([3]) == {"qkv"}
