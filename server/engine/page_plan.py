"""How an adapter's pages tile its staging buffer, and the host layout that fills it.

A cold load lays every page of an adapter out in ONE buffer (one copy to the device): blocks of
modules that share a shape, all their A pages then all their B pages, and, where the rank fits
one page or fills its pages, each fully targeted fused group (q/k/v) in its stacks' layout, so
the device holds it with no stacking of its own (`arena_plan`). `lay_out` fills the buffer on
the host; server.engine.device_layout fills it on the device with the same block writes
(`write_blocks`) run once over element numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from loraserve.adapters.weights import AdapterWeights

PageShapes = list[tuple[str, int, int]]
"""(module name, d_in, d_out) of every module of an adapter, in its order."""


@dataclass(frozen=True)
class GroupBlock:
    """Fused groups of one member signature, laid out as their stacks hold pages: per group,
    its members' A pages side by side (n, M, page_rank, d_in), then per group its members' B
    pages stacked along d_out (n, sum(d_outs), page_rank)."""

    groups: tuple[tuple[str, ...], ...]
    """Each group's member names, in member order (PageLayout.groups)."""
    d_in: int
    d_outs: tuple[int, ...]
    """Each member's d_out, in member order."""


@dataclass(frozen=True)
class ShapeBlock:
    """Modules of one shape, all their A pages (m, n, page_rank, d_in) then all their B pages
    (m, n, d_out, page_rank)."""

    names: tuple[str, ...]
    d_in: int
    d_out: int


ArenaPlan = tuple[GroupBlock | ShapeBlock, ...]
"""How an adapter's pages tile its staging buffer, block after block."""
ModulePages = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Module name -> (A pages (n, page_rank, d_in), B pages (n, d_out, page_rank))."""
GroupPages = dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]]
"""Group members -> (A pages (n, M, page_rank, d_in), B pages (n, sum(d_out), page_rank))."""


def arena_plan(
    shapes: PageShapes, groups: tuple[tuple[str, ...], ...], rank: int, page_rank: int
) -> ArenaPlan:
    """The staging buffer's blocks. Where the rank fills its pages exactly or fits one (rank
    16 or 8 in pages of 8, rank 5 in one), every fully targeted group whose members share
    d_in is laid out in its stacks' layout right away, so the device holds it with no
    stacking of its own (the loader thread launched a stack and a concatenation per group
    otherwise, and kept both copies); the other modules are laid out by shape, in
    first-seen order."""
    present = {name: (d_in, d_out) for name, d_in, d_out in shapes}
    signatures: dict[tuple[int, tuple[int, ...]], list[tuple[str, ...]]] = {}
    if rank <= page_rank or rank % page_rank == 0:
        for names in groups:
            if not all(name in present for name in names):
                continue
            d_ins = {present[name][0] for name in names}
            if len(d_ins) == 1:
                signature = (d_ins.pop(), tuple(present[name][1] for name in names))
                signatures.setdefault(signature, []).append(names)
    in_groups = {name for members in signatures.values() for names in members for name in names}
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name, d_in, d_out in shapes:
        if name not in in_groups:
            by_shape.setdefault((d_in, d_out), []).append(name)
    return tuple(
        GroupBlock(tuple(members), d_in, d_outs) for (d_in, d_outs), members in signatures.items()
    ) + tuple(ShapeBlock(tuple(names), d_in, d_out) for (d_in, d_out), names in by_shape.items())


@dataclass(frozen=True)
class BlockSpan:
    """Where one block's pages lie in the staging buffer."""

    block: GroupBlock | ShapeBlock
    a_shape: tuple[int, ...]
    """A GroupBlock's (G, n, M, page_rank, d_in), a ShapeBlock's (m, n, page_rank, d_in)."""
    b_shape: tuple[int, ...]
    """(entries, n, d_out (a group's summed), page_rank)."""
    a_start: int
    b_start: int
    """The B pages follow the A pages."""
    end: int


def block_spans(plan: ArenaPlan, n: int, page_rank: int) -> Iterator[BlockSpan]:
    """Each block of `plan`, where its A and B pages lie, in buffer order."""
    offset = 0
    for block in plan:
        if isinstance(block, GroupBlock):
            count, members, d_out = len(block.groups), len(block.d_outs), sum(block.d_outs)
            a_shape: tuple[int, ...] = (count, n, members, page_rank, block.d_in)
        else:
            count, d_out = len(block.names), block.d_out
            a_shape = (count, n, page_rank, block.d_in)
        b_shape = (count, n, d_out, page_rank)
        b_start = offset + math.prod(a_shape)
        end = b_start + math.prod(b_shape)
        yield BlockSpan(block, a_shape, b_shape, offset, b_start, end)
        offset = end


def plan_blocks(
    arena: torch.Tensor, plan: ArenaPlan, n: int, page_rank: int
) -> Iterator[tuple[GroupBlock | ShapeBlock, torch.Tensor, torch.Tensor]]:
    """Each block of `plan` with its A and B pages, views of `arena` (BlockSpan's shapes)."""
    for span in block_spans(plan, n, page_rank):
        a_all = arena[span.a_start : span.b_start].view(span.a_shape)
        b_all = arena[span.b_start : span.end].view(span.b_shape)
        yield span.block, a_all, b_all


def plan_views(
    arena: torch.Tensor, shapes: PageShapes, plan: ArenaPlan, n: int, page_rank: int
) -> tuple[ModulePages, GroupPages]:
    """Views of `arena` (total,): module name -> (A pages (n, page_rank, d_in), B pages
    (n, d_out, page_rank)) in module order, and each GroupBlock group -> its stacks' layout
    (StagedAdapter.grouped)."""
    modules: ModulePages = {}
    grouped: GroupPages = {}
    for block, a_all, b_all in plan_blocks(arena, plan, n, page_rank):
        if isinstance(block, ShapeBlock):
            pairs = zip(a_all.unbind(0), b_all.unbind(0), strict=True)
            modules.update(zip(block.names, pairs, strict=True))
            continue
        # One call per factor of a group makes all its members' views (a cold load's loader
        # thread holds the GIL for each call it makes).
        groups = zip(block.groups, a_all.unbind(0), b_all.unbind(0), strict=True)
        for names, a_group, b_group in groups:
            grouped[names] = (a_group, b_group)  # (n, M, page, d_in), (n, sum(d_out), page)
            members = zip(a_group.unbind(1), b_group.split_with_sizes(block.d_outs, 1), strict=True)
            modules.update(zip(names, members, strict=True))
    return {name: modules[name] for name, _, _ in shapes}, grouped


def lay_out(
    weights: AdapterWeights,
    page_rank: int,
    n: int,
    dtype: torch.dtype,
    *,
    pin: bool,
    groups: tuple[tuple[str, ...], ...] = (),
) -> tuple[torch.Tensor, PageShapes, ArenaPlan]:
    """All of an adapter's pages in one host buffer, (total,) in `dtype`: exactly what
    `adapter_pages` makes per module (scale folded into B in float32, rank rows past r
    zero), written in place, so the copy to the device is one copy of one buffer (pinned
    when `pin`) instead of two per module. Blocks as arena_plan says: a block's A pages in
    one write, its B pages in one."""
    shapes = page_shapes(weights.modules)
    plan = arena_plan(shapes, groups, weights.config.rank, page_rank)
    arena = torch.empty(arena_size(shapes, n, page_rank), dtype=dtype, pin_memory=pin)
    scale = weights.config.scale

    def store_b(b: torch.Tensor, out: torch.Tensor) -> None:
        # The product in float32 (as adapter_pages), rounded once as it is stored.
        torch.mul(b if b.dtype == torch.float32 else b.float(), scale, out=out)

    write_blocks(arena, weights.modules, plan, n, page_rank, store_b)
    return arena, shapes, plan


def page_shapes(modules: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> PageShapes:
    """(name, d_in, d_out) of each module, from its A (r, d_in) and B (d_out, r)."""
    return [(name, lora_a.shape[1], lora_b.shape[0]) for name, (lora_a, lora_b) in modules.items()]


def arena_size(shapes: PageShapes, n: int, page_rank: int) -> int:
    """Elements of the staging buffer: every module's n pages of A and of B."""
    return sum(n * page_rank * (d_in + d_out) for _, d_in, d_out in shapes)


def write_blocks(
    arena: torch.Tensor,
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
    plan: ArenaPlan,
    n: int,
    page_rank: int,
    store_b: Callable[[torch.Tensor, torch.Tensor], None],
) -> None:
    """Writes each module's A (r, d_in) and B (d_out, r) into `arena` as `plan` lays pages out:
    A rows as they are (rows past r zero), B's columns by page through `store_b(b, out)`, with
    b (entries, rows, n, page_rank) padded with zero columns and `out` the arena's view of
    those pages. Any dtype: lay_out writes values, device_layout element numbers."""
    if not modules:
        return
    rank = next(iter(modules.values()))[0].shape[0]  # A: (r, d_in)
    width = n * page_rank
    for block, a_all, b_all in plan_blocks(arena, plan, n, page_rank):
        names = (
            [name for members in block.groups for name in members]
            if isinstance(block, GroupBlock)
            else list(block.names)
        )
        # Each pass over an adapter's bytes costs a cold load milliseconds on a server core,
        # so every write below is also the conversion to the pages' dtype (cast on store).
        if isinstance(block, GroupBlock) and n > 1:  # rank == n * page_rank: no padding
            # (G, n, M, page_rank, d_in) is G * n * M page-rank slices of the members' A, in
            # (group, page, member) order.
            slices = [
                modules[name][0][p * page_rank : (p + 1) * page_rank]
                for members in block.groups
                for p in range(n)
                for name in members
            ]
            torch.stack(slices, out=a_all.view(-1, page_rank, block.d_in))
        else:
            a_rows = a_all.view(len(names), width, block.d_in)  # (modules, n * page_rank, d_in)
            torch.stack([modules[name][0] for name in names], out=a_rows[:, :rank])
            a_rows[:, rank:].zero_()
        if isinstance(block, GroupBlock):  # B: the members' rows in turn, per group
            b = torch.cat([modules[name][1] for name in names])  # (G * sum(d_out), r)
            b = b.view(len(block.groups), sum(block.d_outs), rank)  # (G, rows, r)
        else:
            b = torch.stack([modules[name][1] for name in names])  # (m, d_out, r)
        if rank < width:
            b = torch.nn.functional.pad(b, (0, width - rank))  # (entries, rows, width)
        # b_all[k, p, :, j] holds column p * page_rank + j of block entry k's B rows.
        store_b(b.view(*b.shape[:2], n, page_rank), b_all.permute(0, 2, 1, 3))
