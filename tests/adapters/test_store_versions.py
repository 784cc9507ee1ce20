"""Kept versions, the latest pointer, rollback and single-version deletes of the adapter store.

Each behaviour is checked in AdapterStore and, where it matters across processes, in
SharedAdapterStore (the same root opened twice, as Ray replicas do).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from test_adapter_store import upload

from loraserve.adapters import store as store_module
from loraserve.adapters.errors import AdapterCorruptError, AdapterNotFoundError
from loraserve.adapters.shared_store import SharedAdapterStore
from loraserve.adapters.store import LAST_VERSION_FILE, LATEST_FILE, AdapterStore


def stored(store: AdapterStore, tenant: str, name: str) -> list[int]:
    return [r.version for r in store.list_versions(tenant, name)]


def latest(store: AdapterStore, tenant: str, name: str) -> int:
    return store.get(tenant, name).version


def name_dir(root: Path, tenant: str = "t", name: str = "a") -> Path:
    return root / "tenants" / tenant / name


def test_uploads_keep_the_newest_versions_and_prune_the_oldest(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, versions_kept=3)
    for i in range(1, 6):
        record = upload(store, "t", "a", weights=f"w{i}".encode())
        assert record.version == i and record.latest
    assert stored(store, "t", "a") == [3, 4, 5]
    versions = store.list_versions("t", "a")
    assert [r.latest for r in versions] == [False, False, True]
    # Each kept version still reads its own bytes.
    assert [store.read_files(r)[1] for r in versions] == [b"w3", b"w4", b"w5"]
    assert sorted(p.name for p in name_dir(tmp_path).iterdir() if p.is_dir()) == ["v3", "v4", "v5"]
    assert list((tmp_path / "tmp").iterdir()) == []
    # A pruned version is gone for every kind of lookup.
    with pytest.raises(AdapterNotFoundError, match=r"'a@2' not found"):
        store.get_version("t", "a", 2)
    with pytest.raises(AdapterNotFoundError):
        store.rollback("t", "a", 1)
    # all_versions (what quotas count) sees every kept version of every name.
    upload(store, "t", "b", weights=b"bb")
    assert [(r.name, r.version) for r in store.all_versions("t")] == [
        ("a", 3),
        ("a", 4),
        ("a", 5),
        ("b", 1),
    ]


def test_get_version_reports_whether_it_is_the_latest(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    upload(store, "t", "a", weights=b"one")
    upload(store, "t", "a", weights=b"two")
    old, new = store.get_version("t", "a", 1), store.get_version("t", "a", 2)
    assert (old.version, old.latest, new.version, new.latest) == (1, False, 2, True)
    assert store.read_files(old)[1] == b"one"
    with pytest.raises(AdapterNotFoundError, match=r"'a@3' not found"):
        store.get_version("t", "a", 3)
    with pytest.raises(AdapterNotFoundError):
        store.get_version("other", "a", 1)  # another tenant's namespace is separate


def test_rollback_is_durable_and_a_later_upload_becomes_the_latest(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    for i in range(1, 4):
        upload(store, "t", "a", weights=f"w{i}".encode())
    record = store.rollback("t", "a", 1)
    assert record.version == 1 and record.latest
    assert latest(store, "t", "a") == 1
    assert store.read_files(store.get("t", "a"))[1] == b"w1"
    assert [r.latest for r in store.list_versions("t", "a")] == [True, False, False]
    assert [r.version for r in store.list("t")] == [1]
    assert (name_dir(tmp_path) / LATEST_FILE).read_text() == "1"
    # Survives a restart (a fresh store reads the pointer).
    assert latest(AdapterStore(tmp_path), "t", "a") == 1
    # Rolling back to the latest again is a no-op; to the highest removes the pointer.
    assert store.rollback("t", "a", 1).version == 1
    store.rollback("t", "a", 3)
    assert latest(store, "t", "a") == 3 and not (name_dir(tmp_path) / LATEST_FILE).exists()
    store.rollback("t", "a", 2)
    # The next upload is max+1 (never a reused number) and the latest.
    assert upload(store, "t", "a", weights=b"w4").version == 4
    assert latest(store, "t", "a") == 4 and not (name_dir(tmp_path) / LATEST_FILE).exists()
    assert latest(AdapterStore(tmp_path), "t", "a") == 4


def test_rollback_to_a_missing_version_changes_nothing(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    upload(store, "t", "a")
    upload(store, "t", "a")
    for version in (3, 99):
        with pytest.raises(AdapterNotFoundError, match=rf"'a@{version}' not found"):
            store.rollback("t", "a", version)
    with pytest.raises(AdapterNotFoundError):
        store.rollback("t", "missing", 1)
    assert latest(store, "t", "a") == 2 and not (name_dir(tmp_path) / LATEST_FILE).exists()
    assert not name_dir(tmp_path, name="missing").exists()


def test_rollback_refuses_a_version_whose_meta_is_broken(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    first = upload(store, "t", "a")
    upload(store, "t", "a")
    (first.path / "meta.json").write_text("garbage")
    with pytest.raises(AdapterCorruptError):
        store.rollback("t", "a", 1)
    assert latest(store, "t", "a") == 2


def test_pruning_never_removes_the_rolled_back_latest(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, versions_kept=2)
    upload(store, "t", "a")
    upload(store, "t", "a")
    store.rollback("t", "a", 1)
    # Reopened with fewer versions kept: v1 is the latest and stays, v2 goes.
    reopened = AdapterStore(tmp_path, versions_kept=1)
    assert stored(reopened, "t", "a") == [1] and latest(reopened, "t", "a") == 1
    # An upload is the new latest; the old latest is then an ordinary old version.
    store = AdapterStore(tmp_path, versions_kept=2)
    assert upload(store, "t", "a").version == 3
    assert stored(store, "t", "a") == [1, 3] and latest(store, "t", "a") == 3


def test_deleting_one_version(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    for i in range(1, 5):
        upload(store, "t", "a", weights=f"w{i}".encode())
    store.rollback("t", "a", 2)
    # A version that is not the latest: the latest stays.
    deleted = store.delete_version("t", "a", 3)
    assert deleted.version == 3 and not deleted.latest
    assert stored(store, "t", "a") == [1, 2, 4] and latest(store, "t", "a") == 2
    # The latest (pointed at): the newest remaining becomes the latest.
    deleted = store.delete_version("t", "a", 2)
    assert deleted.version == 2 and deleted.latest
    assert stored(store, "t", "a") == [1, 4] and latest(store, "t", "a") == 4
    assert not (name_dir(tmp_path) / LATEST_FILE).exists()
    # The latest as the highest: the next highest takes over.
    store.delete_version("t", "a", 4)
    assert latest(store, "t", "a") == 1
    assert latest(AdapterStore(tmp_path), "t", "a") == 1
    with pytest.raises(AdapterNotFoundError, match=r"'a@4' not found"):
        store.delete_version("t", "a", 4)
    # The only one: the adapter is gone, and its numbers stay used.
    store.delete_version("t", "a", 1)
    with pytest.raises(AdapterNotFoundError):
        store.get("t", "a")
    assert store.list("t") == [] and store.tenants() == []
    assert upload(store, "t", "a").version == 5
    assert list((tmp_path / "tmp").iterdir()) == []


def test_deleting_all_versions_removes_the_pointer(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    upload(store, "t", "a")
    upload(store, "t", "a")
    store.rollback("t", "a", 1)
    assert store.delete("t", "a").version == 1  # the latest is what it reports
    assert not (name_dir(tmp_path) / LATEST_FILE).exists()
    assert (name_dir(tmp_path) / LAST_VERSION_FILE).read_text() == "2"
    assert upload(store, "t", "a").version == 3 and latest(store, "t", "a") == 3


def test_a_failed_pointer_write_leaves_the_old_latest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash (here: an error) between writing the new pointer and renaming it into place."""
    store = AdapterStore(tmp_path)
    for _ in range(3):
        upload(store, "t", "a")
    store.rollback("t", "a", 1)

    def crash(src: object, dst: object) -> None:
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(store_module.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        store.rollback("t", "a", 2)
    monkeypatch.undo()
    assert latest(store, "t", "a") == 1
    # The half-written temp pointer is ignored by a restart, and replaced by the next rollback.
    assert (name_dir(tmp_path) / f"{LATEST_FILE}.tmp").exists()
    reopened = AdapterStore(tmp_path)
    assert latest(reopened, "t", "a") == 1
    reopened.rollback("t", "a", 2)
    assert latest(AdapterStore(tmp_path), "t", "a") == 2


def test_a_crash_between_publish_and_pointer_removal_keeps_the_rolled_back_latest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = AdapterStore(tmp_path)
    upload(store, "t", "a")
    upload(store, "t", "a")
    store.rollback("t", "a", 1)

    def crash(name_dir: Path, version: int | None) -> None:
        raise OSError("simulated crash after the rename")

    monkeypatch.setattr(AdapterStore, "_set_pointer", staticmethod(crash))
    with pytest.raises(OSError, match="simulated"):
        upload(store, "t", "a")
    monkeypatch.undo()
    # The upload was never acknowledged: after a restart its version is stored, not latest.
    reopened = AdapterStore(tmp_path)
    assert stored(reopened, "t", "a") == [1, 2, 3] and latest(reopened, "t", "a") == 1
    assert upload(reopened, "t", "a").version == 4 and latest(reopened, "t", "a") == 4


def test_a_dangling_pointer_falls_back_to_the_highest_version(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A crash in the middle of deleting the pointed-at version, or an operator's hand."""
    store = AdapterStore(tmp_path)
    for _ in range(3):
        upload(store, "t", "a")
    (name_dir(tmp_path) / LATEST_FILE).write_text("2")
    (name_dir(tmp_path) / "v2").rename(tmp_path / "tmp" / "v2")
    with caplog.at_level(logging.ERROR, logger="loraserve.adapters.store"):
        reopened = AdapterStore(tmp_path)
    assert "latest pointer names version 2" in caplog.text
    assert latest(reopened, "t", "a") == 3 and stored(reopened, "t", "a") == [1, 3]
    assert not (name_dir(tmp_path) / LATEST_FILE).exists()


def test_a_quarantined_latest_falls_back_to_the_highest_valid_version(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = AdapterStore(tmp_path)
    for i in range(1, 5):
        upload(store, "t", "a", weights=f"w{i}".encode())
    store.rollback("t", "a", 2)
    # Damage the rolled-back latest and the highest version.
    for version in (2, 4):
        (name_dir(tmp_path) / f"v{version}" / "adapter_model.safetensors").write_bytes(b"xx")
    with caplog.at_level(logging.ERROR, logger="loraserve.adapters.store"):
        reopened = AdapterStore(tmp_path)
    assert "quarantined corrupt adapter tenant=t name=a version=2" in caplog.text
    assert "missing or quarantined" in caplog.text
    assert stored(reopened, "t", "a") == [1, 3]
    assert latest(reopened, "t", "a") == 3
    assert reopened.read_files(reopened.get("t", "a"))[1] == b"w3"
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "quarantine/t/a").iterdir()) == [
        "v2",
        "v4",
    ]
    # Quarantined numbers stay used.
    assert upload(reopened, "t", "a").version == 5


def test_shared_stores_see_each_others_rollbacks_and_version_deletes(tmp_path: Path) -> None:
    first = SharedAdapterStore(tmp_path, versions_kept=3)
    second = SharedAdapterStore(tmp_path, versions_kept=3)
    for i in range(1, 5):
        upload(first, "t", "a", weights=f"w{i}".encode())
    assert stored(second, "t", "a") == [2, 3, 4] and latest(second, "t", "a") == 4
    # Read (and, in a plain store, cached) by second; a rollback through first must show.
    second.get_version("t", "a", 2)
    first.rollback("t", "a", 2)
    assert latest(second, "t", "a") == 2
    assert second.read_files(second.get("t", "a"))[1] == b"w2"
    assert [r.latest for r in second.list_versions("t", "a")] == [True, False, False]
    # Deleting the latest through second: first sees the newest remaining as latest.
    assert second.delete_version("t", "a", 2).latest
    assert latest(first, "t", "a") == 4 and stored(first, "t", "a") == [3, 4]
    with pytest.raises(AdapterNotFoundError):
        first.get_version("t", "a", 2)
    # Numbers are never reused, whichever process uploads next.
    second.rollback("t", "a", 3)
    assert upload(second, "t", "a", weights=b"w5").version == 5
    assert latest(first, "t", "a") == 5 and stored(first, "t", "a") == [3, 4, 5]
    # A third process starting on the root keeps all of it.
    third = SharedAdapterStore(tmp_path, versions_kept=3)
    assert stored(third, "t", "a") == [3, 4, 5] and latest(third, "t", "a") == 5


def test_the_plain_store_caches_version_records_the_shared_one_rereads(tmp_path: Path) -> None:
    """Why the shared store must not cache pinned-version records either."""
    plain = AdapterStore(tmp_path)
    upload(plain, "t", "a")
    upload(plain, "t", "a")
    plain.get_version("t", "a", 1)
    SharedAdapterStore(tmp_path).delete_version("t", "a", 1)
    assert plain.get_version("t", "a", 1).version == 1  # stale cache in the plain store
    with pytest.raises(AdapterNotFoundError):
        SharedAdapterStore(tmp_path).get_version("t", "a", 1)


def test_versions_kept_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="versions_kept"):
        AdapterStore(tmp_path, versions_kept=0)


def test_a_crash_mid_delete_of_the_latest_leaves_a_consistent_latest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pointer removed, version not yet renamed away: the highest version is the latest, which
    is what the finished delete would also have left."""
    store = AdapterStore(tmp_path)
    for _ in range(3):
        upload(store, "t", "a")
    store.rollback("t", "a", 2)

    def crash(self: AdapterStore, path: Path) -> Path:
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(AdapterStore, "_move_to_tmp", crash)
    with pytest.raises(OSError, match="simulated"):
        store.delete_version("t", "a", 2)
    monkeypatch.undo()
    assert latest(store, "t", "a") == 3  # the failed change left no stale cached latest
    reopened = AdapterStore(tmp_path)
    assert stored(reopened, "t", "a") == [1, 2, 3] and latest(reopened, "t", "a") == 3
    reopened.delete_version("t", "a", 2)  # the retried delete
    assert stored(reopened, "t", "a") == [1, 3] and latest(reopened, "t", "a") == 3


def test_the_pointer_and_its_directory_are_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = AdapterStore(tmp_path)
    upload(store, "t", "a")
    upload(store, "t", "a")
    synced_dirs: list[Path] = []
    synced_files: list[str] = []
    real_fsync = store_module.os.fsync

    def record_fsync(fd: int) -> None:
        synced_files.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(store_module, "_fsync_dir", synced_dirs.append)
    monkeypatch.setattr(store_module.os, "fsync", record_fsync)
    store.rollback("t", "a", 1)
    pointer_dir = name_dir(tmp_path)
    assert synced_files == [str(pointer_dir / f"{LATEST_FILE}.tmp")]  # before the rename
    assert synced_dirs == [pointer_dir]  # after it
