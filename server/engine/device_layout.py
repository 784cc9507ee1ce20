"""Cold adapters laid out as pages on the device: one upload of the adapter as read, one gather.

Laid out on the host (page_plan.lay_out), a cold load costs the loader thread milliseconds of
CPU per adapter (on an H200's host 5.2 ms for the 1b model's rank-16 q/k/v/o adapter, beside a
4.5 ms validation; about a third of it Python holding the GIL the engine thread needs between
forwards). Where the pages live on a GPU, the loader instead copies the adapter's one buffer of
factors to the device as it was read (AdapterWeights.flat, in the file's dtype) and lays the
pages out there, with a handful of launches whatever the adapter's size:

    values   = [0, flat...] in float32                   (the upload, a conversion there)
    gathered = values[index]                             (one gather)
    gathered[B ranges] *= scale                          (one multiply per block)
    arena    = gathered in the pages' dtype              (one conversion)

`index` says, for every element of the staging buffer, which element of `flat` it holds (0:
padding, a zero). It depends only on the adapter's structure (names, shapes and places of its
factors, the rank: `layout_key`; not alpha) and the page layout, so it is computed once per
structure, by running the host layout's own block writes over element numbers instead of
values (so the two layouts cannot drift apart), and kept on the device, least recently used
first out under a byte budget.
An adapter whose index would not fit the budget, or whose factors are not views of one buffer,
is laid out on the host as before. The pages are bit for bit the host layout's: A rounded once
to the pages' dtype, B times the scale in float32, then rounded once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from loraserve.adapters.weights import AdapterStructure, AdapterWeights
from loraserve.server.engine.page_plan import (
    ArenaPlan,
    PageShapes,
    arena_plan,
    arena_size,
    block_spans,
    page_shapes,
    write_blocks,
)

DEFAULT_BUDGET_BYTES = 64 << 20
"""Device memory for the cached indexes (int32, 4 bytes per staged element): a 1B model's
rank-16 q/k/v/o structure takes 14 MB, a 7B model's about 55 MB."""


@dataclass(frozen=True)
class LayoutIndex:
    """Where one adapter structure's staged elements come from."""

    index: torch.Tensor
    """(total,) int32 on the device: 1 + the element of `flat` each staged element holds; 0
    for padding."""
    b_ranges: tuple[tuple[int, int], ...]
    """(start, end) of every block's B pages in the staging buffer (scaled)."""
    shapes: PageShapes
    plan: ArenaPlan
    structure: object
    """The structure it was made for: held, so that an id in the cache key (layout_key) stays
    that structure's while cached."""


class DeviceLayouts:
    """Lays adapters out on one device through indexes cached per structure; thread-safe (the
    cold loader's threads share it)."""

    def __init__(self, device: torch.device, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        self.device = device
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, LayoutIndex] = OrderedDict()
        self._bytes = 0
        self.builds = 0
        """Indexes computed (a cache miss each)."""

    def cached_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def lay_out(
        self,
        weights: AdapterWeights,
        page_rank: int,
        n: int,
        dtype: torch.dtype,
        groups: tuple[tuple[str, ...], ...] = (),
    ) -> tuple[torch.Tensor, PageShapes, ArenaPlan] | None:
        """The staging buffer (total,) in `dtype` on the device, as page_plan.lay_out makes
        it on the host, made on the current stream; None where this cannot (the caller lays
        out on the host)."""
        found = self._index(weights, page_rank, n, groups)
        if found is None:
            return None
        flat = weights.flat
        assert flat is not None
        if self.device.type == "cuda":
            # Made on whichever stream missed first, used on this one too: the allocator must
            # not hand its memory out again (after an eviction) before this use has run.
            found.index.record_stream(torch.cuda.current_stream(self.device))
        # Uploaded in its own dtype and converted on the device: a copy that converts as it
        # crosses converts on the host first, a pass over every byte on the loader's core.
        src = flat.to(self.device, non_blocking=True)  # (elements,) as read
        values = torch.empty(flat.numel() + 1, dtype=torch.float32, device=self.device)
        values[:1].zero_()  # what padding gathers
        values[1:].copy_(src)  # (elements,) float32
        gathered = values.index_select(0, found.index)  # (total,) float32
        scale = weights.config.scale
        for start, end in found.b_ranges:
            gathered[start:end].mul_(scale)
        return gathered.to(dtype), found.shapes, found.plan

    def _index(
        self,
        weights: AdapterWeights,
        page_rank: int,
        n: int,
        groups: tuple[tuple[str, ...], ...],
    ) -> LayoutIndex | None:
        if weights.flat is None or weights.structure is None or not weights.modules:
            return None
        key = (layout_key(weights.structure), page_rank, n, groups)
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
                return found
        shapes = page_shapes(weights.modules)
        total = arena_size(shapes, n, page_rank)
        nbytes = 4 * total
        if nbytes > self.budget_bytes or weights.flat.numel() + 1 >= 1 << 31:
            return None
        numbers = element_numbers(weights)
        if numbers is None:
            return None
        plan = arena_plan(shapes, groups, weights.config.rank, page_rank)
        arena = torch.empty(total, dtype=torch.int64)  # (total,) element numbers

        def copy_b(b: torch.Tensor, out: torch.Tensor) -> None:
            out.copy_(b)

        write_blocks(arena, numbers, plan, n, page_rank, copy_b)
        b_ranges = tuple((span.b_start, span.end) for span in block_spans(plan, n, page_rank))
        found = LayoutIndex(
            arena.to(torch.int32).to(self.device), b_ranges, shapes, plan, weights.structure
        )
        with self._lock:
            self.builds += 1
            old = self._cache.pop(key, None)
            if old is not None:
                self._bytes -= 4 * old.index.numel()
            self._cache[key] = found
            self._bytes += nbytes
            while self._bytes > self.budget_bytes:
                _, evicted = self._cache.popitem(last=False)
                self._bytes -= 4 * evicted.index.numel()
        return found


def layout_key(structure: object) -> Hashable:
    """What an adapter's staging layout follows from, given its structure: for an
    AdapterStructure, which tensor holds each module's factors and where each tensor lies in
    the buffer, and the rank (not the config's other fields: adapters that differ only in
    alpha share an index); for anything else, the object itself."""
    if isinstance(structure, AdapterStructure):
        return (structure.module_keys, structure.in_place, structure.config.rank)
    return ("object", id(structure))


def element_numbers(
    weights: AdapterWeights,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """Each factor as 1 + the numbers of its elements in `weights.flat` (int64, its shape);
    None unless every factor is a contiguous view of `flat`."""
    flat = weights.flat
    assert flat is not None
    storage, base = flat.untyped_storage().data_ptr(), flat.storage_offset()
    end = base + flat.numel()
    numbers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, factors in weights.modules.items():
        pair = []
        for factor in factors:
            start = factor.storage_offset()
            if (
                factor.untyped_storage().data_ptr() != storage
                or factor.dtype != flat.dtype
                or not factor.is_contiguous()
                or not base <= start <= end - factor.numel()
            ):
                return None
            first = 1 + start - base
            pair.append(torch.arange(first, first + factor.numel()).view(factor.shape))
        numbers[name] = (pair[0], pair[1])
    return numbers
