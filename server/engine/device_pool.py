"""Device tier of the adapter cache: adapter weights in fixed-size pages, a budget in bytes.

An adapter of rank r takes ceil(r / page_rank) pages, so the budget buys many small adapters or
fewer large ones. An adapter in use by a running request is pinned and never evicted; unpinned
adapters stay loaded (warm) until their pages are needed or the adapter is deleted, then the
least recently used go first. Page 0 is reserved as the all-zero "no adapter" page.

An operator can also *hold* an adapter (PinAdapter, `--preload`): it is loaded and kept resident
however long nobody uses it. Held pages count against the budget: a hold is refused when the
held adapters would exceed it, and a request whose adapter cannot fit beside the held ones is
refused rather than queued forever.

Cold adapters load off the engine thread (server.engine.cold_loader): the scheduler calls
`request(key)` for a request whose adapter is not resident, keeps decoding the running rows, and
admits the request once `ready(key)`; a failed load is reported by `take_error(key)`. Only
committing a loaded adapter into its pages (a device-local copy) happens on the engine thread,
between forwards. `acquire` of an adapter nobody requested still loads it in the calling
thread, which an idle engine does (nothing else would run meanwhile).

Every running row waits while the engine thread commits, so a commit launches as little as it
can: an adapter's pages are taken in order, and into consecutive pages (the usual case) every
layer's factors and live flags go as slices in one multi-tensor copy per dtype; an eviction for
room leaves zeroing to the commit, which zeroes only what the new adapter will not overwrite.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from loraserve.adapters.weights import AdapterWeights
from loraserve.server.engine.accounting import EngineObserver
from loraserve.server.engine.cold_loader import (
    ColdLoader,
    ColdLoadSettings,
    PageLayout,
    ReadBeside,
    StagedAdapter,
    read_and_stage,
)
from loraserve.server.engine.device_copy import page_index
from loraserve.server.engine.device_layout import DeviceLayouts
from loraserve.server.engine.lora import LoRAGroup, MemberPages, MultiLoRALinear, PageCopies
from loraserve.server.engine.types import (
    AdapterKey,
    AdapterRef,
    EngineError,
    ErrorKind,
    forgotten_versions,
)

AdapterLoader = Callable[[AdapterKey], AdapterWeights]
"""Returns one adapter version's validated weights (host tier, else disk; raises EngineError)."""
AdapterResolver = Callable[[AdapterRef], AdapterKey]
"""The current version of a named adapter (raises EngineError NOT_FOUND)."""

DEFAULT_PAGE_RANK = 8


@dataclass(frozen=True)
class Placement:
    """Where an adapter sits on the device."""

    pages: tuple[int, ...]
    rank: int


@dataclass
class _Entry:
    key: AdapterKey
    placement: Placement
    nbytes: int
    """Device bytes of the adapter's own factors (what the tenant is billed for)."""
    pins: int = 0
    """Running requests using it."""
    held: bool = False
    """Kept resident by an operator (PinAdapter, --preload): never evicted until released."""
    doomed: bool = False
    """Deleted from the store: free the pages as soon as the last pin is released."""

    @property
    def evictable(self) -> bool:
        return self.pins == 0 and not self.held


PageOwner = MultiLoRALinear | LoRAGroup
"""What holds page stacks: an unfused layer, or a fused group for all its members."""


OwnerNames = tuple[str, ...]
"""The module names an owner holds pages of, in member order ("" for a member outside the
pool's layers: a name no adapter has)."""

Stale = dict[int, tuple[PageOwner, OwnerNames, list[int]]]
"""id(owner) -> (owner, its names, victims' pages it held): an eviction's zeroing, left to the
commit that evicted (DevicePool._commit_locked)."""


def page_owners(layers: dict[str, MultiLoRALinear]) -> list[tuple[PageOwner, OwnerNames]]:
    """Every unfused layer and every group once, each with the module names it holds pages of."""
    names = {id(layer): name for name, layer in layers.items()}
    owners: list[tuple[PageOwner, OwnerNames]] = []
    seen: set[int] = set()
    for name, layer in layers.items():
        group = layer.group
        if group is None:
            owners.append((layer, (name,)))
        elif id(group) not in seen:
            seen.add(id(group))
            owners.append((group, tuple(names.get(id(m), "") for m in group.members)))
    return owners


def fused_groups(layers: dict[str, MultiLoRALinear]) -> tuple[OwnerNames, ...]:
    """Module names of each LoRAGroup of two or more members among `layers`, in member order
    (PageLayout.groups); a group with a member outside `layers` is left out."""
    return tuple(
        names
        for owner, names in page_owners(layers)
        if isinstance(owner, LoRAGroup) and len(names) > 1 and "" not in names
    )


class DevicePool:
    """Maps adapter versions to device pages; pins, LRU eviction, byte budget.

    Called from the engine thread, except `forget`, `tick` and the read-only views, which may
    come from any thread (hence the lock). Page writes happen only on the engine thread, between
    forward passes; cold loads run on the cold loader's threads until then.
    """

    def __init__(
        self,
        layers: dict[str, MultiLoRALinear],
        *,
        budget_bytes: int,
        loader: AdapterLoader,
        page_rank: int = DEFAULT_PAGE_RANK,
        observer: EngineObserver | None = None,
        cold: ColdLoadSettings | None = None,
        cold_read: ReadBeside | None = None,
    ) -> None:
        """cold_read: what loads read through instead of `loader` (background ones and an
        idle engine's own), when it can lay an adapter read from disk out beside its checksum
        (HostCache.get)."""
        self._layers = layers
        self._loader = loader
        self._observer = observer or EngineObserver()
        self.page_rank = page_rank
        first = next(iter(layers.values()), None)
        weight = first.base_layer.weight if first is not None else torch.empty(0)
        self._itemsize = weight.element_size()
        self._layout = PageLayout(
            page_rank=page_rank,
            dtype=weight.dtype,
            device=weight.device,
            groups=fused_groups(layers),
            # On a GPU the pages are laid out there: a gather in a few launches where the host
            # layout cost the loader thread milliseconds of CPU (server.engine.device_layout).
            on_device=DeviceLayouts(weight.device) if weight.device.type == "cuda" else None,
        )
        self.page_bytes = sum(
            layer.page_bytes(page_rank, self._itemsize) for layer in layers.values()
        )
        self.num_pages = budget_bytes // self.page_bytes if self.page_bytes else 0
        if self.num_pages < 1:
            raise ValueError(
                f"adapter device budget of {budget_bytes} bytes holds no page "
                f"({self.page_bytes} bytes each for this model)"
            )
        self._free: list[int] = list(range(self.num_pages, 0, -1))
        self._owners = page_owners(layers)
        self._group_names = {
            id(owner): names for owner, names in self._owners if isinstance(owner, LoRAGroup)
        }
        """id(LoRAGroup) -> its members' module names (the key of StagedAdapter.grouped)."""
        # Unpinned adapters, least recently used first; pinned ones are not in it.
        self._lru: OrderedDict[AdapterKey, None] = OrderedDict()
        self._entries: dict[AdapterKey, _Entry] = {}
        self._lock = threading.Lock()
        self._last_tick = time.monotonic()
        self._loading: AdapterKey | None = None
        """The adapter `acquire` is loading outside the lock (the engine thread loads one at a
        time), so a concurrent `forget` can doom it before it lands."""
        self._loading_doomed = False
        self._read_beside = cold_read
        self._cold = ColdLoader(loader, self._layout, cold, read_beside=cold_read)
        self.commits = 0
        """Adapters written into pages so far (engine thread)."""
        self.commit_seconds = 0.0
        """Host seconds the engine thread spent writing them (the device copies are queued,
        not waited for): what loads cost the running rows directly."""

    def pages_for(self, rank: int) -> int:
        return max(1, math.ceil(rank / self.page_rank))

    def placement(self, key: AdapterKey) -> Placement | None:
        entry = self._entries.get(key)
        return entry.placement if entry else None

    def resident(self) -> dict[AdapterKey, int]:
        """Loaded adapter versions and their pin counts (for tests and metrics)."""
        with self._lock:
            return {k: e.pins for k, e in self._entries.items()}

    def is_resident(self, key: AdapterKey) -> bool:
        """Whether this adapter version is in device pages now (any thread)."""
        with self._lock:
            return key in self._entries

    def held(self) -> dict[AdapterKey, int]:
        """Held adapter versions and the budget bytes (whole pages) each takes."""
        with self._lock:
            return {
                k: len(e.placement.pages) * self.page_bytes
                for k, e in self._entries.items()
                if e.held
            }

    def resident_bytes(self) -> int:
        """Bytes of the resident adapters' own factors."""
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def reserved_bytes(self) -> int:
        """Bytes of the pages in use (what the budget counts)."""
        with self._lock:
            return (self.num_pages - len(self._free)) * self.page_bytes

    def allocated_bytes(self) -> int:
        """Device memory actually held by the layers' page stacks."""
        return sum(layer.allocated_bytes() for layer in self._layers.values())

    def fits(self, keys: Iterable[AdapterKey]) -> bool:
        """Whether all `keys` could be pinned at once (resident, or free/evictable pages).

        A warm adapter that is itself wanted is not evictable room.
        """
        with self._lock:
            wanted = set(keys)
            needed = sum(self.pages_for(k.rank) for k in wanted if k not in self._entries)
            evictable = sum(
                len(self._entries[k].placement.pages) for k in self._lru if k not in wanted
            )
            return needed <= len(self._free) + evictable

    # ---- operator holds (PinAdapter, --preload) ------------------------------------------------

    def _held_pages_locked(self, besides: AdapterKey | None = None) -> int:
        return sum(
            len(e.placement.pages) for k, e in self._entries.items() if e.held and k != besides
        )

    def check_hold(self, key: AdapterKey, replacing: AdapterKey | None = None) -> None:
        """Raises RESOURCE_EXHAUSTED unless `key` fits in the budget beside the other held
        adapters (`replacing`, held now, is about to be released and does not count)."""
        needed = self.pages_for(key.rank)
        with self._lock:
            others = self._held_pages_locked(besides=key)
            old = self._entries.get(replacing) if replacing not in (None, key) else None
            if old is not None and old.held:
                others -= len(old.placement.pages)
        available = self.num_pages - others
        if needed > available:
            raise EngineError(
                ErrorKind.RESOURCE_EXHAUSTED,
                f"pinning adapter {key.name!r} needs {needed * self.page_bytes} bytes of the "
                f"device adapter budget ({needed} pages of {self.page_bytes} bytes) but only "
                f"{available * self.page_bytes} bytes are not pinned by other adapters "
                f"(budget {self.num_pages * self.page_bytes} bytes, --adapter-device-bytes)",
            )

    def hold(self, key: AdapterKey) -> Placement:
        """Engine thread: loads `key` if needed and keeps it resident until `unhold`.

        Raises RESOURCE_EXHAUSTED when held adapters leave no room for it, or when running
        requests pin the pages it needs right now (retry once they finish).
        """
        self.check_hold(key)
        placement = self.acquire(key)
        with self._lock:
            entry = self._entries[key]
            entry.held = not entry.doomed  # deleted meanwhile: nothing to keep
        self.release(key)
        return placement

    def unhold(self, key: AdapterKey) -> bool:
        """Ends a hold (any thread); the adapter stays warm, evictable as usual. Whether it was
        held."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or not entry.held:
                return False
            entry.held = False
            if entry.pins == 0 and not entry.doomed:
                self._lru[key] = None  # most recently used: it was wanted until now
            return True

    def can_ever_fit(self, key: AdapterKey) -> bool:
        """Whether `key` fits beside the held adapters once running requests finish."""
        with self._lock:
            if key in self._entries:
                return True
            return self.pages_for(key.rank) <= self.num_pages - self._held_pages_locked()

    # ---- cold loads off the engine thread ------------------------------------------------------

    def request(self, key: AdapterKey) -> None:
        """Starts loading `key` in the background unless it is resident or already on its way.

        At capacity (see ColdLoadSettings.max_pending) nothing starts; the caller asks again.
        """
        with self._lock:
            if key in self._entries:
                return
        self._cold.start(key)

    def ready(self, key: AdapterKey) -> bool:
        """Whether `acquire(key)` would not wait for a load: resident, or loaded and copied.

        A resident unpinned key is also marked recently used, so the evictions of the requests
        admitted in the same pass take other adapters first.
        """
        with self._lock:
            if key in self._entries:
                if key in self._lru:
                    self._lru.move_to_end(key)
                return True
        staged = self._cold.staged(key)
        return staged is not None and staged.copy_done()

    def take_error(self, key: AdapterKey) -> EngineError | None:
        """The error a background load of `key` failed with, once; None if none failed."""
        return self._cold.take_error(key)

    def loading(self, key: AdapterKey) -> bool:
        """Whether a background load of `key` is in flight (not yet staged)."""
        return self._cold.loading(key)

    def cold_pending(self) -> int:
        """Background loads in flight plus loaded adapters not yet committed to pages."""
        return self._cold.pending()

    def close(self) -> None:
        """Stops the cold loader's threads (loads in flight are abandoned)."""
        self._cold.close()

    # ---- pins ---------------------------------------------------------------------------------

    def acquire(self, key: AdapterKey) -> Placement:
        """Pins `key` on the device, loading it (and evicting LRU unpinned adapters) if needed.

        Takes a background load's result when there is one (waiting for it if it is still in
        flight); otherwise loads in the calling thread.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.pins += 1
                self._lru.pop(key, None)
                self._observer.on_adapter_cache("device", "hit")
                return entry.placement
        waited = self._cold.loading(key)
        if waited:
            self._cold.wait(key)
        with self._lock:
            # Taken and committed under the pool lock, so a concurrent forget() sees it either
            # staged (and drops it) or resident (and dooms it), never in between.
            staged = self._cold.take_staged(key)
            if staged is not None:
                try:
                    return self._commit_locked(staged, pins=1)
                except EngineError:
                    self._cold.put_back(staged)  # loaded already: keep it for a later try
                    raise
        if waited:
            error = self._cold.take_error(key)
            if error is not None:
                raise error
        return self._load_now(key)

    def _load_now(self, key: AdapterKey) -> Placement:
        """Reads, validates and stages `key` in the calling thread, then commits it pinned."""
        with self._lock:
            if key.rank:
                self._check_room(key, self.pages_for(key.rank))  # before paying for a load
            self._loading, self._loading_doomed = key, False
        started = time.monotonic()
        try:
            # Outside the lock: may read and validate from disk.
            staged = read_and_stage(
                key, self._loader, self._read_beside, self._layout, None, started
            )
        finally:
            with self._lock:
                self._loading, doomed = None, self._loading_doomed
        with self._lock:
            placement = self._commit_locked(staged, pins=1, doomed=doomed, report=False)
        self._observer.on_adapter_cache("device", "miss", time.monotonic() - started)
        return placement

    def _commit_locked(
        self, staged: StagedAdapter, *, pins: int, doomed: bool = False, report: bool = True
    ) -> Placement:
        """Writes a staged adapter into free pages (evicting LRU unpinned adapters for room);
        raises RESOURCE_EXHAUSTED, changing nothing, when pinned adapters leave too few."""
        key = staged.key
        needed = self.pages_for(staged.rank)
        self._tick_locked()  # residency so far is accounted before the set changes
        self._check_room(key, needed)
        started = time.monotonic()
        stale: Stale = {}
        while len(self._free) < needed:
            victim, _ = self._lru.popitem(last=False)
            self._evict(victim, pressure=True, stale=stale)
        # In order: an adapter's pages are usually a run of consecutive ones (a free list of
        # whole adapters' pages), which the commit writes as slices (below).
        pages = tuple(sorted(self._free.pop() for _ in range(needed)))
        # The victims' pages this adapter writes whole in an owner need no zeroing there first:
        # an eviction for room zeroed every layer's pages (half of a 1B model's evicting
        # commit on the engine thread) only for most of them to be overwritten right after.
        reused = set(pages)
        zero: list[tuple[PageOwner, list[int]]] = []
        for owner, names, held in stale.values():
            if self._writes_whole(staged, names):
                held = [p for p in held if p not in reused]
            zero.append((owner, held))
        self._zero_pages(zero)
        staged.order_after_copy()
        if pages[-1] - pages[0] == len(pages) - 1:  # consecutive: every layer's slices at once
            self._write_run(staged, list(pages))
        else:
            self._write_indexed(staged, list(pages))
        self.commits += 1
        self.commit_seconds += time.monotonic() - started
        placement = Placement(pages=pages, rank=staged.rank)
        nbytes = staged.numel * self._itemsize
        self._entries[key] = _Entry(
            key=key, placement=placement, nbytes=nbytes, pins=pins, doomed=doomed
        )
        if pins == 0:
            self._lru[key] = None
        if report:
            self._observer.on_adapter_cache("device", "miss", staged.seconds)
        return placement

    def _write_run(self, staged: StagedAdapter, pages: list[int]) -> None:
        """Writes the staged pages into consecutive `pages`: every owner's factors and live
        flags as slices, in one multi-tensor copy per dtype (PageCopies). A group the adapter
        writes only in part goes through _write_indexed's path."""
        first = pages[0]
        copies = PageCopies()
        unfused, grouped = self._owned_parts(staged)
        for layer, a_pages, b_pages in unfused:
            layer.write_run(first, self.num_pages, a_pages, b_pages, copies)
        partial: list[tuple[LoRAGroup, list[MemberPages]]] = []
        for group, parts in grouped.values():
            stacked = self._stacked(staged, group)
            if stacked is None and len(group.members) > 1:
                partial.append((group, parts))
            else:
                group.write_run(first, self.num_pages, parts, stacked, copies)
        copies.flush()
        if partial:
            index = page_index(pages, self._layout.device)  # (n,)
            for group, parts in partial:
                group.write_pages(pages, self.num_pages, parts, index)

    def _write_indexed(self, staged: StagedAdapter, pages: list[int]) -> None:
        """Writes the staged pages into `pages` (not consecutive): an index copy per factor and
        owner, one index for every layer (built per layer it was a blocking host-to-device
        copy each, hundreds per adapter on the engine thread between two forwards)."""
        index = page_index(pages, self._layout.device)  # (n,)
        unfused, grouped = self._owned_parts(staged)
        for layer, a_pages, b_pages in unfused:
            layer.write_pages(pages, self.num_pages, a_pages, b_pages, index)
        for group, parts in grouped.values():
            group.write_pages(pages, self.num_pages, parts, index, self._stacked(staged, group))

    def _stacked(
        self, staged: StagedAdapter, group: LoRAGroup
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The group's pages as the cold loader staged them in its stacks' layout, if it did."""
        return staged.grouped.get(self._group_names[id(group)])

    @staticmethod
    def _writes_whole(staged: StagedAdapter, names: OwnerNames) -> bool:
        """Whether the staged adapter writes every module of an owner (all of its pages)."""
        return all(name in staged.modules for name in names)

    def _owned_parts(
        self, staged: StagedAdapter
    ) -> tuple[list[MemberPages], dict[int, tuple[LoRAGroup, list[MemberPages]]]]:
        """The staged pages by owner: each unfused layer's, and each group's members'."""
        unfused: list[MemberPages] = []
        grouped: dict[int, tuple[LoRAGroup, list[MemberPages]]] = {}
        for name, (a_pages, b_pages) in staged.modules.items():
            layer = self._layers[name]
            if layer.group is None:
                unfused.append((layer, a_pages, b_pages))
            else:
                grouped.setdefault(id(layer.group), (layer.group, []))[1].append(
                    (layer, a_pages, b_pages)
                )
        return unfused, grouped

    def _room(self, needed: int) -> bool:
        evictable = sum(len(self._entries[k].placement.pages) for k in self._lru)
        return len(self._free) + evictable >= needed

    def _check_room(self, key: AdapterKey, needed: int) -> None:
        """Raises (evicting nothing) unless free plus evictable pages can hold `needed`."""
        if not self._room(needed):
            raise EngineError(
                ErrorKind.RESOURCE_EXHAUSTED,
                f"adapter {key.name!r} needs {needed} device pages but running requests pin "
                f"the rest of the {self.num_pages}-page adapter budget",
            )

    def release(self, key: AdapterKey) -> None:
        """Unpins one use of `key`; it stays warm unless its adapter was deleted."""
        with self._lock:
            entry = self._entries[key]
            entry.pins -= 1
            if entry.pins == 0:
                if entry.doomed:
                    self._evict(key)
                elif not entry.held:
                    self._lru[key] = None

    def forget(
        self,
        tenant: str,
        name: str,
        below_version: int | None = None,
        *,
        version: int | None = None,
    ) -> None:
        """The adapter was deleted (or its versions below `below_version` pruned, or only
        `version` deleted): doom those loaded versions.

        The engine thread frees doomed pages in `collect()`, so a forward in progress never sees
        its layers change underneath it.
        """
        matches = forgotten_versions(tenant, name, below_version, version)

        with self._lock:
            for key, entry in self._entries.items():
                if matches(key):
                    entry.doomed = True
                    entry.held = False  # a deleted or replaced version's hold ends with it
            if self._loading is not None and matches(self._loading):
                self._loading_doomed = True  # being loaded right now: doomed on arrival
            self._cold.forget(matches)  # background loads of it: discarded, never resident

    def collect(self) -> None:
        """Engine thread, between steps: frees every doomed adapter no running request pins,
        and commits finished background loads as warm adapters (evicting LRU ones for room),
        so staging memory is returned even if the requests that wanted them went away."""
        self._cold.tick()
        with self._lock:
            for key, entry in list(self._entries.items()):
                if entry.doomed and entry.pins == 0:
                    self._lru.pop(key, None)
                    self._evict(key)
            for key in self._cold.staged_keys():
                staged = self._cold.take_staged(key)
                if staged is None:
                    continue
                if staged.copy_done() and self._room(self.pages_for(staged.rank)):
                    self._commit_locked(staged, pins=0)
                else:
                    self._cold.put_back(staged)

    def tick(self) -> None:
        """Reports each tenant's device byte-seconds since the last tick (for cost metrics)."""
        with self._lock:
            self._tick_locked()

    def _tick_locked(self) -> None:
        now = time.monotonic()
        elapsed, self._last_tick = now - self._last_tick, now
        held: dict[str, float] = {}
        for entry in self._entries.values():
            held[entry.key.tenant] = held.get(entry.key.tenant, 0.0) + entry.nbytes * elapsed
        if held:
            self._observer.on_residency(held)

    def _evict(
        self,
        key: AdapterKey,
        *,
        pressure: bool = False,
        stale: Stale | None = None,
    ) -> None:
        """Frees an adapter's pages; `pressure` marks an LRU eviction (vs. a delete).

        stale: where a commit collects, per owner, the pages whose zeroing it does itself
        (_commit_locked); without it every layer's pages are zeroed now."""
        self._tick_locked()
        if pressure:
            self._observer.on_adapter_cache("device", "eviction")
        entry = self._entries.pop(key)
        pages = list(entry.placement.pages)
        now: list[tuple[PageOwner, list[int]]] = []
        for owner, names in self._owners:
            held = owner.forget_pages(pages)
            if not held:
                continue
            if stale is None:
                now.append((owner, held))
            else:
                stale.setdefault(id(owner), (owner, names, []))[2].extend(held)
        self._zero_pages(now)
        self._free.extend(pages)
        if not self._entries:
            for layer in self._layers.values():
                layer.release_memory()

    def _zero_pages(self, work: list[tuple[PageOwner, list[int]]]) -> None:
        """Zeroes each owner's pages (forget_pages done): a fill per factor and owner, each
        distinct list of pages copied to the device once, not once per owner."""
        indexes: dict[tuple[int, ...], torch.Tensor] = {}
        for owner, pages in work:
            if not pages:
                continue
            index = indexes.get(tuple(pages))
            if index is None:
                index = page_index(pages, self._layout.device)  # (n,)
                indexes[tuple(pages)] = index
            owner.zero_pages(index)
