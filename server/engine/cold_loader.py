"""Cold adapter loads off the engine thread: read, checksum, validate, lay out, copy to the device.

A device-tier miss used to read the adapter on the engine thread, so every running row waited
for a disk read, a checksum and a validation. Now the device pool asks this loader for a cold
adapter and the batch keeps decoding while a loader thread

1. reads it through the host tier (disk read, checksum and validation on a miss),
2. lays it out as the layers' pages (padding to whole pages, scale folded into B, the model's
   dtype) in ONE host buffer, pinned on CUDA (on a disk read while the checksum is still
   being computed: nothing staged is kept unless it matched); where a rank fits one page or
   fills its pages, each fully targeted fused group (q/k/v) already as the group's stacks
   hold pages, and
3. copies that buffer to the device in one copy (a rank whose last page is partial has its
   groups stacked there): on CUDA on the loader's own stream, with an event recorded after, so the
   copy overlaps the engine's forwards.

The result waits here, "staged", until the engine thread commits it into the adapter pages
between two forwards (`DevicePool`): a device-local copy, ordered after the event on the GPU, so
the engine never waits on the host. Page tables and page contents are only ever changed by the
engine thread, exactly as before.

Staged pages live outside the device page budget, so at most `max_pending` loads are in flight
or staged at once (staging memory is bounded by that many adapters). A failure is kept for a few
engine iterations for the requests waiting on it, then forgotten, so a later request retries.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from loraserve.adapters.weights import AdapterWeights
from loraserve.server.engine.compute_threads import helper_pool
from loraserve.server.engine.types import AdapterKey, EngineError, ErrorKind

log = logging.getLogger(__name__)

ReadAdapter = Callable[[AdapterKey], AdapterWeights]
"""Returns one adapter version's validated weights (host tier, else disk; raises EngineError)."""

ReadBeside = Callable[..., AdapterWeights]
"""ReadAdapter that also takes `beside_checksum=` (HostCache.get): on a read from disk it
calls that with the validated weights while their checksum is still being computed."""

FAILURE_TTL = 3
"""Engine iterations (`tick` calls) a load failure waits to be taken before it is forgotten."""


@dataclass(frozen=True)
class ColdLoadSettings:
    """How many cold loads run beside the engine."""

    workers: int = 2
    """Loader threads (reading and validating are CPU work)."""
    max_pending: int = 8
    """Loads in flight plus staged adapters not yet committed; bounds the staging memory."""


@dataclass(frozen=True)
class PageLayout:
    """Where and how the layers hold adapter pages."""

    page_rank: int
    dtype: torch.dtype
    device: torch.device
    groups: tuple[tuple[str, ...], ...] = ()
    """Module names of each fused group (LoRAGroup) of two or more members, in member order:
    an adapter that targets all of a group's members is also staged in the group's own
    layout (StagedAdapter.grouped), so its commit is two copies per group."""


@dataclass
class StagedAdapter:
    """A loaded adapter laid out as pages on the device, waiting to be committed."""

    key: AdapterKey
    rank: int
    host_nbytes: int
    """Bytes of its factors on the host (AdapterWeights.nbytes)."""
    numel: int
    """Elements of its factors (AdapterWeights.numel): times the pages' itemsize, its bytes on
    the device (pages' padding not counted)."""
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """Module name -> A pages (n, page_rank, d_in), B pages (n, d_out, page_rank), on the
    device, in the layers' dtype: views of `arena`."""
    seconds: float
    """How long reading and staging took."""
    grouped: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Group (PageLayout.groups) -> its members' A pages side by side (n, members, page_rank,
    d_in) and B pages stacked along d_out (n, sum(d_out), page_rank): the group's stacks'
    layout, for the groups whose members it all targets; views of `arena` where the rank
    fits one page or fills its pages (arena_plan), else stacked on the loader's stream."""
    arena: torch.Tensor | None = None
    """The one device buffer every page above is a view of, (total,)."""
    copied: torch.cuda.Event | None = None
    """Recorded on the loader's stream after the host-to-device copy (CUDA only)."""

    def copy_done(self) -> bool:
        """Whether the copy to the device has finished (never blocks)."""
        return self.copied is None or self.copied.query()

    def order_after_copy(self) -> None:
        """Makes the engine's current stream wait (on the GPU) for the copy, and tells the
        allocator the staging memory (the arena and the grouped pages, made on the loader's
        stream) is used there, so it is not reused too early."""
        if self.copied is None:
            return
        stream = torch.cuda.current_stream(self.copied.device)
        stream.wait_event(self.copied)
        if self.arena is not None:
            self.arena.record_stream(stream)
        for a, b in self.grouped.values():
            a.record_stream(stream)
            b.record_stream(stream)


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


def _plan_blocks(
    arena: torch.Tensor, plan: ArenaPlan, n: int, page_rank: int
) -> Iterator[tuple[GroupBlock | ShapeBlock, torch.Tensor, torch.Tensor]]:
    """Each block of `plan` with its A and B pages, views of `arena`: a GroupBlock's
    (G, n, M, page_rank, d_in) and (G, n, sum(d_outs), page_rank), a ShapeBlock's
    (m, n, page_rank, d_in) and (m, n, d_out, page_rank)."""
    offset = 0
    for block in plan:
        if isinstance(block, GroupBlock):
            count, members, d_out = len(block.groups), len(block.d_outs), sum(block.d_outs)
            a_shape = (count, n, members, page_rank, block.d_in)
        else:
            count, d_out = len(block.names), block.d_out
            a_shape = (count, n, page_rank, block.d_in)
        b_shape = (count, n, d_out, page_rank)
        a_size, b_size = math.prod(a_shape), math.prod(b_shape)
        a_all = arena[offset : offset + a_size].view(a_shape)
        b_all = arena[offset + a_size : offset + a_size + b_size].view(b_shape)
        yield block, a_all, b_all
        offset += a_size + b_size


def plan_views(
    arena: torch.Tensor, shapes: PageShapes, plan: ArenaPlan, n: int, page_rank: int
) -> tuple[ModulePages, GroupPages]:
    """Views of `arena` (total,): module name -> (A pages (n, page_rank, d_in), B pages
    (n, d_out, page_rank)) in module order, and each GroupBlock group -> its stacks' layout
    (StagedAdapter.grouped)."""
    modules: ModulePages = {}
    grouped: GroupPages = {}
    for block, a_all, b_all in _plan_blocks(arena, plan, n, page_rank):
        if isinstance(block, ShapeBlock):
            pairs = zip(a_all.unbind(0), b_all.unbind(0), strict=True)
            modules.update(zip(block.names, pairs, strict=True))
            continue
        for names, a_group, b_group in zip(block.groups, a_all, b_all, strict=True):
            grouped[names] = (a_group, b_group)  # (n, M, page, d_in), (n, sum(d_out), page)
            start = 0
            for j, (name, d_out) in enumerate(zip(names, block.d_outs, strict=True)):
                modules[name] = (a_group[:, j], b_group[:, start : start + d_out])
                start += d_out
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
    rank = weights.config.rank
    width = n * page_rank
    shapes: PageShapes = [
        (name, lora_a.shape[1], lora_b.shape[0])
        for name, (lora_a, lora_b) in weights.modules.items()
    ]
    plan = arena_plan(shapes, groups, rank, page_rank)
    total = sum(width * (d_in + d_out) for _, d_in, d_out in shapes)
    arena = torch.empty(total, dtype=dtype, pin_memory=pin)  # (total,)
    scale = weights.config.scale
    for block, a_all, b_all in _plan_blocks(arena, plan, n, page_rank):
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
                weights.modules[name][0][p * page_rank : (p + 1) * page_rank]
                for members in block.groups
                for p in range(n)
                for name in members
            ]
            torch.stack(slices, out=a_all.view(-1, page_rank, block.d_in))
        else:
            a_rows = a_all.view(len(names), width, block.d_in)  # (modules, n * page_rank, d_in)
            torch.stack([weights.modules[name][0] for name in names], out=a_rows[:, :rank])
            a_rows[:, rank:].zero_()
        if isinstance(block, GroupBlock):  # B: the members' rows in turn, per group
            b = torch.cat([weights.modules[name][1] for name in names])  # (G * sum(d_out), r)
            b = b.view(len(block.groups), sum(block.d_outs), rank)  # (G, rows, r)
        else:
            b = torch.stack([weights.modules[name][1] for name in names])  # (m, d_out, r)
        if b.dtype != torch.float32:
            b = b.float()
        if rank < width:
            b = torch.nn.functional.pad(b, (0, width - rank))  # (entries, rows, width)
        # b_all[k, p, :, j] holds column p * page_rank + j of block entry k's B rows, times
        # the scale: the product in float32 (as adapter_pages), rounded once as it is stored.
        torch.mul(b.view(*b.shape[:2], n, page_rank), scale, out=b_all.permute(0, 2, 1, 3))
    return arena, shapes, plan


def stage(
    key: AdapterKey,
    weights: AdapterWeights,
    layout: PageLayout,
    stream: torch.cuda.Stream | None,
    started: float,
) -> StagedAdapter:
    """Lays `weights` out as pages and copies them to the layout's device (on `stream`)."""
    rank = weights.config.rank
    n = max(1, -(-rank // layout.page_rank))
    pin = layout.device.type == "cuda"
    host, shapes, plan = lay_out(
        weights, layout.page_rank, n, layout.dtype, pin=pin, groups=layout.groups
    )
    copied: torch.cuda.Event | None = None
    if stream is None:
        # On the caller's stream, so ordered before what it does next with the pages (the
        # commit's copies); pinned, the copy does not block the caller.
        arena = host.to(layout.device, non_blocking=pin)
        modules, grouped = _device_views(arena, shapes, plan, n, layout)
    else:
        with torch.cuda.stream(stream):
            # A pinned source makes the copy asynchronous; the caching host allocator keeps
            # the pinned block alive until the copy has run.
            arena = host.to(layout.device, non_blocking=True)
            modules, grouped = _device_views(arena, shapes, plan, n, layout)
            copied = torch.cuda.Event(blocking=True)  # a waiting loader thread sleeps
            copied.record(stream)
    return StagedAdapter(
        key=key,
        rank=rank,
        host_nbytes=weights.nbytes,
        numel=weights.numel,
        modules=modules,
        seconds=time.monotonic() - started,
        arena=arena,
        copied=copied,
        grouped=grouped,
    )


def _device_views(
    arena: torch.Tensor, shapes: PageShapes, plan: ArenaPlan, n: int, layout: PageLayout
) -> tuple[ModulePages, GroupPages]:
    """The staged modules' and groups' pages on the device: views of `arena` where the plan
    laid a group out in its stacks' layout, stacked here (on the current stream) where it
    did not (a rank whose last page is partial)."""
    modules, grouped = plan_views(arena, shapes, plan, n, layout.page_rank)
    rest = tuple(names for names in layout.groups if names not in grouped)
    grouped.update(group_pages(modules, rest))
    return modules, grouped


def group_pages(modules: ModulePages, groups: tuple[tuple[str, ...], ...]) -> GroupPages:
    """Each fully targeted group's pages in its stacks' layout (StagedAdapter.grouped), made
    on the current stream: the stack and the concatenation the engine thread's commit would
    otherwise launch, two per group, between two forwards."""
    grouped: GroupPages = {}
    for names in groups:
        if all(name in modules for name in names):
            a = torch.stack([modules[name][0] for name in names], dim=1)  # (n, M, page, d_in)
            b = torch.cat([modules[name][1] for name in names], dim=1)  # (n, sum(d_out), page)
            grouped[names] = (a, b)
    return grouped


def read_and_stage(
    key: AdapterKey,
    read: ReadAdapter,
    read_beside: ReadBeside | None,
    layout: PageLayout,
    stream: torch.cuda.Stream | None,
    started: float,
) -> StagedAdapter:
    """Reads `key` and stages it. Through `read_beside` (when given) an adapter read from disk
    is laid out, and its copy to the device started, while its checksum is still computed;
    nothing staged leaves here unless the read returned (the checksum matched)."""
    early: list[StagedAdapter] = []
    if read_beside is None:
        weights = read(key)
    else:

        def stage_now(validated: AdapterWeights) -> None:
            early.append(stage(key, validated, layout, stream, started))

        weights = read_beside(key, beside_checksum=stage_now)
    if not early:  # a host-tier hit (or another thread's read) did not call stage_now
        return stage(key, weights, layout, stream, started)
    early[0].seconds = time.monotonic() - started  # the checksum's wait included
    return early[0]


class ColdLoader:
    """Loads cold adapters into device staging on background threads; thread-safe.

    The engine thread calls `start`, `take_staged`, `take_error`, `wait` and `tick`; `forget`
    may come from any thread (an adapter deleted over gRPC).
    """

    def __init__(
        self,
        read: ReadAdapter,
        layout: PageLayout,
        settings: ColdLoadSettings | None = None,
        *,
        read_beside: ReadBeside | None = None,
    ) -> None:
        """read_beside: reads instead of `read`, so that an adapter read from disk is laid out
        and its copy to the device started while its checksum is still computed (the staged
        pages are kept only once the read has returned, the checksum matched)."""
        self._read = read
        self._read_beside = read_beside
        self._layout = layout
        self._settings = settings or ColdLoadSettings()
        self._lock = threading.Lock()
        self._loading: dict[AdapterKey, Future[None]] = {}
        self._doomed: set[AdapterKey] = set()
        """Deleted while loading: the result is discarded when the load ends."""
        self._staged: dict[AdapterKey, StagedAdapter] = {}
        self._failed: dict[AdapterKey, tuple[EngineError, int]] = {}
        """Key -> (error, ticks left before it is forgotten)."""
        self._stream: torch.cuda.Stream | None = (
            torch.cuda.Stream(layout.device) if layout.device.type == "cuda" else None
        )
        self._pool = helper_pool("adapter-cold-load", max(1, self._settings.workers))

    def start(self, key: AdapterKey) -> bool:
        """Starts loading `key` unless it is loading, staged or failed; False when at capacity."""
        with self._lock:
            if key in self._loading or key in self._staged or key in self._failed:
                return True
            if len(self._loading) + len(self._staged) >= self._settings.max_pending:
                return False
            self._doomed.discard(key)
            self._loading[key] = self._pool.submit(self._load, key, time.monotonic())
            return True

    def loading(self, key: AdapterKey) -> bool:
        with self._lock:
            return key in self._loading

    def staged(self, key: AdapterKey) -> StagedAdapter | None:
        """The staged adapter, left in place (see `take_staged`)."""
        with self._lock:
            return self._staged.get(key)

    def staged_keys(self) -> list[AdapterKey]:
        with self._lock:
            return list(self._staged)

    def take_staged(self, key: AdapterKey) -> StagedAdapter | None:
        """Removes and returns the staged adapter (the engine commits it)."""
        with self._lock:
            return self._staged.pop(key, None)

    def put_back(self, staged: StagedAdapter) -> None:
        """Returns a staged adapter that could not be committed yet (no room)."""
        with self._lock:
            self._staged[staged.key] = staged

    def take_error(self, key: AdapterKey) -> EngineError | None:
        """The error the last load of `key` ended with, once (None if it did not fail)."""
        with self._lock:
            failed = self._failed.pop(key, None)
            return failed[0] if failed is not None else None

    def wait(self, key: AdapterKey) -> None:
        """Blocks until the load of `key` in flight (if any) has ended."""
        with self._lock:
            future = self._loading.get(key)
        if future is not None:
            future.result()  # _load never raises: outcomes are recorded, not thrown

    def pending(self) -> int:
        """Loads in flight plus staged adapters."""
        with self._lock:
            return len(self._loading) + len(self._staged)

    def tick(self) -> None:
        """One engine iteration passed: failures nobody took are forgotten after a few."""
        with self._lock:
            for key, (error, ticks) in list(self._failed.items()):
                if ticks <= 1:
                    del self._failed[key]
                else:
                    self._failed[key] = (error, ticks - 1)

    def forget(self, matches: Callable[[AdapterKey], bool]) -> None:
        """A deleted (or replaced) adapter: drop what is staged, discard what is loading."""
        with self._lock:
            for key in [k for k in self._staged if matches(k)]:
                del self._staged[key]
            self._doomed.update(k for k in self._loading if matches(k))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _load(self, key: AdapterKey, started: float) -> None:
        """Loader thread: read, validate, stage; records the outcome (never raises)."""
        staged: StagedAdapter | None = None
        error: EngineError | None = None
        try:
            staged = read_and_stage(
                key, self._read, self._read_beside, self._layout, self._stream, started
            )
            if self._stream is not None and staged.copied is not None:
                # Not a wait for the engine: this loader thread alone sleeps until its copies
                # are done, so the engine only ever sees a finished or nearly finished copy.
                staged.copied.synchronize()
        except EngineError as exc:
            error = exc
        except Exception as exc:
            log.exception("loading adapter %s/%s v%d failed", key.tenant, key.name, key.version)
            error = EngineError(ErrorKind.INTERNAL, f"adapter load failed: {exc}")
        with self._lock:
            del self._loading[key]
            if key in self._doomed:
                self._doomed.discard(key)
                staged, error = (
                    None,
                    EngineError(
                        ErrorKind.NOT_FOUND,
                        f"adapter {key.name!r} version {key.version} was deleted or replaced "
                        "while it was loading; retry",
                    ),
                )
            if error is not None:
                self._failed[key] = (error, FAILURE_TTL)
            elif staged is not None:
                self._staged[key] = staged
