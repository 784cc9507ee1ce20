"""Durable per-tenant adapter store on local disk: all-or-nothing uploads, versions, deletes.

Layout under the root directory:

    tenants/<tenant>/<name>/v<version>/adapter_config.json
                                      /adapter_model.safetensors
                                      /meta.json           (checksums, sizes, summary; written last)
    tenants/<tenant>/<name>/.last_version                   (highest version ever assigned)
    tenants/<tenant>/<name>/.latest                         (the latest version, after a rollback)
    tmp/                                                    (uploads in progress, deletes in flight)
    quarantine/<tenant>/<name>/v<version>-<unix time>/      (versions that failed verification)

Visibility rests on one atomic step: an upload is written, fsynced and checksummed in its own
directory under tmp/, then os.rename()d to its version directory; a delete renames away before it
removes anything. So a reader sees a whole version or none, and a crash leaves only debris under
tmp/, which the next start removes.

Versions: every upload of a name becomes version max+1 and its latest; the `versions_kept`
newest are kept (older ones are pruned on publish and at start, the latest never). Numbers are
never reused (`.last_version`), since caches key on (tenant, name, version). Which version a plain
`name` means is the highest one, unless `.latest` names another (a rollback): that pointer file
is replaced atomically (write, fsync, rename, fsync the directory), so a crash leaves the old
latest or the new one, never neither. A pointer to a version that is gone (quarantined, or a
crash mid-delete) falls back to the highest valid version, logged.

At start every stored version is also re-hashed against its meta.json (streamed, in chunks); one
whose files are missing, truncated or changed is moved aside to quarantine/ (logged at ERROR)
instead of stopping the start, and is no longer visible. The store knows files and checksums
only: validating the contents against the base model is the caller's job (adapters.weights)
before commit().
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Literal

from loraserve.adapters.errors import (
    AdapterCorruptError,
    AdapterNotFoundError,
    AdapterValidationError,
)
from loraserve.adapters.names import format_ref, validate_adapter_name, validate_tenant_name

log = logging.getLogger(__name__)

AdapterFileKind = Literal["config", "weights"]
"""Which of the two adapter files a call is about."""

FILE_NAMES: dict[AdapterFileKind, str] = {
    "config": "adapter_config.json",
    "weights": "adapter_model.safetensors",
}
"""On-disk name of each adapter file (PEFT's names)."""

META_FILE = "meta.json"
LAST_VERSION_FILE = ".last_version"
LATEST_FILE = ".latest"
"""Names the latest version when it is not the highest (after a rollback); absent otherwise."""
DEFAULT_VERSIONS_KEPT = 5
"""Versions of a name kept on disk (the latest included) unless the store is told otherwise."""
QUARANTINE_DIR = "quarantine"
"""Directory under the root that corrupt versions are moved to at start (kept for inspection)."""
PIECE_BYTES = 1 << 20
"""The weights file is also hashed in pieces of this many bytes at upload (meta.json's
weights_pieces_sha256), so a load verifies its pieces on several threads at once."""
_VERIFY_CHUNK = 1 << 20
"""Bytes read at a time when re-hashing stored files at start: big adapters never sit in memory."""
MAX_DESCRIPTION_BYTES = 1024
"""Longest description accepted, in UTF-8 bytes (the public API's bound)."""

_META_FORMAT = 1
_VERSION_DIR = re.compile(r"v([1-9][0-9]{0,17})")


@dataclass(frozen=True)
class AdapterRecord:
    """One stored adapter version, as described by its meta.json."""

    tenant: str
    name: str
    version: int
    """Starts at 1 and increases by one on every upload of the name, also across deletes."""
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    """Full names of the base modules the adapter changes, sorted."""
    size_bytes: int
    """Size of adapter_model.safetensors."""
    sha256: str
    """Lowercase hex sha256 of adapter_model.safetensors."""
    created_at: float
    """Commit time, seconds since the Unix epoch."""
    description: str
    path: Path
    """The version directory holding the files."""
    latest: bool = field(default=False, compare=False)
    """Whether this version was the one a plain `name` resolves to when the record was read
    (a display flag: a rollback or upload may change it at any moment after)."""


def _fsync_dir(path: Path) -> None:
    """Make a rename or file creation inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Normalize the caller's summary of a validated adapter; raise on anything malformed."""
    rank = meta.get("rank")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterValidationError("rank", f"must be an integer >= 1, got {rank!r}")
    alpha = meta.get("alpha")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterValidationError("alpha", f"must be a finite number, got {alpha!r}")
    use_rslora = meta.get("use_rslora")
    if not isinstance(use_rslora, bool):
        raise AdapterValidationError("use_rslora", f"must be a bool, got {use_rslora!r}")
    targets = meta.get("target_modules")
    # A lone string is iterable too, but as characters: refuse it rather than store "q", "_", ...
    if isinstance(targets, str | bytes) or not isinstance(targets, Iterable):
        raise AdapterValidationError("target_modules", "must be a collection of module names")
    targets = list(targets)
    if not all(isinstance(t, str) for t in targets):
        raise AdapterValidationError("target_modules", "must be a collection of module names")
    description = meta.get("description", "")
    if not isinstance(description, str):
        raise AdapterValidationError("description", "must be a string")
    if len(description.encode("utf-8")) > MAX_DESCRIPTION_BYTES:
        raise AdapterValidationError(
            "description", f"must be at most {MAX_DESCRIPTION_BYTES} bytes of UTF-8"
        )
    return {
        "rank": rank,
        "alpha": float(alpha),
        "use_rslora": use_rslora,
        "target_modules": sorted(targets),
        "description": description,
    }


def _record_from_meta(path: Path, tenant: str, name: str, version: int) -> AdapterRecord:
    """Read a version directory's meta.json; raise AdapterCorruptError if it is missing or bad."""
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        record = AdapterRecord(
            tenant=tenant,
            name=name,
            version=version,
            rank=int(meta["rank"]),
            alpha=float(meta["alpha"]),
            use_rslora=bool(meta["use_rslora"]),
            target_modules=tuple(str(t) for t in meta["target_modules"]),
            size_bytes=int(meta["weights_size"]),
            sha256=str(meta["weights_sha256"]),
            created_at=float(meta["created_at"]),
            description=str(meta["description"]),
            path=path,
        )
        ok = (
            meta["format"] == _META_FORMAT
            and meta["tenant"] == tenant
            and meta["name"] == name
            and isinstance(meta["config_sha256"], str)
            and isinstance(meta["config_size"], int)
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdapterCorruptError(f"{path / META_FILE} is unreadable: {exc}") from None
    if not ok:
        raise AdapterCorruptError(f"{path / META_FILE} does not describe {tenant}/{name}")
    return record


def _verify_version(path: Path, tenant: str, name: str, version: int) -> str | None:
    """Why the version directory `path` cannot be served, or None if its files match meta.json.

    Reads each file in _VERIFY_CHUNK pieces and stops at the first byte past the recorded size.
    """
    try:
        _record_from_meta(path, tenant, name, version)
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        expected = {
            FILE_NAMES["config"]: (meta["config_sha256"], meta["config_size"]),
            FILE_NAMES["weights"]: (meta["weights_sha256"], meta["weights_size"]),
        }
        for want_sum, want_size in expected.values():
            if not isinstance(want_sum, str) or not isinstance(want_size, int):
                raise TypeError("sizes must be integers and checksums strings")
    except AdapterCorruptError as exc:
        return str(exc)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{path / META_FILE} is unreadable: {exc}"
    for filename, (want_sum, want_size) in expected.items():
        file_path = path / filename
        digest = hashlib.sha256()
        size = 0
        try:
            with open(file_path, "rb") as handle:
                while size <= want_size:
                    block = handle.read(_VERIFY_CHUNK)
                    if not block:
                        break
                    digest.update(block)
                    size += len(block)
        except FileNotFoundError:
            return f"{filename} is missing"
        except OSError as exc:
            return f"{filename} is unreadable: {exc}"
        if size < want_size:
            return f"{filename} is truncated: {size} bytes, {want_size} recorded at upload"
        if size > want_size:
            return f"{filename} is longer than the {want_size} bytes recorded at upload"
        if digest.hexdigest() != want_sum:
            return (
                f"{filename} sha256 {digest.hexdigest()} does not match the {want_sum} "
                "recorded at upload"
            )
    return None


ChecksumJob = Callable[[], None]
"""One independent part of a load's checksum check: raises AdapterCorruptError on a mismatch."""


@dataclass(frozen=True)
class StoredFiles:
    """One stored version's two files as read from disk, not yet checked against the
    checksums meta.json recorded at upload (AdapterStore.read_unverified)."""

    path: Path
    config: bytes
    weights: bytes
    expected: tuple[tuple[object, object], tuple[object, object]]
    """(sha256, size) recorded for adapter_config.json, then adapter_model.safetensors."""
    weights_pieces: tuple[str, ...] | None = None
    """sha256 of each PIECE_BYTES piece of adapter_model.safetensors, as recorded at upload
    (None for a version stored before pieces were recorded: its whole-file sum is checked)."""

    def verify(self) -> None:
        """AdapterCorruptError unless both files hash to what was recorded at upload."""
        for job in self.checksum_jobs():
            job()

    def checksum_jobs(self) -> list[ChecksumJob]:
        """verify() as independent jobs, to run on several threads at once (hashlib releases
        the GIL): the config's sum, then one job per piece of the weights (their whole-file sum
        where no pieces were recorded). Together they check every byte of both files."""
        (config_sum, config_size), (weights_sum, weights_size) = self.expected
        config_path = self.path / FILE_NAMES["config"]
        weights_path = self.path / FILE_NAMES["weights"]
        jobs = [partial(_check_sum, config_path, self.config, config_sum, config_size)]
        if self.weights_pieces is None or len(self.weights) != weights_size:
            jobs.append(partial(_check_sum, weights_path, self.weights, weights_sum, weights_size))
            return jobs
        view = memoryview(self.weights)
        for index, want in enumerate(self.weights_pieces):
            start = index * PIECE_BYTES
            piece = view[start : start + PIECE_BYTES]
            jobs.append(partial(_check_piece, weights_path, piece, start, want))
        return jobs


def _check_sum(path: Path, data: bytes, want_sum: object, want_size: object) -> None:
    got_sum = hashlib.sha256(data).hexdigest()  # releases the GIL while hashing
    if (got_sum, len(data)) != (want_sum, want_size):
        raise AdapterCorruptError(
            f"{path}: sha256 {got_sum} ({len(data)} bytes) does not "
            f"match the {want_sum} ({want_size} bytes) recorded at upload"
        )


def _check_piece(path: Path, piece: memoryview, start: int, want_sum: str) -> None:
    got_sum = hashlib.sha256(piece).hexdigest()  # releases the GIL while hashing
    if got_sum != want_sum:
        raise AdapterCorruptError(
            f"{path}: bytes {start} to {start + len(piece)} hash to sha256 {got_sum}, not the "
            f"{want_sum} recorded at upload"
        )


class _PieceHasher:
    """sha256 of each PIECE_BYTES piece of a stream that arrives in chunks of any size."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._filled = 0
        self.sums: list[str] = []

    def update(self, chunk: bytes | memoryview) -> None:
        view = memoryview(chunk).cast("B")
        while len(view):
            take = min(PIECE_BYTES - self._filled, len(view))
            self._digest.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == PIECE_BYTES:
                self.sums.append(self._digest.hexdigest())
                self._digest, self._filled = hashlib.sha256(), 0

    def finish(self) -> list[str]:
        """Every piece's sum, the last partial piece included."""
        if self._filled:
            self.sums.append(self._digest.hexdigest())
            self._digest, self._filled = hashlib.sha256(), 0
        return self.sums


class UploadTransaction:
    """One upload in progress: two files growing in a private temp directory until commit.

    Not visible to any reader until commit() returns. Use as a context manager: leaving the block
    without a successful commit() aborts and removes everything written.
    """

    def __init__(self, store: AdapterStore, tenant: str, name: str, directory: Path) -> None:
        self._store = store
        self.tenant = tenant
        self.name = name
        self._dir = directory
        self._lock = threading.Lock()
        self._files: dict[AdapterFileKind, BinaryIO] = {
            kind: open(directory / filename, "xb")  # noqa: SIM115 (closed in commit/abort)
            for kind, filename in FILE_NAMES.items()
        }
        self._hashes = {kind: hashlib.sha256() for kind in FILE_NAMES}
        self._weights_pieces = _PieceHasher()
        self._sizes: dict[AdapterFileKind, int] = dict.fromkeys(FILE_NAMES, 0)
        self._state: Literal["open", "committed", "aborted"] = "open"

    def _require_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"upload of {self.tenant}/{self.name} is already {self._state}")

    def write(self, file: AdapterFileKind, chunk: bytes) -> None:
        """Append `chunk` to `file`, hashing as it goes."""
        with self._lock:
            self._require_open()
            self._files[file].write(chunk)
            self._hashes[file].update(chunk)
            if file == "weights":
                self._weights_pieces.update(chunk)
            self._sizes[file] += len(chunk)

    def bytes_written(self, file: AdapterFileKind) -> int:
        """Bytes appended to `file` so far."""
        return self._sizes[file]

    def sha256(self, file: AdapterFileKind) -> str:
        """Lowercase hex sha256 of the bytes appended to `file` so far."""
        with self._lock:
            return self._hashes[file].copy().hexdigest()

    def read(self, file: AdapterFileKind) -> bytes:
        """The bytes written to `file` so far (for validation before commit)."""
        with self._lock:
            self._require_open()
            self._files[file].flush()
            return (self._dir / FILE_NAMES[file]).read_bytes()

    def commit(
        self,
        meta: Mapping[str, Any],
        admit: Callable[[list[AdapterRecord]], None] | None = None,
    ) -> AdapterRecord:
        """Make the upload visible as the next version of the name (and its latest); prune the
        oldest versions beyond the store's `versions_kept`.

        `meta` summarizes the validated adapter: rank, alpha, use_rslora, target_modules (full
        module names) and optionally description. Files and meta.json are fsynced before the
        atomic rename, so after a crash the version either exists whole or not at all.
        `admit`, if given, is called under the store's lock just before the rename with every
        committed version of the tenant's adapters (as all_versions() returns them), and may
        raise to refuse the commit (a quota check no concurrent commit can slip past); the
        upload then stays uncommitted.
        """
        with self._lock:
            self._require_open()
            summary = _check_meta(meta)
            for handle in self._files.values():
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()
            created_at = time.time()
            meta_json = {
                "format": _META_FORMAT,
                "tenant": self.tenant,
                "name": self.name,
                **summary,
                "created_at": created_at,
                "config_sha256": self._hashes["config"].hexdigest(),
                "config_size": self._sizes["config"],
                "weights_sha256": self._hashes["weights"].hexdigest(),
                "weights_size": self._sizes["weights"],
                "weights_piece_bytes": PIECE_BYTES,
                "weights_pieces_sha256": self._weights_pieces.finish(),
            }
            with open(self._dir / META_FILE, "x", encoding="utf-8") as handle:
                json.dump(meta_json, handle, indent=2, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            _fsync_dir(self._dir)
            version = self._store._publish(self.tenant, self.name, self._dir, admit)
            self._state = "committed"
        # Built from memory: a concurrent commit may already have replaced this version on disk.
        return AdapterRecord(
            tenant=self.tenant,
            name=self.name,
            version=version,
            rank=summary["rank"],
            alpha=summary["alpha"],
            use_rslora=summary["use_rslora"],
            target_modules=tuple(summary["target_modules"]),
            size_bytes=meta_json["weights_size"],
            sha256=meta_json["weights_sha256"],
            created_at=created_at,
            description=summary["description"],
            path=self._store.version_dir(self.tenant, self.name, version),
            latest=True,
        )

    def abort(self) -> None:
        """Discard everything written; a no-op after commit() or a previous abort()."""
        with self._lock:
            if self._state != "open":
                return
            self._state = "aborted"
            for handle in self._files.values():
                handle.close()
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> UploadTransaction:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()


class AdapterStore:
    """All tenants' adapters under one root directory. Safe to call from many threads.

    One lock guards every change of what is visible (the publish rename, the delete rename, the
    latest pointer) and every directory scan, so readers never see a version between its rename
    and the pruning it causes. Slow work (writing, fsyncing and hashing files, removing trees)
    happens outside the lock.

    Construction removes everything under root/tmp, so open one AdapterStore per root, once, at
    process start (before any upload can be in progress).
    """

    _cache_records = True
    """Whether records read from meta.json may be reused: true while this process is the only
    writer of the root (SharedAdapterStore turns it off)."""

    def __init__(self, root: Path, versions_kept: int = DEFAULT_VERSIONS_KEPT) -> None:
        if versions_kept < 1:
            raise ValueError(f"versions_kept must be at least 1, got {versions_kept}")
        self.root = Path(root)
        self.versions_kept = versions_kept
        self._tenants_dir = self.root / "tenants"
        self._tmp_dir = self.root / "tmp"
        self._quarantine_dir = self.root / QUARANTINE_DIR
        self._lock = threading.Lock()
        self._records: dict[tuple[str, str], AdapterRecord] = {}
        """Latest record per (tenant, name), read once from meta.json (guarded by _lock)."""
        self._version_records: dict[tuple[str, str, int], AdapterRecord] = {}
        """Record per stored (tenant, name, version), for pinned requests (guarded by _lock)."""
        self._tenants_dir.mkdir(parents=True, exist_ok=True)
        self._tmp_dir.mkdir(parents=True, exist_ok=True)
        self._recover()

    # ----- paths and scanning (callers hold self._lock where it matters) -----

    def _name_dir(self, tenant: str, name: str) -> Path:
        return self._tenants_dir / tenant / name

    def version_dir(self, tenant: str, name: str, version: int) -> Path:
        """Where version `version` of tenant/name lives (whether or not it exists)."""
        return self._name_dir(tenant, name) / f"v{version}"

    @staticmethod
    def _versions(name_dir: Path) -> list[int]:
        """Versions present under a name directory, ascending."""
        try:
            entries = list(name_dir.iterdir())
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            match = _VERSION_DIR.fullmatch(entry.name)
            if match and entry.is_dir():
                found.append(int(match.group(1)))
        return sorted(found)

    @staticmethod
    def _last_version(name_dir: Path) -> int:
        """The highest version ever assigned to the name (survives deletes), 0 if none."""
        try:
            return int((name_dir / LAST_VERSION_FILE).read_text(encoding="ascii"))
        except (FileNotFoundError, ValueError):
            return 0

    @staticmethod
    def _pointer(name_dir: Path) -> int | None:
        """The version `.latest` names, None without one (or with an unreadable one)."""
        try:
            text = (name_dir / LATEST_FILE).read_text(encoding="ascii")
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None
        match = _VERSION_DIR.fullmatch(f"v{text.strip()}")
        return int(match.group(1)) if match else None

    @staticmethod
    def _set_pointer(name_dir: Path, version: int | None) -> None:
        """Durably make `version` the latest (None: the highest, by removing the pointer).

        Write a temp file, fsync it, rename it over `.latest`, fsync the directory: after a crash
        the pointer is the old one or the new one, whole.
        """
        pointer = name_dir / LATEST_FILE
        if version is None:
            try:
                pointer.unlink()
            except FileNotFoundError:
                return
        else:
            staged = name_dir / f"{LATEST_FILE}.tmp"
            with open(staged, "w", encoding="ascii") as handle:
                handle.write(str(version))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(staged, pointer)
        _fsync_dir(name_dir)

    def _latest_of(self, tenant: str, name: str, versions: list[int]) -> int:
        """Which of `versions` (ascending, not empty) a plain `name` means now."""
        pointed = self._pointer(self._name_dir(tenant, name))
        if pointed is None or pointed == versions[-1]:
            return versions[-1]
        if pointed in versions:
            return pointed
        log.warning(
            "adapter tenant=%s name=%s: latest pointer names version %d, which is gone; "
            "serving the highest version, %d",
            tenant,
            name,
            pointed,
            versions[-1],
        )
        return versions[-1]

    def _move_to_tmp(self, path: Path) -> Path:
        """Atomically take `path` out of view; the caller removes the returned path later."""
        target = Path(tempfile.mkdtemp(dir=self._tmp_dir, prefix="removed-"))
        destination = target / path.name
        os.rename(path, destination)
        return target

    def _forget_records(self, tenant: str, name: str) -> None:
        """Drops every cached record of tenant/name (after any change to its versions)."""
        self._records.pop((tenant, name), None)
        for key in [k for k in self._version_records if k[0] == tenant and k[1] == name]:
            del self._version_records[key]

    @contextlib.contextmanager
    def _changing(self, tenant: str, name: str) -> Iterator[None]:
        """Holds the lock for a change to tenant/name's versions; drops its cached records on
        the way out, also when the change failed half-way (the disk may differ from the cache)."""
        with self._lock:
            try:
                yield
            finally:
                self._forget_records(tenant, name)

    @staticmethod
    def _prunable(versions: list[int], latest: int, kept: int) -> list[int]:
        """The oldest versions beyond `kept`, never `latest` (versions ascending)."""
        excess = len(versions) - kept
        if excess <= 0:
            return []
        return [v for v in versions if v != latest][:excess]

    # ----- recovery -----

    def _recover(self) -> None:
        """Clean up after a crash and set aside what the disk corrupted, before serving anything.

        Removes everything under tmp/ (uploads and deletes in flight). Every stored version is
        re-hashed against its meta.json; one that does not match is quarantined. A latest
        pointer to a version that is gone is removed (the highest valid version is then the
        latest, logged), and versions beyond `versions_kept` (a crash between a publish and its
        pruning, or a lowered setting) are pruned, oldest first, never the latest.
        """
        for entry in self._tmp_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        garbage: list[Path] = []
        for tenant_dir in sorted(self._tenants_dir.iterdir()):
            if not tenant_dir.is_dir():
                continue
            for name_dir in sorted(tenant_dir.iterdir()):
                if not name_dir.is_dir():
                    continue
                garbage.extend(self._recover_name(tenant_dir.name, name_dir))
        for path in garbage:
            shutil.rmtree(path, ignore_errors=True)

    def _recover_name(self, tenant: str, name_dir: Path) -> list[Path]:
        """_recover() for one name directory; returns the pruned versions' new paths."""
        name = name_dir.name
        valid: list[int] = []
        for version in self._versions(name_dir):
            path = name_dir / f"v{version}"
            reason = _verify_version(path, tenant, name, version)
            if reason is None:
                valid.append(version)
                continue
            try:
                self._quarantine(tenant, name, version, path, reason)
            except OSError as exc:
                # Still start: reads re-check checksums, so the version is never served.
                log.error(
                    "could not quarantine corrupt adapter tenant=%s name=%s version=%d (%s): %s",
                    tenant,
                    name,
                    version,
                    reason,
                    exc,
                )
        pointed = self._pointer(name_dir)
        if pointed is not None and pointed not in valid:
            log.error(
                "adapter tenant=%s name=%s: the latest pointer names version %d, which is "
                "missing or quarantined; the latest is now the highest valid version (%s)",
                tenant,
                name,
                pointed,
                valid[-1] if valid else "none left",
            )
            self._set_pointer(name_dir, None)
            pointed = None
        if not valid:
            return []
        latest = valid[-1] if pointed is None else pointed
        garbage = [
            self._move_to_tmp(name_dir / f"v{version}")
            for version in self._prunable(valid, latest, self.versions_kept)
        ]
        if garbage:
            _fsync_dir(name_dir)
        return garbage

    def _quarantine(self, tenant: str, name: str, version: int, path: Path, reason: str) -> None:
        """Move a version that failed verification out of view, keeping its number used."""
        name_dir = path.parent
        # Keep the number taken even if .last_version was lost: a re-upload gets a higher one.
        if self._last_version(name_dir) < version:
            counter = name_dir / f"{LAST_VERSION_FILE}.tmp"
            counter.write_text(str(version), encoding="ascii")
            os.replace(counter, name_dir / LAST_VERSION_FILE)
        target_dir = self._quarantine_dir / tenant / name
        target_dir.mkdir(parents=True, exist_ok=True)
        stamp = int(time.time())
        target = target_dir / f"v{version}-{stamp}"
        suffix = 1
        while target.exists():
            target = target_dir / f"v{version}-{stamp}.{suffix}"
            suffix += 1
        os.rename(path, target)
        _fsync_dir(name_dir)
        _fsync_dir(target_dir)
        log.error(
            "quarantined corrupt adapter tenant=%s name=%s version=%d: %s (moved to %s)",
            tenant,
            name,
            version,
            reason,
            target,
        )

    # ----- writes -----

    def begin_upload(self, tenant: str, name: str) -> UploadTransaction:
        """Start an upload of adapter `name` for `tenant`; nothing is visible until commit()."""
        validate_tenant_name(tenant)
        validate_adapter_name(name)
        directory = Path(tempfile.mkdtemp(dir=self._tmp_dir, prefix="upload-"))
        try:
            return UploadTransaction(self, tenant, name, directory)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise

    def _publish(
        self,
        tenant: str,
        name: str,
        directory: Path,
        admit: Callable[[list[AdapterRecord]], None] | None = None,
    ) -> int:
        """Rename a finished upload directory into place as the next (and latest) version, prune
        the oldest beyond versions_kept; return the new version."""
        name_dir = self._name_dir(tenant, name)
        with self._changing(tenant, name):
            if admit is not None:
                admit(self._all_versions_locked(tenant))
            created = not name_dir.exists()
            name_dir.mkdir(parents=True, exist_ok=True)
            if created:
                _fsync_dir(name_dir.parent)
                _fsync_dir(self._tenants_dir)
            existing = self._versions(name_dir)
            version = max([self._last_version(name_dir), *existing]) + 1
            # Record the number before using it, so a later delete cannot lead to its reuse
            # (caches key on (tenant, name, version)). Losing this write in a crash is harmless.
            counter = name_dir / f"{LAST_VERSION_FILE}.tmp"
            counter.write_text(str(version), encoding="ascii")
            os.replace(counter, name_dir / LAST_VERSION_FILE)
            os.rename(directory, name_dir / f"v{version}")
            _fsync_dir(name_dir)
            # The new version is the highest: a rollback's pointer no longer applies. A crash
            # before this leaves the rolled-back version latest and the unacknowledged upload
            # stored beside it, not latest.
            self._set_pointer(name_dir, None)
            pruned = self._prunable([*existing, version], version, self.versions_kept)
            garbage = [self._move_to_tmp(name_dir / f"v{old}") for old in pruned]
            if garbage:
                _fsync_dir(name_dir)
        for path in garbage:
            shutil.rmtree(path, ignore_errors=True)
        return version

    def delete(self, tenant: str, name: str) -> AdapterRecord:
        """Remove every version of tenant/name; return the record of the latest one."""
        validate_tenant_name(tenant)
        validate_adapter_name(name)
        name_dir = self._name_dir(tenant, name)
        with self._changing(tenant, name):
            corrupt: AdapterCorruptError | None = None
            try:
                record = self._latest(tenant, name)
            except AdapterCorruptError as exc:
                # Still delete: a tenant must be able to get rid of a broken adapter.
                corrupt = exc
            garbage = [self._move_to_tmp(name_dir / f"v{v}") for v in self._versions(name_dir)]
            self._set_pointer(name_dir, None)
            _fsync_dir(name_dir)
        for path in garbage:
            shutil.rmtree(path, ignore_errors=True)
        if corrupt is not None:
            raise AdapterCorruptError(
                f"deleted {tenant}/{name}, whose files were corrupt: {corrupt}"
            )
        return record

    def delete_version(self, tenant: str, name: str, version: int) -> AdapterRecord:
        """Remove one version of tenant/name; return its record (`latest` as it was).

        Deleting the latest makes the newest remaining version the latest; deleting the only one
        deletes the adapter (its version numbers stay used).
        """
        validate_tenant_name(tenant)
        validate_adapter_name(name)
        name_dir = self._name_dir(tenant, name)
        with self._changing(tenant, name):
            versions = self._versions(name_dir)
            if version not in versions:
                raise _version_not_found(name, version)
            latest = self._latest_of(tenant, name, versions) == version
            corrupt: AdapterCorruptError | None = None
            record: AdapterRecord | None = None
            try:
                record = replace(self._version_record(tenant, name, version), latest=latest)
            except AdapterCorruptError as exc:
                corrupt = exc
            if latest:
                # Pointer first: a crash in between leaves the highest version latest, which is
                # what it becomes anyway once this version is gone (or this one, if highest).
                self._set_pointer(name_dir, None)
            garbage = self._move_to_tmp(name_dir / f"v{version}")
            _fsync_dir(name_dir)
        shutil.rmtree(garbage, ignore_errors=True)
        if corrupt is not None:
            raise AdapterCorruptError(
                f"deleted {tenant}/{name} version {version}, whose files were corrupt: {corrupt}"
            )
        assert record is not None
        return record

    def rollback(self, tenant: str, name: str, version: int) -> AdapterRecord:
        """Make stored `version` the latest of tenant/name, durably; return its record.

        AdapterNotFoundError if that version is not stored; a no-op (still durable) when it is
        the latest already. A later upload becomes the highest version and the latest again.
        """
        validate_tenant_name(tenant)
        validate_adapter_name(name)
        name_dir = self._name_dir(tenant, name)
        with self._changing(tenant, name):
            versions = self._versions(name_dir)
            if version not in versions:
                raise _version_not_found(name, version)
            # Refuse to point at files that no longer match their checksums.
            record = self._version_record(tenant, name, version)
            self._set_pointer(name_dir, None if version == versions[-1] else version)
        return replace(record, latest=True)

    # ----- reads -----

    def _latest(self, tenant: str, name: str) -> AdapterRecord:
        # Every write goes through this process (commit, delete, rollback), which drops the
        # entry, so a cached record is current; this keeps disk reads out of each request's path.
        if self._cache_records:
            cached = self._records.get((tenant, name))
            if cached is not None:
                return cached
        versions = self._versions(self._name_dir(tenant, name))
        if not versions:
            raise AdapterNotFoundError(f"adapter {name!r} not found")
        version = self._latest_of(tenant, name, versions)
        path = self.version_dir(tenant, name, version)
        record = replace(_record_from_meta(path, tenant, name, version), latest=True)
        if self._cache_records:
            self._records[(tenant, name)] = record
        return record

    def _version_record(self, tenant: str, name: str, version: int) -> AdapterRecord:
        """The record of one stored version (its `latest` flag unset); caller holds the lock."""
        key = (tenant, name, version)
        if self._cache_records:
            cached = self._version_records.get(key)
            if cached is not None:
                return cached
        path = self.version_dir(tenant, name, version)
        if not path.is_dir():
            raise _version_not_found(name, version)
        record = _record_from_meta(path, tenant, name, version)
        if self._cache_records:
            self._version_records[key] = record
        return record

    def get(self, tenant: str, name: str) -> AdapterRecord:
        """The latest version of tenant/name; AdapterNotFoundError if there is none."""
        validate_tenant_name(tenant)
        validate_adapter_name(name)
        with self._lock:
            return self._latest(tenant, name)

    def get_version(self, tenant: str, name: str, version: int) -> AdapterRecord:
        """Version `version` of tenant/name, `latest` set if it is the latest now;
        AdapterNotFoundError if that version is not stored."""
        validate_tenant_name(tenant)
        validate_adapter_name(name)
        with self._lock:
            record = self._version_record(tenant, name, version)
            try:
                # The cached latest record (in this process's store): no disk read per request.
                latest = self._latest(tenant, name).version == version
            except AdapterCorruptError:
                latest = False  # the latest is damaged, so it is not this readable version
            return replace(record, latest=True) if latest else record

    def list_versions(self, tenant: str, name: str) -> list[AdapterRecord]:
        """Every stored version of tenant/name, oldest first, exactly one with `latest` set;
        AdapterNotFoundError if there is none. A version whose meta.json is unreadable is
        left out (logged), as in list()."""
        validate_tenant_name(tenant)
        validate_adapter_name(name)
        with self._lock:
            versions = self._versions(self._name_dir(tenant, name))
            if not versions:
                raise AdapterNotFoundError(f"adapter {name!r} not found")
            latest = self._latest_of(tenant, name, versions)
            records = []
            for version in versions:
                try:
                    record = self._version_record(tenant, name, version)
                except AdapterCorruptError as exc:
                    if version == latest:
                        raise  # get() reports the same: the name's latest is unusable
                    log.error("skipping corrupt adapter version in listing: %s", exc)
                    continue
                records.append(replace(record, latest=version == latest))
            return records

    def list(self, tenant: str) -> list[AdapterRecord]:
        """The latest version of each of the tenant's adapters, sorted by name."""
        validate_tenant_name(tenant)
        with self._lock:
            return self._list_locked(tenant)

    def _names_locked(self, tenant: str) -> list[str]:
        try:
            return sorted(e.name for e in (self._tenants_dir / tenant).iterdir() if e.is_dir())
        except FileNotFoundError:
            return []

    def _list_locked(self, tenant: str) -> list[AdapterRecord]:
        """list() for a caller that holds self._lock."""
        records = []
        for name in self._names_locked(tenant):
            try:
                records.append(self._latest(tenant, name))
            except AdapterNotFoundError:
                continue  # deleted: only its version counter is left
            except AdapterCorruptError as exc:
                # One broken adapter must not hide the tenant's others; get() reports it.
                log.error("skipping corrupt adapter in listing: %s", exc)
        return records

    def all_versions(self, tenant: str) -> list[AdapterRecord]:
        """Every stored version of every adapter of the tenant (what its quota counts), by name
        then version; versions with unreadable meta.json are left out (logged)."""
        validate_tenant_name(tenant)
        with self._lock:
            return self._all_versions_locked(tenant)

    def _all_versions_locked(self, tenant: str) -> list[AdapterRecord]:
        records = []
        for name in self._names_locked(tenant):
            for version in self._versions(self._name_dir(tenant, name)):
                try:
                    records.append(self._version_record(tenant, name, version))
                except (AdapterNotFoundError, AdapterCorruptError) as exc:
                    log.error("not counting unreadable adapter version: %s", exc)
        return records

    def tenants(self) -> list[str]:
        """Tenants that have at least one adapter, sorted."""
        with self._lock:
            return sorted(
                tenant_dir.name
                for tenant_dir in self._tenants_dir.iterdir()
                if tenant_dir.is_dir()
                and any(
                    self._versions(name_dir)
                    for name_dir in tenant_dir.iterdir()
                    if name_dir.is_dir()
                )
            )

    def read_files(self, record: AdapterRecord) -> tuple[bytes, bytes]:
        """(adapter_config.json, adapter_model.safetensors) of `record`, checksums verified.

        AdapterNotFoundError if the version was replaced or deleted meanwhile (get() again);
        AdapterCorruptError if the bytes on disk no longer match meta.json.
        """
        files = self.read_unverified(record)
        files.verify()
        return files.config, files.weights

    def read_unverified(self, record: AdapterRecord) -> StoredFiles:
        """The files of `record` as read, with what meta.json recorded; nothing is usable
        until StoredFiles.verify() has returned. Lets a reader hash on one thread while it
        checks the same bytes on another (hashing a 1B model's adapter takes milliseconds).

        AdapterNotFoundError if the version was replaced or deleted meanwhile; the bytes of
        meta.json are checked here (AdapterCorruptError), the checksums by verify().
        """
        try:
            # Open all three first: once open, a concurrent replace or delete (rename, then
            # unlink) cannot change what we read, so the three always belong together.
            with (
                open(record.path / META_FILE, "rb") as meta_handle,
                open(record.path / FILE_NAMES["config"], "rb") as config_handle,
                open(record.path / FILE_NAMES["weights"], "rb") as weights_handle,
            ):
                meta_bytes = meta_handle.read()
                config = config_handle.read()
                weights = weights_handle.read()
        except FileNotFoundError:
            raise AdapterNotFoundError(
                f"adapter {record.name!r} version {record.version} was replaced or deleted"
            ) from None
        try:
            meta = json.loads(meta_bytes)
            expected = (
                (meta["config_sha256"], meta["config_size"]),
                (meta["weights_sha256"], meta["weights_size"]),
            )
            pieces = _recorded_pieces(meta)
        except (ValueError, KeyError, TypeError) as exc:
            raise AdapterCorruptError(f"{record.path / META_FILE} is unreadable: {exc}") from None
        return StoredFiles(record.path, config, weights, expected, pieces)


def _recorded_pieces(meta: Mapping[str, Any]) -> tuple[str, ...] | None:
    """meta.json's piece sums of the weights file; None where it has none (a version stored
    before they were recorded). ValueError where they cannot describe the recorded file."""
    if "weights_pieces_sha256" not in meta:
        return None
    pieces, piece_bytes, size = (
        meta["weights_pieces_sha256"],
        meta["weights_piece_bytes"],
        meta["weights_size"],
    )
    if piece_bytes != PIECE_BYTES:
        raise ValueError(f"weights_piece_bytes is {piece_bytes!r}, not {PIECE_BYTES}")
    if not isinstance(size, int) or not isinstance(pieces, list):
        raise ValueError("weights_size must be an integer and weights_pieces_sha256 a list")
    if len(pieces) != -(-size // PIECE_BYTES) or not all(isinstance(p, str) for p in pieces):
        raise ValueError(f"weights_pieces_sha256 must hold one sum per {PIECE_BYTES} bytes")
    return tuple(pieces)


def _version_not_found(name: str, version: int) -> AdapterNotFoundError:
    """The one message for a missing `name@N` (the same shape as a missing adapter's)."""
    return AdapterNotFoundError(f"adapter {format_ref(name, version)!r} not found")
