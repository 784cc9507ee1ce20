"""Multi-LoRA linear layer: one shared W0 matmul for the whole batch plus each row's own B_i A_i x.

Adapter weights live in pages, as in S-LoRA's unified paging: a page holds `page_rank` rank rows
of A and the matching columns of B, so an adapter of rank r uses ceil(r / page_rank) pages and
device memory follows the adapters' actual ranks, not a maximum. Page 0 is all zeros.

Semantics (BGMV, as in Punica): for a batch of rows b whose adapter occupies pages P_b (padded
with page 0 to the batch's longest page list),

    y[b, t] = W0 x[b, t] (+ bias) + B[P_b] (A[P_b] x[b, t])

where A[P_b] is (len(P_b) * page_rank, d_in) and B[P_b] is (d_out, len(P_b) * page_rank), the
adapter's scale folded into B and unused rank rows zero (so padding adds exact zeros). Rows
without an adapter (the base model) have only page 0. The gather and two batched matmuls cost
the same whatever the number of distinct adapters in the batch: there is no Python loop over
adapters or rows in the hot path.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from loraserve.server.engine.device_copy import page_index, to_device


@dataclass(frozen=True)
class BatchLoRAState:
    """Which adapter pages each batch row uses, for the forward pass in progress."""

    page_table: torch.Tensor
    """(batch, max_pages) int64 on the model device: each row's pages, padded with page 0."""
    pages: frozenset[int]
    """The distinct non-zero pages in page_table, to skip layers no row's adapter touches."""
    gathered: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, compare=False, repr=False
    )
    """Per layer: (its write generation, each row's A (batch, rank, d_in), B (batch, d_out,
    rank)), gathered on the first forward and reused by every decode step of the same batch, so
    a step costs two batched matmuls per layer and no gathers. Rows' pages are pinned and do not
    change; the generation still guards against any page write in between."""


class PageCopies:
    """Copies into page stacks, gathered across layers and issued as one multi-tensor copy per
    dtype: the cold-load commit writes a whole adapter (a 1B model's q/k/v/o: 32 groups' two
    factors and live flags) in two or three kernel launches from the engine thread, where a
    copy per factor and group was about a hundred."""

    def __init__(self) -> None:
        self._lists: dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    def add(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Queues dst.copy_(src): one shape, dtype and device."""
        dsts, srcs = self._lists.setdefault(dst.dtype, ([], []))
        dsts.append(dst)
        srcs.append(src)

    def flush(self) -> None:
        """Issues the queued copies on the current stream."""
        for dsts, srcs in self._lists.values():
            torch._foreach_copy_(dsts, srcs)
        self._lists.clear()


class LoRAContext:
    """Per-forward routing shared by every MultiLoRALinear of one model.

    Only the engine thread runs forwards, and it sets `current` right before each one, so this
    carries per-batch data, never per-adapter global state.
    """

    def __init__(self) -> None:
        self.current: BatchLoRAState | None = None


def lora_delta_reference(
    x: torch.Tensor, factors: list[tuple[torch.Tensor, torch.Tensor] | None], d_out: int
) -> torch.Tensor:
    """Pure-torch ground truth of the low-rank term, row by row (slow, for tests).

    x: (batch, seq, d_in); factors[b]: row b's (A (r, d_in), B (d_out, r)) with the scale already
    in B, or None for no adapter. Returns (batch, seq, d_out).
    """
    out = x.new_zeros(x.shape[0], x.shape[1], d_out)  # (batch, seq, d_out)
    for b, pair in enumerate(factors):
        if pair is not None:
            a, bb = pair
            out[b] = (x[b] @ a.T) @ bb.T  # (seq, d_out)
    return out


def gather_rows(
    lora_a: torch.Tensor, lora_b: torch.Tensor, page_table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's factors from its pages.

    lora_a: (pages, page_rank, d_in); lora_b: (pages, d_out, page_rank); page_table: (batch, n).
    Returns A rows (batch, n * page_rank, d_in) and B rows (batch, d_out, n * page_rank).
    """
    batch, n = page_table.shape
    _, page_rank, d_in = lora_a.shape
    d_out = lora_b.shape[1]
    a_rows = lora_a[page_table].reshape(batch, n * page_rank, d_in)  # (batch, n * page, d_in)
    b_pages = lora_b[page_table]  # (batch, n, d_out, page)
    b_rows = b_pages.permute(0, 2, 1, 3).reshape(batch, d_out, n * page_rank)  # (b, d_out, n*page)
    return a_rows, b_rows


def lora_delta_bgmv(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, page_table: torch.Tensor
) -> torch.Tensor:
    """The gathered batched low-rank term; same semantics as lora_delta_reference.

    x: (batch, seq, d_in); lora_a: (pages, page_rank, d_in); lora_b: (pages, d_out, page_rank);
    page_table: (batch, n). Returns (batch, seq, d_out).
    """
    a_rows, b_rows = gather_rows(lora_a, lora_b, page_table)
    xa = torch.bmm(x, a_rows.transpose(1, 2))  # (batch, seq, rank)
    return torch.bmm(xa, b_rows.transpose(1, 2))  # (batch, seq, d_out)


class MultiLoRALinear(nn.Module):
    """Wraps a frozen nn.Linear or GPT-2 Conv1D with per-row adapters held in pages."""

    def __init__(self, base: nn.Module, *, context: LoRAContext) -> None:
        super().__init__()
        if isinstance(base, Conv1D):
            # Conv1D stores W0 as (d_in, d_out) and computes x @ W0 + b.
            self.in_features, self.out_features = base.weight.shape
        elif isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
        else:
            raise TypeError(f"cannot wrap {type(base).__name__}: not nn.Linear or Conv1D")
        self.base_layer = base
        self.context = context
        # Allocated on the first adapter that targets this layer: most adapters touch a subset.
        self.lora_a: torch.Tensor | None = None  # (num_pages + 1, page_rank, d_in)
        self.lora_b: torch.Tensor | None = None  # (num_pages + 1, d_out, page_rank)
        self.occupied: set[int] = set()
        """Pages holding this layer's part of some adapter."""
        self.generation = 0
        """Bumped on every page write, so gathered copies of old contents are never used."""
        self.group: LoRAGroup | None = None
        """Set when this projection is fused with others (own Llama forward): its page stacks
        are then views into the group's fused stacks."""

    def page_bytes(self, page_rank: int, itemsize: int) -> int:
        """Device bytes one page takes in this layer once allocated."""
        return page_rank * (self.in_features + self.out_features) * itemsize

    def write(
        self,
        pages: list[int],
        page_rank: int,
        num_pages: int,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scale: float,
    ) -> None:
        """Stores one adapter's A (r, d_in) and B (d_out, r) * scale in `pages` (in order)."""
        weight = self.base_layer.weight
        a_pages, b_pages = adapter_pages(lora_a, lora_b, scale, page_rank, len(pages), weight.dtype)
        self.write_pages(pages, num_pages, a_pages.to(weight.device), b_pages.to(weight.device))

    def write_pages(
        self,
        pages: list[int],
        num_pages: int,
        a_pages: torch.Tensor,
        b_pages: torch.Tensor,
        index: torch.Tensor | None = None,
    ) -> None:
        """Copies ready-made pages (see `adapter_pages`), already on this layer's device and in
        its dtype, into `pages`: one index_copy per factor (the cold-load commit).

        a_pages: (len(pages), page_rank, d_in); b_pages: (len(pages), d_out, page_rank).
        index: `pages` as an int64 tensor on this layer's device, (len(pages),); the device pool
        builds it once per adapter for every layer, because building it here costs a blocking
        host-to-device copy per layer on the engine thread.
        """
        page_rank = a_pages.shape[1]
        self._ensure_capacity(max(pages), page_rank, num_pages)
        assert self.lora_a is not None and self.lora_b is not None
        if index is None or index.device != self.lora_a.device:
            index = page_index(pages, self.lora_a.device)  # (n,)
        self.lora_a.index_copy_(0, index, a_pages)
        self.lora_b.index_copy_(0, index, b_pages)
        self.occupied.update(pages)
        self.generation += 1
        if self.group is not None:
            self.group.sync_live(pages, index)

    def write_run(
        self,
        first: int,
        num_pages: int,
        a_pages: torch.Tensor,
        b_pages: torch.Tensor,
        copies: PageCopies,
    ) -> None:
        """write_pages into the consecutive pages first, first + 1, ...: one slice per factor,
        queued on `copies` (the cold-load commit issues every layer's at once). An unfused
        layer's (a group's members are written through the group)."""
        assert self.group is None, "a group's members are written through the group"
        n = a_pages.shape[0]
        self._ensure_capacity(first + n - 1, a_pages.shape[1], num_pages)
        assert self.lora_a is not None and self.lora_b is not None
        copies.add(self.lora_a[first : first + n], a_pages)  # (n, page_rank, d_in)
        copies.add(self.lora_b[first : first + n], b_pages)  # (n, d_out, page_rank)
        self.occupied.update(range(first, first + n))
        self.generation += 1

    def _ensure_capacity(self, page: int, page_rank: int, num_pages: int) -> None:
        """Grows the page stacks (doubling, up to the pool's pages) so `page` fits.

        Memory follows the pages in use rather than the whole budget; growing copies adapter
        weights only, never KV, and bumps the generation so no stale gather survives.
        """
        if self.group is not None:
            self.group.ensure_capacity(page, page_rank, num_pages)
            return
        have = 0 if self.lora_a is None else self.lora_a.shape[0]
        if page < have:
            return
        size = min(max(page + 1, 2 * have, 8), num_pages + 1)
        weight = self.base_layer.weight
        new_a = torch.zeros(
            (size, page_rank, self.in_features), dtype=weight.dtype, device=weight.device
        )  # (size, page_rank, d_in)
        new_b = torch.zeros(
            (size, self.out_features, page_rank), dtype=weight.dtype, device=weight.device
        )  # (size, d_out, page_rank)
        if self.lora_a is not None and self.lora_b is not None:
            new_a[:have].copy_(self.lora_a)
            new_b[:have].copy_(self.lora_b)
        self.lora_a, self.lora_b = new_a, new_b
        self.generation += 1

    def clear(self, pages: list[int]) -> None:
        """Zeroes `pages` so rows routed to them get exactly the base output."""
        touched = self.forget_pages(pages)
        if not touched:
            return
        assert self.lora_a is not None and self.lora_b is not None
        for page in touched:
            self.lora_a[page].zero_()
            self.lora_b[page].zero_()
        if self.group is not None:
            self.group.sync_live(touched)

    def forget_pages(self, pages: list[int]) -> list[int]:
        """clear's bookkeeping alone: the pages of `pages` this layer held, which it no longer
        does (returned in `pages`' order); their contents stay until zero_pages. (The device
        pool skips zeroing pages an eviction hands straight to an adapter that overwrites them
        whole.) An unfused layer's; a group's members are cleared through the group."""
        touched = [p for p in pages if p in self.occupied]
        if touched:
            self.occupied.difference_update(touched)
            self.generation += 1
        return touched

    def zero_pages(self, index: torch.Tensor) -> None:
        """Zeroes the pages in `index` ((n,) int64 on this layer's device): forget_pages'
        device half, one fill per factor."""
        if self.lora_a is not None and self.lora_b is not None:
            self.lora_a.index_fill_(0, index, 0)
            self.lora_b.index_fill_(0, index, 0)

    def release_memory(self) -> None:
        """Frees the page stacks when no page is occupied any more."""
        if self.group is not None:
            self.group.release_memory()
            return
        if not self.occupied:
            self.lora_a = None
            self.lora_b = None

    def allocated_bytes(self) -> int:
        if self.lora_a is None or self.lora_b is None:
            return 0
        # numel, not nbytes of the storage: a grouped layer's stacks are views of a fused stack.
        return (self.lora_a.numel() + self.lora_b.numel()) * self.lora_a.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, seq, d_in) -> (batch, seq, d_out)."""
        y = self.base_layer(x)  # (batch, seq, d_out)
        state = self.context.current
        if state is None or self.occupied.isdisjoint(state.pages):
            return y
        assert self.lora_a is not None and self.lora_b is not None
        cached = state.gathered.get(id(self))
        if cached is None or cached[0] != self.generation:
            # Pages past this layer's stack belong to adapters that do not target it: zeros.
            table = state.page_table
            table = table.masked_fill(table >= self.lora_a.shape[0], 0)  # (batch, n)
            a, b = gather_rows(self.lora_a, self.lora_b, table)
            cached = (self.generation, a, b)
            state.gathered[id(self)] = cached
        _, a_rows, b_rows = cached  # (batch, rank, d_in), (batch, d_out, rank)
        xa = torch.bmm(x.to(a_rows.dtype), a_rows.transpose(1, 2))  # (batch, seq, rank)
        if y.dtype == xa.dtype:
            # y += xa @ B^T in one kernel.
            return torch.baddbmm(y, xa, b_rows.transpose(1, 2))  # (batch, seq, d_out)
        return y + torch.bmm(xa, b_rows.transpose(1, 2)).to(y.dtype)


def adapter_pages(
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    page_rank: int,
    n: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One adapter's factors laid out as `n` pages, on the factors' device (the host).

    lora_a: (r, d_in); lora_b: (d_out, r). Returns A pages (n, page_rank, d_in) and B pages
    (n, d_out, page_rank) in `dtype`, scale folded into B, rank rows past r zero.
    """
    rank, d_in = lora_a.shape
    d_out = lora_b.shape[0]
    block_a = torch.zeros(n * page_rank, d_in, dtype=dtype)  # (n * page, d_in)
    block_a[:rank] = lora_a.to(dtype)
    block_b = torch.zeros(d_out, n * page_rank, dtype=dtype)  # (d_out, n * page)
    block_b[:, :rank] = (lora_b.float() * scale).to(dtype)
    a_pages = block_a.view(n, page_rank, d_in)  # (n, page, d_in)
    b_pages = block_b.view(d_out, n, page_rank).permute(1, 0, 2)  # (n, d_out, page)
    return a_pages, b_pages.contiguous()


def is_lora_target(module: nn.Module) -> bool:
    """True for layers loraserve can wrap: nn.Linear and GPT-2's Conv1D."""
    return isinstance(module, (nn.Linear, Conv1D))


class LiveIndex:
    """Which pages hold an adapter in SOME group of each kind (all layers' "qkv", "o", ...).

    A step whose rows' pages are live in no group of a kind can skip that kind's adapter term
    outright, in every layer: an adapter of q/k/v/o leaves the MLP's groups empty, and their
    kernels (or, on CPU, gathers and matmuls) would add only zeros. Kept by LoRAGroup.sync_live
    on every page write and clear; read once per step (a few set lookups per page).
    """

    def __init__(self) -> None:
        self._groups: dict[str, dict[int, int]] = {}
        """kind -> page -> how many groups of that kind hold the page."""

    def update(self, kind: str, page: int, was_live: bool, live: bool) -> None:
        counts = self._groups.setdefault(kind, {})
        if live and not was_live:
            counts[page] = counts.get(page, 0) + 1
        elif was_live and not live:
            left = counts[page] - 1
            if left:
                counts[page] = left
            else:
                del counts[page]

    def kinds_for(self, pages: Iterable[int]) -> frozenset[str]:
        """The kinds where at least one of `pages` is live in at least one group."""
        wanted = set(pages)
        return frozenset(k for k, counts in self._groups.items() if not wanted.isdisjoint(counts))


MemberPages = tuple[MultiLoRALinear, torch.Tensor, torch.Tensor]
"""(member, A pages (n, page_rank, d_in), B pages (n, d_out, page_rank)): one adapter's pages
for one projection of a LoRAGroup, ready to copy (LoRAGroup.write_pages)."""


class LoRAGroup:
    """The page stacks of projections that share one input and run as one fused matmul.

    q/k/v (and gate/up) read the same x, so their adapters run as ONE shrink and ONE expand:

        a: (pages, members, page_rank, d_in)    each member's A pages side by side
        b: (pages, sum(d_out), page_rank)       each member's B pages stacked along d_out

    Each member MultiLoRALinear's `lora_a` / `lora_b` are views into these, so the device
    pool writes and clears pages per target module exactly as for unfused layers. `reserve`
    allocates every page up front and keeps the stacks at fixed addresses (CUDA graphs read
    them); otherwise they grow on demand and are freed when empty, like an unfused layer.
    """

    def __init__(
        self, members: list[MultiLoRALinear], *, kind: str = "", index: LiveIndex | None = None
    ) -> None:
        """kind / index: this group's kind ("qkv", "o", ...) in the model's LiveIndex, which
        then learns of every page this group's live flag turns on or off."""
        self.members = members
        self.kind = kind
        self.index = index
        self.live_pages: set[int] = set()
        """Host copy of the pages `live` flags (the LiveIndex counts from it)."""
        self.d_in = members[0].in_features
        self.outs = [m.out_features for m in members]
        self.a: torch.Tensor | None = None  # (pages, members, page_rank, d_in)
        self.b: torch.Tensor | None = None  # (pages, sum(outs), page_rank)
        self._ones: torch.Tensor | None = None
        """(pages,) int32 ones on the stacks' device: what write_run copies into live flags."""
        self.live: torch.Tensor | None = None
        """(pages,) int32 on the stacks' device: 1 where some member holds that page. The
        kernels skip other pages: an adapter that targets q/k/v/o leaves the MLP groups' pages
        of the same number empty, and those rows then cost the MLP nothing."""
        self.reserved = False
        self._gathered: tuple[object, torch.Tensor, list[torch.Tensor]] | None = None
        """(reuse key and page versions, A^T, each member's B^T) of the last keyed gather."""
        weight = members[0].base_layer.weight
        segment = [j for j, out in enumerate(self.outs) for _ in range(out)]
        # (sum(outs),) member index of each fused output column, for the expand's selection.
        self.segment = torch.tensor(segment, dtype=torch.long, device=weight.device)
        for member in members:
            member.group = self

    @property
    def occupied(self) -> bool:
        return any(m.occupied for m in self.members)

    def reserve(self, num_pages: int, page_rank: int) -> None:
        """Allocates all `num_pages` (+ the zero page) now and never moves or frees them."""
        if self.reserved:
            return
        self.ensure_capacity(num_pages, page_rank, num_pages)
        self.reserved = True

    def ensure_capacity(self, page: int, page_rank: int, num_pages: int) -> None:
        have = 0 if self.a is None else self.a.shape[0]
        if page < have:
            return
        assert not self.reserved, "a reserved group holds every page already"
        size = min(max(page + 1, 2 * have, 8), num_pages + 1)
        weight = self.members[0].base_layer.weight
        new_a = torch.zeros(
            (size, len(self.members), page_rank, self.d_in),
            dtype=weight.dtype,
            device=weight.device,
        )  # (size, members, page_rank, d_in)
        new_b = torch.zeros(
            (size, sum(self.outs), page_rank), dtype=weight.dtype, device=weight.device
        )  # (size, sum(outs), page_rank)
        new_live = torch.zeros(size, dtype=torch.int32, device=weight.device)  # (size,)
        if self.a is not None and self.b is not None and self.live is not None:
            new_a[:have].copy_(self.a)
            new_b[:have].copy_(self.b)
            new_live[:have].copy_(self.live)
        self.a, self.b, self.live = new_a, new_b, new_live
        self._ones = torch.ones_like(new_live)  # (size,)
        self._point_members()

    def write_pages(
        self,
        pages: list[int],
        num_pages: int,
        parts: list[MemberPages],
        index: torch.Tensor,
        stacked: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Copies one adapter's ready-made pages for some of this group's members into
        `pages`: what each member's `write_pages` does, in fewer device ops (the cold-load
        commit runs on the engine thread between two forwards, once per group of every layer).

        parts: each member once, on the stacks' device and dtype; index: `pages` on that
        device, (n,). stacked: every member's pages already in the stacks' layout, (n,
        members, page_rank, d_in) and (n, sum(outs), page_rank) (the cold loader makes them on
        its stream), so nothing is stacked here. With every member present (or one alone)
        both factors go in one index_copy each; the members' pages of an adapter that skips
        some of them are written member by member.
        """
        page_rank = parts[0][1].shape[1]
        self.ensure_capacity(max(pages), page_rank, num_pages)
        assert self.a is not None and self.b is not None
        given = {id(member): (a, b) for member, a, b in parts}
        if stacked is not None:
            self.a.index_copy_(0, index, stacked[0])
            self.b.index_copy_(0, index, stacked[1])
        elif len(self.members) == 1:
            a, b = given[id(self.members[0])]
            self.a.index_copy_(0, index, a.unsqueeze(1))  # (n, 1, page_rank, d_in)
            self.b.index_copy_(0, index, b)
        elif len(given) == len(self.members):
            ordered = [given[id(m)] for m in self.members]
            # (n, members, page_rank, d_in) and (n, sum(outs), page_rank): the stacks' layout.
            self.a.index_copy_(0, index, torch.stack([a for a, _ in ordered], dim=1))
            self.b.index_copy_(0, index, torch.cat([b for _, b in ordered], dim=1))
        else:
            for member, a, b in parts:
                assert member.lora_a is not None and member.lora_b is not None
                member.lora_a.index_copy_(0, index, a)
                member.lora_b.index_copy_(0, index, b)
        for member, _, _ in parts:
            member.occupied.update(pages)
            # A plain attribute: straight to the instance dict, past nn.Module.__setattr__'s
            # type checks (a fifth of this commit's host time across a 1B model's 64 members).
            vars(member)["generation"] += 1
        self.sync_live(pages, index)

    def write_run(
        self,
        first: int,
        num_pages: int,
        parts: list[MemberPages],
        stacked: tuple[torch.Tensor, torch.Tensor] | None,
        copies: PageCopies,
    ) -> None:
        """write_pages into the consecutive pages first, first + 1, ...: one slice per factor
        and one for the live flags, queued on `copies`. Every member's pages must come whole:
        `stacked` (the cold loader's, see write_pages), or the one member's own."""
        n, page_rank = parts[0][1].shape[0], parts[0][1].shape[1]
        self.ensure_capacity(first + n - 1, page_rank, num_pages)
        assert self.a is not None and self.b is not None and self.live is not None
        if stacked is None:
            assert len(self.members) == 1 and len(parts) == 1, "a run writes a group whole"
            stacked = (parts[0][1].unsqueeze(1), parts[0][2])  # (n, 1, page_rank, d_in), B
        copies.add(self.a[first : first + n], stacked[0])  # (n, members, page_rank, d_in)
        copies.add(self.b[first : first + n], stacked[1])  # (n, sum(outs), page_rank)
        pages = range(first, first + n)
        for member, _, _ in parts:
            member.occupied.update(pages)
            vars(member)["generation"] += 1  # past nn.Module.__setattr__, as in write_pages
        # Every member now holds every page of the run: all live, no per-page member scan.
        for page in pages:
            if page not in self.live_pages:
                self.live_pages.add(page)
                if self.index is not None:
                    self.index.update(self.kind, page, False, True)
        copies.add(self.live[first : first + n], self._ones[:n])  # (n,) int32

    def clear_pages(self, pages: list[int], index: torch.Tensor) -> None:
        """Zeroes one adapter's `pages` in every member (an eviction or a delete), as each
        member's `clear` does, in one index_fill per factor and one live-flag update.

        index: `pages` on the stacks' device, (n,). A page belongs to one adapter in every
        layer, so the members it never targeted hold zeros there already."""
        cleared = self.forget_pages(pages)
        if not cleared:
            return
        assert self.a is not None
        if len(cleared) != len(pages):
            index = page_index(cleared, self.a.device)  # (n,)
        self.zero_pages(index)

    def forget_pages(self, pages: list[int]) -> list[int]:
        """clear_pages' bookkeeping alone (the members' occupancy and generations, the live
        pages and index): returns the pages of `pages` some member held, in `pages`' order,
        whose contents and live flags stay until zero_pages."""
        touched = [m for m in self.members if not m.occupied.isdisjoint(pages)]
        if not touched:
            return []
        cleared = [p for p in pages if any(p in m.occupied for m in touched)]  # pages' order
        for member in touched:
            member.occupied.difference_update(cleared)
            vars(member)["generation"] += 1  # past nn.Module.__setattr__, as in write_pages
        if self.live is not None:
            self._note_live(cleared)
        return cleared

    def zero_pages(self, index: torch.Tensor) -> None:
        """Zeroes pages no member holds any more, and their live flags (forget_pages' device
        half). index: the pages on the stacks' device, (n,)."""
        if self.a is None or self.b is None or self.live is None:
            return
        self.a.index_fill_(0, index, 0)
        self.b.index_fill_(0, index, 0)
        self.live.index_fill_(0, index, 0)

    def sync_live(self, pages: list[int], index: torch.Tensor | None = None) -> None:
        """Sets `live` for `pages` from the members' occupancy (after a write or a clear), on
        the current stream, so a step after the write sees the flag the write implies.
        index: `pages` already on the device (a page write has it), to save a copy."""
        if self.live is None or not pages:
            return
        flags = self._note_live(pages)
        if index is None:
            index = page_index(pages, self.live.device)  # (n,)
        if len(set(flags)) == 1:  # the usual case: a whole adapter written or cleared
            self.live.index_fill_(0, index, flags[0])
        else:
            values = to_device(torch.tensor(flags, dtype=torch.int32), self.live.device)  # (n,)
            self.live.index_copy_(0, index, values)

    def _note_live(self, pages: list[int]) -> list[int]:
        """sync_live's host half: the live pages and the model's LiveIndex follow the members'
        occupancy of `pages`; returns each page's flag."""
        flags = [int(any(p in m.occupied for m in self.members)) for p in pages]
        for page, flag in zip(pages, flags, strict=True):
            was = page in self.live_pages
            if self.index is not None:
                self.index.update(self.kind, page, was, bool(flag))
            if flag:
                self.live_pages.add(page)
            else:
                self.live_pages.discard(page)
        return flags

    def _point_members(self) -> None:
        offset = 0
        for j, member in enumerate(self.members):
            if self.a is None or self.b is None:
                member.lora_a = member.lora_b = None
            else:
                member.lora_a = self.a[:, j]  # (pages, page_rank, d_in) view
                member.lora_b = self.b[:, offset : offset + member.out_features]  # view
            offset += member.out_features
            member.generation += 1

    def release_memory(self) -> None:
        if not self.reserved and not self.occupied:
            self.a = self.b = self.live = self._ones = None
            self._gathered = None
            self._point_members()

    def delta(
        self, x: torch.Tensor, page_table: torch.Tensor, reuse_key: object = None
    ) -> torch.Tensor:
        """The fused low-rank term of every member. x: (batch, seq, d_in) -> (batch, seq, O).

        page_table: (batch, n) each row's pages (0-padded). One shrink bmm for all members,
        then one expand bmm per member over its own rank columns (no wasted output columns),
        concatenated; same semantics as lora_delta_reference per member. reuse_key (CPU
        decode): the gathered factors are kept and reused while the key and the pages'
        contents stay the same, as on the generic path; on a GPU the kernels read the pages in
        place and nothing is kept.
        """
        a_t, b_parts = self._factors(page_table, reuse_key)
        xa = torch.bmm(x.to(a_t.dtype), a_t)  # (batch, seq, members * n * page)
        width = xa.shape[-1] // len(b_parts)  # n * page rank columns per member
        parts = [
            torch.bmm(xa[..., j * width : (j + 1) * width], b)  # (batch, seq, O_j)
            for j, b in enumerate(b_parts)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def _factors(
        self, page_table: torch.Tensor, reuse_key: object
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Each row's shrink factor A^T (batch, d_in, members * n * page), its columns member by
        member, and each member's expand factor B_j^T (batch, n * page, O_j), all contiguous:
        laid out once per batch so the decode steps' bmms read them straight."""
        assert self.a is not None and self.b is not None
        version = (reuse_key, tuple(m.generation for m in self.members))
        if reuse_key is not None and self._gathered is not None and self._gathered[0] == version:
            return self._gathered[1], self._gathered[2]
        batch, n = page_table.shape
        members, page_rank = self.a.shape[1], self.a.shape[2]
        table = page_table.masked_fill(page_table >= self.a.shape[0], 0)  # (batch, n)
        a = self.a[table]  # (batch, n, members, page, d_in)
        a_t = a.permute(0, 4, 2, 1, 3).reshape(batch, self.d_in, members * n * page_rank)
        a_t = a_t.contiguous()  # one member on one page reshapes to a transposed view
        b = self.b[table]  # (batch, n, O, page)
        b_parts: list[torch.Tensor] = []
        offset = 0
        for width in self.outs:
            b_j = b[:, :, offset : offset + width].permute(0, 1, 3, 2)  # (batch, n, page, O_j)
            b_parts.append(b_j.reshape(batch, n * page_rank, width))
            offset += width
        self._gathered = (version, a_t, b_parts) if reuse_key is not None else None
        return a_t, b_parts
