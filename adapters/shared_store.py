"""The adapter store shared by several server processes (Ray Serve replicas) on one filesystem.

AdapterStore assumes it is the only writer of its root: it caches each name's latest record and
clears all of tmp/ when it opens. With N replicas on one directory (NFS or similar in
production, one local directory in tests) neither holds, so this subclass:

- reads records (and the `.latest` pointer) from disk on every lookup (no cached "latest": an
  upload, new version, rollback or delete through any replica is what every replica sees on its
  next request);
- takes an exclusive `flock` on `root/.lock` (besides the in-process lock) around every publish,
  delete, rollback and directory scan, so no process reads a name mid-rename in another;
- keeps each process's uploads in flight under `tmp/<owner>/`, an owner holding a `flock` on
  `tmp/<owner>.lock` while it lives: opening a store removes only the debris of owners whose
  lock is free (dead processes), never another replica's upload in progress.

Needs POSIX rename atomicity and working `flock` on the shared filesystem (local disks, NFSv4).
Quotas are read from the shared directory, so they hold cluster-wide; two uploads racing for the
last slot on different replicas can both pass the check (the window is the upload's duration).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import threading
import uuid
from pathlib import Path
from types import TracebackType

from loraserve.adapters.store import DEFAULT_VERSIONS_KEPT, AdapterStore

LOCK_FILE = ".lock"


class _ProcessAndFileLock:
    """A threading lock plus an exclusive flock on one file: excludes threads and processes."""

    def __init__(self, path: Path) -> None:
        self._thread_lock = threading.Lock()
        self._path = path

    def __enter__(self) -> None:
        self._thread_lock.acquire()
        try:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            os.close(self._fd)  # closing the descriptor releases the flock
        finally:
            self._thread_lock.release()


class SharedAdapterStore(AdapterStore):
    """An AdapterStore that several processes may open on the same root at once.

    Versions, retention and rollback behave as in AdapterStore: every process must be opened
    with the same `versions_kept` (the one publishing prunes).
    """

    # Another process may have published, rolled back or deleted since the last read: never
    # trust a cached record (callers hold self._lock, which is also the file lock).
    _cache_records = False

    def __init__(self, root: Path, versions_kept: int = DEFAULT_VERSIONS_KEPT) -> None:
        root = Path(root)
        (root / "tmp").mkdir(parents=True, exist_ok=True)
        self.owner = f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # Held for the life of this store (this process): others see the owner alive.
        self._owner_fd = os.open(root / "tmp" / f"{self.owner}.lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(self._owner_fd, fcntl.LOCK_EX)
        super().__init__(root, versions_kept)

    def _recover(self) -> None:
        # The base class clears self._tmp_dir and checks every stored version; point it at this
        # owner's own directory and do it under the cluster-wide lock.
        shared_tmp = self._tmp_dir
        self._tmp_dir = shared_tmp / self.owner
        self._tmp_dir.mkdir(parents=True, exist_ok=True)
        self._lock = _ProcessAndFileLock(self.root / LOCK_FILE)  # type: ignore[assignment]
        with self._lock:
            _remove_dead_owners(shared_tmp, self.owner)
            super()._recover()


def _remove_dead_owners(shared_tmp: Path, own: str) -> None:
    """Removes tmp/<owner>/ of every owner whose lock nobody holds (its process is gone)."""
    for lock_path in shared_tmp.glob("*.lock"):
        owner = lock_path.name.removesuffix(".lock")
        if owner == own:
            continue
        fd = os.open(lock_path, os.O_RDWR)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # alive
            shutil.rmtree(shared_tmp / owner, ignore_errors=True)
            lock_path.unlink(missing_ok=True)
        finally:
            os.close(fd)
    # Debris of a single-process store on this root (files directly under tmp/, not owned).
    for entry in shared_tmp.iterdir():
        if entry.name.startswith(("upload-", "removed-")):
            shutil.rmtree(entry, ignore_errors=True)
