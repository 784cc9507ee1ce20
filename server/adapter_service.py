"""Adapter management as the gRPC layer sees it: upload sessions, list, get, delete, versions.

Ties the durable store, validation against the base model and the engine's device pages
together, so the gRPC handlers only decode, call one method and encode.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from loraserve.adapters import safetensors_check
from loraserve.adapters.errors import (
    AdapterError,
    AdapterNotFoundError,
    AdapterQuotaError,
    AdapterUploadCancelledError,
    AdapterValidationError,
)
from loraserve.adapters.names import format_ref, split_version, validate_adapter_name
from loraserve.adapters.spec import BaseModelSpec
from loraserve.adapters.store import AdapterRecord, AdapterStore, UploadTransaction
from loraserve.adapters.structure_cache import StructureCache
from loraserve.adapters.weights import AdapterWeights, load_adapter_weights
from loraserve.server.config import ServerConfig
from loraserve.server.engine.compute_threads import helper_pool
from loraserve.server.engine.types import AdapterKey, AdapterRef, EngineError, ErrorKind
from loraserve.server.limits import LimitsLookup, TenantLimitTable

log = logging.getLogger(__name__)

FileKind = Literal["config", "weights"]
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FileDeclaration:
    """What the client promised to send for one file."""

    kind: FileKind
    size: int
    sha256: str


def checksum_workers(cores: int | None = None) -> int:
    """Threads hashing loaded adapters beside their validation (hashlib releases the GIL): one
    adapter's weights pieces (adapters/store.PIECE_BYTES) hash on all of them at once. Half
    the cores this process may run on, from 4 to 8: on 2 cores 4 threads hashed the 1b
    model's 6.8 MB adapter in 2.6-3.5 ms against 4.2-4.3 ms on 2 (bench.cold_load, alternated);
    a 16-core GPU host gets 8, so that adapter's 7 pieces hash in one round."""
    if cores is None:
        has_affinity = hasattr(os, "sched_getaffinity")
        cores = len(os.sched_getaffinity(0)) if has_affinity else os.cpu_count() or 1
    return max(4, min(8, cores // 2))


MAX_CHUNK_BYTES = 4 * 1024 * 1024
"""Largest FileChunk.data accepted (the proto's documented bound)."""


class UploadSlots:
    """Counts uploads in progress, per calling tenant and in all, against their caps.

    Each upload holds open files and a temp directory for its whole life, so without a cap one
    tenant could open streams until the process runs out of file descriptors.
    """

    def __init__(self, config: ServerConfig, limits: LimitsLookup) -> None:
        self._config = config
        self._limits = limits
        self._lock = threading.Lock()
        self._by_tenant: dict[str, int] = {}
        self._total = 0

    def acquire(self, tenant: str) -> UploadSlot:
        """A slot for one upload by `tenant`; AdapterQuotaError (naming the limit) if none."""
        tenant_limit, limit = self._limits(tenant).max_uploads, self._config.max_uploads
        with self._lock:
            mine = self._by_tenant.get(tenant, 0)
            if mine >= tenant_limit.value:
                raise AdapterQuotaError(
                    f"tenant {tenant!r} already has {mine} uploads in progress "
                    f"({tenant_limit.describe()}); wait for one to finish"
                )
            if self._total >= limit:
                raise AdapterQuotaError(
                    f"the server already has {self._total} uploads in progress "
                    f"(limit {limit}, --max-uploads); retry later"
                )
            self._by_tenant[tenant] = mine + 1
            self._total += 1
        return UploadSlot(self, tenant)

    def _release(self, tenant: str) -> None:
        with self._lock:
            self._total -= 1
            left = self._by_tenant[tenant] - 1
            if left:
                self._by_tenant[tenant] = left
            else:
                del self._by_tenant[tenant]

    def in_progress(self) -> int:
        with self._lock:
            return self._total


@dataclass
class UploadSlot:
    """One acquired upload slot; release() is idempotent."""

    slots: UploadSlots
    tenant: str
    _released: bool = field(default=False)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.slots._release(self.tenant)


@dataclass(frozen=True)
class _Reservation:
    """Quota held by an upload in progress, from its header until it commits or ends."""

    tenant: str
    name: str
    size: int


@dataclass
class UploadSession:
    """One upload in progress: enforces the declarations while bytes arrive, then commits.

    Holds a quota reservation from begin_upload() until finish() or abort(); every way out of
    finish() other than a commit aborts, so a failed upload never leaves its temp directory.
    """

    service: AdapterService
    tenant: str
    name: str
    description: str
    declared: dict[FileKind, FileDeclaration]
    txn: UploadTransaction
    reservation: _Reservation
    _closed: bool = field(default=False)
    _head: bytearray = field(default_factory=bytearray)
    """The first bytes of the weights, kept only until the safetensors header is checked."""
    _head_checked: bool = field(default=False)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    """Set when the caller went away after handing the session to finish(): it must not commit."""

    def add_chunk(self, kind: FileKind, data: bytes) -> None:
        """Appends bytes to one file; refuses as soon as a chunk is over MAX_CHUNK_BYTES, a
        file exceeds its declared size or the weights' header is implausible."""
        if len(data) > MAX_CHUNK_BYTES:
            raise AdapterValidationError(
                "chunk.data", f"is {len(data)} bytes; at most {MAX_CHUNK_BYTES} (4 MiB) per chunk"
            )
        declared = self.declared[kind]
        if self.txn.bytes_written(kind) + len(data) > declared.size:
            raise AdapterValidationError(
                _file_name(kind),
                f"more bytes arrived than the {declared.size} declared in the header",
            )
        if kind == "weights" and not self._head_checked:
            self._check_head(data)
        self.txn.write(kind, data)

    def _check_head(self, data: bytes) -> None:
        """Checks the safetensors header as soon as its bytes are in, so a file that cannot be
        valid is refused after a few bytes rather than after all of them are stored."""
        self._head += data[: safetensors_check.DEFAULT_MAX_HEADER_BYTES + 8 - len(self._head)]
        size = self.declared["weights"].size
        needed = safetensors_check.header_bytes_needed(self._head, size)
        if needed is None or len(self._head) < needed:
            return
        safetensors_check.check_safetensors_head(self._head, size)
        self._head_checked = True
        self._head = bytearray()

    def finish(self) -> AdapterRecord:
        """Verifies sizes and checksums, validates against the base model, commits atomically."""
        try:
            return self._finish()
        finally:
            self.abort()  # a no-op after a commit

    def _finish(self) -> AdapterRecord:
        if self._cancelled.is_set():  # queued behind other validations while the caller left
            raise AdapterUploadCancelledError(f"upload of {self.name!r} was cancelled")
        for kind, declared in self.declared.items():
            got = self.txn.bytes_written(kind)
            if got != declared.size:
                raise AdapterValidationError(
                    _file_name(kind),
                    f"stream ended after {got} of {declared.size} declared bytes (truncated)",
                )
            if self.txn.sha256(kind) != declared.sha256:
                raise AdapterValidationError(
                    _file_name(kind), "sha256 of the received bytes does not match the header"
                )
        try:
            weights = self.service.validate(self.txn.read("config"), self.txn.read("weights"))
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            # Hostile files must get INVALID_ARGUMENT even where a check was missed.
            raise AdapterValidationError(
                "adapter", f"could not be parsed: {type(exc).__name__}: {str(exc)[:200]}"
            ) from exc
        record = self.txn.commit(
            {
                "rank": weights.config.rank,
                "alpha": weights.config.alpha,
                "use_rslora": weights.config.use_rslora,
                "target_modules": sorted(weights.modules),
                "description": self.description,
            },
            admit=self._admit,
        )
        self._closed = True
        self.service.end_reservation(self.reservation)
        self.service.on_replaced(record)
        return record

    def _admit(self, stored: list[AdapterRecord]) -> None:
        """Under the store's lock, just before the commit's rename: a cancelled upload and one
        over the quota go no further."""
        if self._cancelled.is_set():
            raise AdapterUploadCancelledError(f"upload of {self.name!r} was cancelled")
        self.service.check_quota(self.tenant, self.name, self.declared["weights"].size, stored)

    def cancel(self) -> None:
        """The caller is gone: a finish() still queued or running aborts instead of committing
        (unless the commit's rename already happened). Thread-safe; finish() still cleans up."""
        self._cancelled.set()

    def abort(self) -> None:
        """Removes everything written and frees the quota reservation; idempotent."""
        if not self._closed:
            self._closed = True
            try:
                self.txn.abort()
            finally:
                self.service.end_reservation(self.reservation)


class AdapterService:
    """Per-tenant adapter operations over the store; raises adapters.errors exceptions."""

    def __init__(
        self,
        config: ServerConfig,
        store: AdapterStore,
        spec: BaseModelSpec,
        limits: LimitsLookup | None = None,
    ) -> None:
        """`limits`: per-tenant limits (default: the config's tenant_max_* for every tenant)."""
        self._config = config
        self.store = store
        self.spec = spec
        self._limits = limits or TenantLimitTable(config.limit_defaults())
        self.uploads = UploadSlots(config, self._limits)
        self._forget: Callable[..., None] = lambda tenant, name, below, *, version=None: None
        self._on_deleted: Callable[[str, str, int], None] = lambda tenant, name, version: None
        self._on_new_version: Callable[[AdapterKey], None] = lambda key: None
        self._reservations: list[_Reservation] = []
        """Uploads in progress that passed the quota check at their header (guarded by _lock)."""
        self._lock = threading.Lock()
        self._checksums = helper_pool("adapter-checksum", checksum_workers())
        """Hashes a loaded adapter's files while the loading thread validates them."""
        self.structure_cache = StructureCache(spec, max_rank=config.max_lora_rank)
        """Structure checks by the bytes they depend on: a cold load of an adapter shaped like
        one checked before checks only its tensor values (adapters/structure_cache.py)."""

    @property
    def config(self) -> ServerConfig:
        return self._config

    def attach_engine(self, forget: Callable[..., None]) -> None:
        """Lets deletes and pruning uploads free the engine's copies: `forget(tenant, name,
        below_version, *, version=None)` (Engine.forget_adapter)."""
        self._forget = forget

    def attach_usage_and_pins(
        self,
        on_deleted: Callable[[str, str, int], None],
        on_new_version: Callable[[AdapterKey], None],
    ) -> None:
        """Lets deletes drop a name's usage totals and uploads move a pin that follows the name
        to the new version (Engine.adapter_deleted, Engine.pin_new_version)."""
        self._on_deleted = on_deleted
        self._on_new_version = on_new_version

    def begin_upload(
        self, tenant: str, name: str, description: str, files: list[FileDeclaration]
    ) -> UploadSession:
        validate_adapter_name(name)
        if len(description.encode()) > 1024:
            raise AdapterValidationError("description", "must be at most 1024 bytes")
        declared: dict[FileKind, FileDeclaration] = {}
        for decl in files:
            if decl.kind in declared:
                raise AdapterValidationError("files", f"{_file_name(decl.kind)} declared twice")
            if not _SHA256.fullmatch(decl.sha256):
                raise AdapterValidationError(
                    f"files.{_file_name(decl.kind)}.sha256", "must be 64 lowercase hex digits"
                )
            limit = (
                self._config.max_adapter_config_bytes
                if decl.kind == "config"
                else self._config.max_adapter_bytes
            )
            if decl.size > limit:
                raise AdapterValidationError(
                    _file_name(decl.kind),
                    f"declared size {decl.size} exceeds the limit of {limit} bytes",
                )
            if decl.size == 0:
                raise AdapterValidationError(_file_name(decl.kind), "declared size is 0")
            declared[decl.kind] = decl
        missing = {"config", "weights"} - set(declared)
        if missing:
            raise AdapterValidationError(
                "files",
                "the header must declare both adapter_config.json and adapter_model.safetensors",
            )
        reservation = self._reserve(tenant, name, declared["weights"].size)
        try:
            txn = self.store.begin_upload(tenant, name)
        except BaseException:
            self.end_reservation(reservation)
            raise
        return UploadSession(self, tenant, name, description, declared, txn, reservation)

    def _reserve(self, tenant: str, name: str, size: int) -> _Reservation:
        """Checks the quota counting the uploads already in progress, and holds this one's
        share of it until the upload ends: concurrent uploads cannot all pass one check."""
        stored = self.store.all_versions(tenant)
        with self._lock:
            pending = [r for r in self._reservations if r.tenant == tenant]
            self.check_quota(tenant, name, size, stored, pending)
            reservation = _Reservation(tenant, name, size)
            self._reservations.append(reservation)
        return reservation

    def end_reservation(self, reservation: _Reservation) -> None:
        with self._lock:
            for i, held in enumerate(self._reservations):
                if held is reservation:
                    del self._reservations[i]
                    return

    def check_quota(
        self,
        tenant: str,
        name: str,
        size: int,
        stored: list[AdapterRecord],
        pending: list[_Reservation] = (),  # type: ignore[assignment]
    ) -> None:
        """Refuses an upload that would exceed the tenant's adapter count or bytes.

        Counts what is on disk: `stored` holds every kept version of the tenant's adapters
        (store.all_versions), each version's bytes count, and the adapter count is of names.
        The versions of `name` that this upload's publish prunes (the oldest beyond
        store.versions_kept) do not count. `pending`: the tenant's other uploads in progress,
        whose bytes (in tmp/) count. Called at the header (with pending) and again at commit
        under the store's lock (with what is committed at that moment).
        """
        same = sorted((r for r in stored if r.name == name), key=lambda r: r.version)
        # After the publish, `name` keeps its newest versions_kept - 1 old versions plus this one.
        kept_same = same[max(0, len(same) + 1 - self.store.versions_kept) :]
        others = [r for r in stored if r.name != name] + kept_same
        names = {r.name for r in others} | {p.name for p in pending} | {name}
        limits = self._limits(tenant)
        if len(names) > limits.max_adapters.value:
            raise AdapterQuotaError(
                f"tenant {tenant!r} stores or is uploading {len(names) - 1} other adapters "
                f"(quota: {limits.max_adapters.describe()}); delete one first"
            )
        total = sum(r.size_bytes for r in others) + sum(p.size for p in pending) + size
        if total > limits.max_adapter_bytes.value:
            raise AdapterQuotaError(
                f"tenant {tenant!r} would store {total} bytes of adapters, counting uploads in "
                f"progress (quota: {limits.max_adapter_bytes.describe()}); delete some first"
            )

    def validate(
        self, config_bytes: bytes, weights_bytes: bytes, *, as_stored: bool = False
    ) -> AdapterWeights:
        """load_adapter_weights against this server's base model and rank bound."""
        return load_adapter_weights(
            config_bytes,
            weights_bytes,
            self.spec,
            max_rank=self._config.max_lora_rank,
            as_stored=as_stored,
            structure=self.structure_cache.check(config_bytes, weights_bytes),
        )

    def on_replaced(self, record: AdapterRecord) -> None:
        """After a publish: frees the engine's copies of the versions it pruned.

        Pruning removes the oldest versions, so everything below the oldest one still stored
        is gone; the kept versions stay cached (still valid for `name@N`, and a rollback may
        make one the latest again). Plain `name` never hits a stale copy: it is resolved to
        a version number through the store on every request.
        """
        try:
            oldest = self.store.list_versions(record.tenant, record.name)[0].version
        except AdapterNotFoundError:
            oldest = None  # deleted meanwhile; the delete forgot every version
        except AdapterError as exc:  # a damaged version: keep the cached copies; reads re-check
            log.error("listing %s/%s after an upload failed: %s", record.tenant, record.name, exc)
            return
        self._forget(record.tenant, record.name, oldest)
        if oldest is not None:
            self._move_name_pin(record)

    def _move_name_pin(self, latest: AdapterRecord) -> None:
        """A name has a new latest version (upload, rollback, deleted latest): a pin that
        follows the name moves to it. The change itself stands either way; if the new version
        does not fit beside the other pins, the operator learns from the log that the pin ended.
        """
        try:
            self._on_new_version(key_of(latest))
        except EngineError as exc:
            log.error(
                "pin of adapter %s/%s ended: version %d could not be pinned: %s",
                latest.tenant,
                latest.name,
                latest.version,
                exc.message,
            )

    def list(self, tenant: str) -> list[AdapterRecord]:
        return self.store.list(tenant)

    def get(self, tenant: str, name: str) -> AdapterRecord:
        """The latest version for `name`, version N for `name@N` (`latest` set if it is)."""
        plain, version = split_version(name)
        if version is None:
            return self.store.get(tenant, plain)
        return self.store.get_version(tenant, plain, version)

    def delete(self, tenant: str, name: str) -> AdapterRecord:
        """Deletes every version for `name`, version N only for `name@N`.

        Requests running on a deleted version finish on it: the engine frees its memory when
        the last one releases it (forget dooms, it does not evict pinned pages). Deleting the
        name (or its only version) drops its usage totals and its pin; deleting the latest of
        several versions moves a pin that follows the name to the new latest first.
        """
        plain, version = split_version(name)
        if version is None:
            try:  # after a rollback the latest is not the highest: usage must forget them all
                highest = max(r.version for r in self.store.list_versions(tenant, plain))
            except AdapterError:
                highest = 0  # missing or damaged: the delete below says which
            record = self.store.delete(tenant, plain)
            self._forget(tenant, plain, None)
            self._on_deleted(tenant, plain, max(record.version, highest))
        else:
            record = self.store.delete_version(tenant, plain, version)
            try:
                self._move_name_pin(self.store.get(tenant, plain))
            except AdapterNotFoundError:  # it was the only version: the name is gone
                self._forget(tenant, plain, None)
                self._on_deleted(tenant, plain, record.version)
            else:
                self._forget(tenant, plain, None, version=version)
        log.info("adapter deleted: tenant=%s name=%s", tenant, format_ref(plain, version))
        return record

    def list_versions(self, tenant: str, name: str) -> list[AdapterRecord]:
        """Every stored version of `name`, oldest first, exactly one marked latest."""
        _plain_name(name)
        return self.store.list_versions(tenant, name)

    def rollback(self, tenant: str, name: str, to_version: int) -> AdapterRecord:
        """Makes stored version `to_version` the latest of `name`, durably.

        Nothing is evicted: every kept version is immutable and cached under its own number,
        and new plain-`name` requests resolve through the store to the new latest. Requests
        already resolved keep the version they started with. A pin that follows the name
        moves to the new latest.
        """
        _plain_name(name)
        if to_version < 1:
            raise AdapterValidationError("to_version", f"must be >= 1, got {to_version}")
        record = self.store.rollback(tenant, name, to_version)
        log.info("adapter rolled back: tenant=%s name=%s latest=%d", tenant, name, to_version)
        self._move_name_pin(record)
        return record

    def get_for_pin(self, tenant: str, spec: str) -> tuple[AdapterRecord, bool]:
        """The version a pin of `spec` holds, and whether the pin follows the name's latest
        version (plain `name`) or stays on that version (`name@N`)."""
        _, version = split_version(spec)
        return self.get(tenant, spec), version is None

    # ---- the engine's view --------------------------------------------------------------------

    def resolve(self, ref: AdapterRef) -> AdapterKey:
        """The version a request runs on: the pinned one, else the latest now (engine resolver)."""
        try:
            if ref.version is None:
                record = self.store.get(ref.tenant, ref.name)
            else:
                record = self.store.get_version(ref.tenant, ref.name, ref.version)
        except AdapterNotFoundError as exc:
            raise EngineError(
                ErrorKind.NOT_FOUND, f"adapter {format_ref(ref.name, ref.version)!r} not found"
            ) from exc
        except AdapterError as exc:
            # The details name files on the server's disk: for the operator's log only.
            log.error("adapter %s/%s is unusable: %s", ref.tenant, ref.name, exc)
            raise EngineError(
                ErrorKind.INTERNAL, f"adapter {ref.name!r} is unusable (see the server log)"
            ) from exc
        return key_of(record)

    def load(
        self,
        key: AdapterKey,
        *,
        beside_checksum: Callable[[AdapterWeights], None] | None = None,
    ) -> AdapterWeights:
        """Reads, checksums and validates one adapter version (engine loader).

        beside_checksum: work on the validated weights that may run while the checksum is
        still being computed (the cold loader lays the pages out and starts their copy to the
        device); what it makes must not be used unless this call returns, since a checksum
        mismatch raises here after it.
        """
        try:
            record = self.store.get_version(key.tenant, key.name, key.version)
            files = self.store.read_unverified(record)
            # The checksum and the validation read the same bytes: side by side, a cold load
            # takes the longer of the two instead of their sum. Nothing validated is returned
            # before the checksum has matched; a mismatch wins over a validation error (the
            # bytes are not the ones uploaded, so what validation says of them is moot).
            # The weights' pieces (recorded at upload) hash on several threads at once.
            hashed = [self._checksums.submit(job) for job in files.checksum_jobs()]
            try:
                # In the file's dtype: the engine only lays the factors out as pages in the
                # model's dtype, so a float32 copy would be one more pass over every byte.
                weights = self.validate(files.config, files.weights, as_stored=True)
                if beside_checksum is not None:
                    beside_checksum(weights)
            finally:
                for job in hashed:
                    job.result()
            return weights
        except AdapterNotFoundError as exc:
            raise EngineError(
                ErrorKind.NOT_FOUND,
                f"adapter {key.name!r} version {key.version} was deleted or replaced; retry",
            ) from exc
        except OSError as exc:
            # E.g. out of descriptors: the caller may retry; the filename stays in the log.
            log.error("reading adapter %s/%s failed: %s", key.tenant, key.name, exc)
            raise EngineError(
                ErrorKind.RESOURCE_EXHAUSTED,
                f"cannot read adapter {key.name!r} right now "
                f"({os.strerror(exc.errno) if exc.errno else type(exc).__name__}); retry later",
            ) from exc
        except AdapterError as exc:
            log.error("stored adapter %s/%s is unusable: %s", key.tenant, key.name, exc)
            raise EngineError(
                ErrorKind.INTERNAL, f"stored adapter {key.name!r} is unusable (see the server log)"
            ) from exc


def key_of(record: AdapterRecord) -> AdapterKey:
    """The engine's key of one stored adapter version."""
    return AdapterKey(record.tenant, record.name, record.version, rank=record.rank)


def _plain_name(name: str) -> str:
    """`name` if it is a valid adapter name without a version (`name@N` is refused)."""
    if "@" in name:
        raise AdapterValidationError("name", "takes an adapter name without a version (no @N)")
    return validate_adapter_name(name)


def _file_name(kind: FileKind) -> str:
    return "adapter_config.json" if kind == "config" else "adapter_model.safetensors"
