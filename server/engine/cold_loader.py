"""Cold adapter loads off the engine thread: read, checksum, validate, lay out, copy to the device.

A device-tier miss used to read the adapter on the engine thread, so every running row waited
for a disk read, a checksum and a validation. Now the device pool asks this loader for a cold
adapter and the batch keeps decoding while a loader thread

1. reads it through the host tier (disk read, checksum and validation on a miss),
2. lays it out as the layers' pages (padding to whole pages, scale folded into B, the model's
   dtype) in ONE buffer (on a disk read while the checksum is still being computed: nothing
   staged is kept unless it matched); where a rank fits one page or fills its pages, each
   fully targeted fused group (q/k/v) already as the group's stacks hold pages
   (server.engine.page_plan), and
3. has that buffer on the device: on a GPU laid out there, from one upload of the adapter as
   read (server.engine.device_layout), else laid out on the host (pinned on CUDA) and copied
   in one copy (a rank whose last page is partial has its groups stacked on the device); on
   CUDA on the loader's own stream, with an event recorded after, so it overlaps the engine's
   forwards.

The result waits here, "staged", until the engine thread commits it into the adapter pages
between two forwards (`DevicePool`): a device-local copy, ordered after the event on the GPU, so
the engine never waits on the host. Page tables and page contents are only ever changed by the
engine thread, exactly as before.

Staged pages live outside the device page budget, so at most `max_pending` loads are in flight
or staged at once (staging memory is bounded by that many adapters). A failure is kept for a few
engine iterations for the requests waiting on it, then forgotten, so a later request retries.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from loraserve.adapters.weights import AdapterWeights
from loraserve.server.engine.compute_threads import helper_pool
from loraserve.server.engine.device_layout import DeviceLayouts
from loraserve.server.engine.page_plan import (
    ArenaPlan,
    GroupPages,
    ModulePages,
    PageShapes,
    lay_out,
    plan_views,
)
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
    on_device: DeviceLayouts | None = field(default=None, compare=False)
    """Lays adapters out on the device (a GPU: DevicePool sets it), through indexes cached per
    adapter structure; None, or an adapter it cannot take, lays out on the host."""


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


def stage(
    key: AdapterKey,
    weights: AdapterWeights,
    layout: PageLayout,
    stream: torch.cuda.Stream | None,
    started: float,
) -> StagedAdapter:
    """Lays `weights` out as pages on the layout's device (on `stream`, else the caller's
    stream, so ordered before what it does next with the pages): on the device itself where
    `layout.on_device` can (one upload of the adapter as read, a gather), else on the host and
    copied over in one copy."""
    rank = weights.config.rank
    n = max(1, -(-rank // layout.page_rank))
    copied: torch.cuda.Event | None = None
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        laid = None
        if layout.on_device is not None:
            laid = layout.on_device.lay_out(
                weights, layout.page_rank, n, layout.dtype, layout.groups
            )
        if laid is not None:
            arena, shapes, plan = laid
        else:
            pin = layout.device.type == "cuda"
            host, shapes, plan = lay_out(
                weights, layout.page_rank, n, layout.dtype, pin=pin, groups=layout.groups
            )
            # A pinned source makes the copy asynchronous; the caching host allocator keeps
            # the pinned block alive until the copy has run.
            arena = host.to(layout.device, non_blocking=pin)
        modules, grouped = _device_views(arena, shapes, plan, n, layout)
        if stream is not None:
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
