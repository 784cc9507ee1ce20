"""The on-disk adapter store: visibility only at commit, versions, deletes, crash leftovers."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

from loraserve.adapters.errors import (
    AdapterCorruptError,
    AdapterNotFoundError,
    AdapterValidationError,
)
from loraserve.adapters.store import AdapterRecord, AdapterStore

META = {
    "rank": 4,
    "alpha": 8.0,
    "use_rslora": False,
    "target_modules": ["m.layers.1.q", "m.layers.0.q"],
    "description": "test adapter",
}


def upload(
    store: AdapterStore,
    tenant: str,
    name: str,
    config: bytes = b'{"peft_type": "LORA"}',
    weights: bytes = b"weights",
    **meta: object,
) -> AdapterRecord:
    with store.begin_upload(tenant, name) as txn:
        txn.write("config", config)
        # Several chunks, as a gRPC stream delivers them.
        for start in range(0, len(weights), 3):
            txn.write("weights", weights[start : start + 3])
        return txn.commit({**META, **meta})


def visible_files(root: Path) -> list[str]:
    """Everything under tenants/ except version counters, as relative paths."""
    return sorted(
        str(path.relative_to(root))
        for path in (root / "tenants").rglob("*")
        if path.is_file() and not path.name.startswith(".")
    )


def test_commit_get_list_delete(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    record = upload(store, "acme", "support-bot", weights=b"0123456789")
    assert record.tenant == "acme" and record.name == "support-bot" and record.version == 1
    assert record.rank == 4 and record.alpha == 8.0 and record.use_rslora is False
    assert record.target_modules == ("m.layers.0.q", "m.layers.1.q")  # sorted
    assert record.size_bytes == 10
    assert record.sha256 == hashlib.sha256(b"0123456789").hexdigest()
    assert record.description == "test adapter"
    assert record.path == tmp_path / "tenants" / "acme" / "support-bot" / "v1"
    assert store.get("acme", "support-bot") == record
    assert store.read_files(record) == (b'{"peft_type": "LORA"}', b"0123456789")

    upload(store, "acme", "alpha")
    upload(store, "other", "support-bot")
    assert [r.name for r in store.list("acme")] == ["alpha", "support-bot"]
    assert store.tenants() == ["acme", "other"]

    assert store.delete("acme", "support-bot") == record
    with pytest.raises(AdapterNotFoundError):
        store.get("acme", "support-bot")
    with pytest.raises(AdapterNotFoundError):
        store.delete("acme", "support-bot")
    assert [r.name for r in store.list("acme")] == ["alpha"]
    # Another tenant's adapter of the same name is untouched.
    assert store.get("other", "support-bot").version == 1
    assert list((tmp_path / "tmp").iterdir()) == []


def test_meta_json_records_both_checksums(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    record = upload(store, "t", "a", config=b"{}", weights=b"w" * 100)
    meta = json.loads((record.path / "meta.json").read_text())
    assert meta["config_sha256"] == hashlib.sha256(b"{}").hexdigest()
    assert meta["config_size"] == 2
    assert meta["weights_sha256"] == record.sha256
    assert meta["weights_size"] == 100


def test_unknown_tenant_and_name_are_not_found(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    upload(store, "acme", "a")
    with pytest.raises(AdapterNotFoundError):
        store.get("acme", "b")
    with pytest.raises(AdapterNotFoundError):
        store.get("nobody", "a")
    assert store.list("nobody") == []


@pytest.mark.parametrize(("tenant", "name"), [("../x", "a"), ("t", ".."), ("t", "a/b")])
def test_bad_names_never_reach_the_filesystem(tmp_path: Path, tenant: str, name: str) -> None:
    store = AdapterStore(tmp_path)
    with pytest.raises(AdapterValidationError):
        store.begin_upload(tenant, name)
    with pytest.raises(AdapterValidationError):
        store.get(tenant, name)
    with pytest.raises(AdapterValidationError):
        store.delete(tenant, name)
    assert list((tmp_path / "tmp").iterdir()) == []


def test_versions_increase_and_versions_beyond_retention_are_removed(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, versions_kept=1)
    first = upload(store, "t", "a", weights=b"one")
    second = upload(store, "t", "a", weights=b"two", rank=8)
    assert (first.version, second.version) == (1, 2)
    assert not first.path.exists()
    assert store.get("t", "a") == second
    assert store.read_files(second)[1] == b"two"
    with pytest.raises(AdapterNotFoundError, match="replaced or deleted"):
        store.read_files(first)
    assert visible_files(tmp_path) == [
        "tenants/t/a/v2/adapter_config.json",
        "tenants/t/a/v2/adapter_model.safetensors",
        "tenants/t/a/v2/meta.json",
    ]


def test_versions_are_not_reused_after_delete(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    upload(store, "t", "a")
    upload(store, "t", "a")
    store.delete("t", "a")
    assert store.tenants() == []
    # Caches key on (tenant, name, version): a new upload must not look like the deleted one.
    assert upload(store, "t", "a").version == 3
    assert AdapterStore(tmp_path).get("t", "a").version == 3


def test_nothing_is_visible_before_commit_and_abort_leaves_nothing(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    txn = store.begin_upload("t", "a")
    txn.write("config", b"{}")
    txn.write("weights", b"abc")
    txn.write("weights", b"def")
    assert txn.bytes_written("weights") == 6
    assert txn.sha256("weights") == hashlib.sha256(b"abcdef").hexdigest()
    assert txn.read("weights") == b"abcdef"
    assert txn.read("config") == b"{}"
    with pytest.raises(AdapterNotFoundError):
        store.get("t", "a")
    assert store.list("t") == [] and store.tenants() == []
    txn.abort()
    txn.abort()  # idempotent
    assert list((tmp_path / "tmp").iterdir()) == []
    assert visible_files(tmp_path) == []
    with pytest.raises(RuntimeError):
        txn.write("weights", b"late")


def test_context_manager_aborts_on_error(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    with pytest.raises(ValueError), store.begin_upload("t", "a") as txn:
        txn.write("weights", b"partial")
        raise ValueError("client went away")
    assert list((tmp_path / "tmp").iterdir()) == []
    with pytest.raises(AdapterNotFoundError):
        store.get("t", "a")


def test_commit_twice_is_refused(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    with store.begin_upload("t", "a") as txn:
        txn.commit(META)
        with pytest.raises(RuntimeError, match="already committed"):
            txn.commit(META)
    assert store.get("t", "a").version == 1


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"rank": 0}, "rank"),
        ({"alpha": "8"}, "alpha"),
        ({"use_rslora": 1}, "use_rslora"),
        ({"target_modules": "q_proj"}, "target_modules"),
        ({"target_modules": None}, "target_modules"),
        ({"target_modules": [1]}, "target_modules"),
        ({"alpha": float("nan")}, "alpha"),
        ({"description": "x" * 1025}, "description"),
    ],
)
def test_bad_meta_is_refused_and_the_upload_stays_open(
    tmp_path: Path, change: dict, field: str
) -> None:
    store = AdapterStore(tmp_path)
    with store.begin_upload("t", "a") as txn:
        with pytest.raises(AdapterValidationError) as info:
            txn.commit({**META, **change})
        assert info.value.field == field
        assert txn.commit(META).version == 1


def test_crash_leftovers_are_cleaned_at_construction(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    good = upload(store, "t", "good")
    # An upload that was in progress when the process died.
    abandoned = store.begin_upload("t", "never")
    abandoned.write("weights", b"half")
    # A version directory without meta.json, and one with a broken meta.json.
    (tmp_path / "tenants" / "t" / "nometa" / "v1").mkdir(parents=True)
    (tmp_path / "tenants" / "t" / "nometa" / "v1" / "adapter_model.safetensors").write_bytes(b"x")
    broken = tmp_path / "tenants" / "t" / "broken" / "v1"
    broken.mkdir(parents=True)
    (broken / "meta.json").write_text("{not json")
    # A commit that crashed after publishing v2 but before pruning v1 (one version kept).
    (tmp_path / "tenants" / "t" / "good" / "v2").mkdir()
    for child in good.path.iterdir():
        (good.path.parent / "v2" / child.name).write_bytes(child.read_bytes())

    reopened = AdapterStore(tmp_path, versions_kept=1)
    assert list((tmp_path / "tmp").iterdir()) == []
    assert [r.name for r in reopened.list("t")] == ["good"]
    assert reopened.get("t", "good").version == 2
    assert not good.path.exists()
    assert not (tmp_path / "tenants" / "t" / "nometa" / "v1").exists()
    assert not broken.exists()
    abandoned.abort()  # its directory is already gone; abort must not fail


def test_read_files_detects_corruption(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    record = upload(store, "t", "a", weights=b"good weights")
    (record.path / "adapter_model.safetensors").write_bytes(b"evil weights")
    with pytest.raises(AdapterCorruptError, match=r"adapter_model\.safetensors"):
        store.read_files(record)
    (record.path / "adapter_model.safetensors").write_bytes(b"good weights")
    assert store.read_files(record)[1] == b"good weights"
    (record.path / "adapter_config.json").write_bytes(b"{}")
    with pytest.raises(AdapterCorruptError, match=r"adapter_config\.json"):
        store.read_files(record)


def test_corrupt_adapter_can_still_be_deleted(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    record = upload(store, "t", "a")
    (record.path / "meta.json").write_text("garbage")
    with pytest.raises(AdapterCorruptError):
        store.get("t", "a")
    assert store.list("t") == []  # one broken adapter does not break the listing
    with pytest.raises(AdapterCorruptError, match="deleted"):
        store.delete("t", "a")
    with pytest.raises(AdapterNotFoundError):
        store.get("t", "a")


def test_concurrent_commits_of_one_name_land_whole_as_distinct_versions(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    uploads = 8
    barrier = threading.Barrier(uploads)
    records: list[AdapterRecord] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        config = json.dumps({"i": index}).encode()
        weights = bytes([index]) * (1000 + index)
        try:
            with store.begin_upload("t", "shared") as txn:
                for start in range(0, len(weights), 100):
                    txn.write("weights", weights[start : start + 100])
                txn.write("config", config)
                barrier.wait()
                record = txn.commit({**META, "rank": index + 1})
            with lock:
                records.append(record)
        except BaseException as exc:  # reported below; a thread must not swallow it
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(uploads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(r.version for r in records) == list(range(1, uploads + 1))
    latest = store.get("t", "shared")
    assert latest.version == uploads
    # The survivor is one upload, whole: config, weights and meta all from the same writer.
    config, weights = store.read_files(latest)
    index = json.loads(config)["i"]
    assert weights == bytes([index]) * (1000 + index)
    assert latest.rank == index + 1
    assert latest == next(r for r in records if r.version == uploads)
    # The newest versions_kept of them stay, each whole too.
    kept = sorted(p.name for p in latest.path.parent.iterdir() if p.is_dir())
    assert kept == sorted(f"v{v}" for v in range(uploads - store.versions_kept + 1, uploads + 1))
    for record in store.list_versions("t", "shared"):
        config, weights = store.read_files(record)
        assert weights == bytes([json.loads(config)["i"]]) * len(weights)
    assert list((tmp_path / "tmp").iterdir()) == []


def test_concurrent_readers_never_see_a_partial_adapter(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    upload(store, "t", "a", weights=b"0" * 5000)
    stop = threading.Event()
    problems: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                record = store.get("t", "a")
                _config, weights = store.read_files(record)
            except AdapterNotFoundError:
                continue  # replaced between get and read: the caller retries
            if len(set(weights)) != 1 or hashlib.sha256(weights).hexdigest() != record.sha256:
                problems.append(f"v{record.version}: mixed or partial weights")

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for thread in threads:
        thread.start()
    for index in range(1, 10):
        upload(store, "t", "a", weights=str(index).encode() * 5000)
    stop.set()
    for thread in threads:
        thread.join()
    assert problems == []
    assert store.get("t", "a").version == 10


def test_store_creates_its_directories(tmp_path: Path) -> None:
    root = tmp_path / "deep" / "store"
    AdapterStore(root)
    assert (root / "tenants").is_dir() and (root / "tmp").is_dir()
    assert os.listdir(root / "tmp") == []
