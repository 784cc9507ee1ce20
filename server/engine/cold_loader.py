"""Cold adapter loads off the engine thread: read, checksum, validate, lay out, copy to the device.

A device-tier miss used to read the adapter on the engine thread, so every running row waited
for a disk read, a checksum and a validation. Now the device pool asks this loader for a cold
adapter and the batch keeps decoding while a loader thread

1. reads it through the host tier (disk read, checksum and validation on a miss),
2. lays it out as the layers' pages (padding to whole pages, scale folded into B, the model's
   dtype), and
3. copies the pages to the device: on CUDA from pinned memory on the loader's own stream, with
   an event recorded after the copy, so the copy overlaps the engine's forwards.

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
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from loraserve.adapters.weights import AdapterWeights
from loraserve.server.engine.compute_threads import helper_pool
from loraserve.server.engine.lora import adapter_pages
from loraserve.server.engine.types import AdapterKey, EngineError, ErrorKind

log = logging.getLogger(__name__)

ReadAdapter = Callable[[AdapterKey], AdapterWeights]
"""Returns one adapter version's validated weights (host tier, else disk; raises EngineError)."""

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


@dataclass
class StagedAdapter:
    """A loaded adapter laid out as pages on the device, waiting to be committed."""

    key: AdapterKey
    rank: int
    host_nbytes: int
    """Bytes of its float32 factors on the host (AdapterWeights.nbytes)."""
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """Module name -> A pages (n, page_rank, d_in), B pages (n, d_out, page_rank), on the
    device, in the layers' dtype."""
    seconds: float
    """How long reading and staging took."""
    copied: torch.cuda.Event | None = None
    """Recorded on the loader's stream after the host-to-device copies (CUDA only)."""

    def copy_done(self) -> bool:
        """Whether the copies to the device have finished (never blocks)."""
        return self.copied is None or self.copied.query()

    def order_after_copy(self) -> None:
        """Makes the engine's current stream wait (on the GPU) for the copies, and tells the
        allocator the staging memory is used there, so it is not reused too early."""
        if self.copied is None:
            return
        stream = torch.cuda.current_stream(self.copied.device)
        stream.wait_event(self.copied)
        for a_pages, b_pages in self.modules.values():
            a_pages.record_stream(stream)
            b_pages.record_stream(stream)


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
    host: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, (lora_a, lora_b) in weights.modules.items():
        host[name] = adapter_pages(
            lora_a, lora_b, weights.config.scale, layout.page_rank, n, layout.dtype
        )
    copied: torch.cuda.Event | None = None
    if stream is None:
        modules = {
            name: (a.to(layout.device), b.to(layout.device)) for name, (a, b) in host.items()
        }
    else:
        with torch.cuda.stream(stream):
            # Pinned sources make the copies asynchronous; the caching host allocator keeps
            # each pinned block alive until its copy has run.
            modules = {
                name: (
                    a.pin_memory().to(layout.device, non_blocking=True),
                    b.pin_memory().to(layout.device, non_blocking=True),
                )
                for name, (a, b) in host.items()
            }
            copied = torch.cuda.Event(blocking=True)  # a waiting loader thread sleeps
            copied.record(stream)
    return StagedAdapter(
        key=key,
        rank=rank,
        host_nbytes=weights.nbytes,
        modules=modules,
        seconds=time.monotonic() - started,
        copied=copied,
    )


class ColdLoader:
    """Loads cold adapters into device staging on background threads; thread-safe.

    The engine thread calls `start`, `take_staged`, `take_error`, `wait` and `tick`; `forget`
    may come from any thread (an adapter deleted over gRPC).
    """

    def __init__(
        self, read: ReadAdapter, layout: PageLayout, settings: ColdLoadSettings | None = None
    ) -> None:
        self._read = read
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
            weights = self._read(key)
            staged = stage(key, weights, self._layout, self._stream, started)
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
