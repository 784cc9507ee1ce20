"""Start-up verification: versions whose files no longer match meta.json are quarantined."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from loraserve.adapters.errors import AdapterNotFoundError
from loraserve.adapters.store import LAST_VERSION_FILE, AdapterRecord, AdapterStore

META = {
    "rank": 4,
    "alpha": 8.0,
    "use_rslora": False,
    "target_modules": ["m.layers.0.q"],
    "description": "",
}
WEIGHTS = bytes(range(256)) * 40  # 10 KiB
CONFIG = b'{"peft_type": "LORA"}'


def upload(store: AdapterStore, tenant: str, name: str, weights: bytes = WEIGHTS) -> AdapterRecord:
    with store.begin_upload(tenant, name) as txn:
        txn.write("config", CONFIG)
        for start in range(0, len(weights), 4096):
            txn.write("weights", weights[start : start + 4096])
        return txn.commit(META)


def flip_byte(version_dir: Path) -> None:
    path = version_dir / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(version_dir: Path) -> None:
    path = version_dir / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])


def extend(version_dir: Path) -> None:
    with open(version_dir / "adapter_model.safetensors", "ab") as handle:
        handle.write(b"x")


def delete_weights(version_dir: Path) -> None:
    (version_dir / "adapter_model.safetensors").unlink()


def delete_config(version_dir: Path) -> None:
    (version_dir / "adapter_config.json").unlink()


def corrupt_config(version_dir: Path) -> None:
    (version_dir / "adapter_config.json").write_bytes(b'{"peft_type": "LORB"}')


def corrupt_meta(version_dir: Path) -> None:
    path = version_dir / "meta.json"
    path.write_bytes(path.read_bytes()[:-20])


def meta_bad_size(version_dir: Path) -> None:
    path = version_dir / "meta.json"
    path.write_text(path.read_text().replace('"weights_size": ', '"weights_size": "'), "utf-8")


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "flipped byte": (flip_byte, "does not match"),
    "truncated": (truncate, "truncated"),
    "extended": (extend, "longer than"),
    "weights deleted": (delete_weights, "adapter_model.safetensors is missing"),
    "config deleted": (delete_config, "adapter_config.json is missing"),
    "config changed": (corrupt_config, "adapter_config.json sha256"),
    "meta.json cut short": (corrupt_meta, "meta.json"),
    "meta.json bad size": (meta_bad_size, "meta.json"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_version_is_quarantined_at_start(
    damage: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = AdapterStore(tmp_path)
    bad = upload(store, "acme", "bad")
    good = upload(store, "acme", "good")
    other = upload(store, "globex", "bad")  # same name, other tenant: untouched
    assert bad.version == 1
    damage_fn, reason = DAMAGE[damage]
    damage_fn(bad.path)

    with caplog.at_level(logging.ERROR, logger="loraserve.adapters.store"):
        store = AdapterStore(tmp_path)

    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    message = errors[0].getMessage()
    assert "quarantine" in message and "tenant=acme" in message
    assert "name=bad" in message and "version=1" in message and reason in message

    with pytest.raises(AdapterNotFoundError):
        store.get("acme", "bad")
    assert [r.name for r in store.list("acme")] == ["good"]
    assert store.tenants() == ["acme", "globex"]
    moved = list((tmp_path / "quarantine" / "acme" / "bad").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("v1-")
    assert not bad.path.exists()

    # The others still read back with verified checksums.
    assert store.read_files(store.get("acme", "good")) == (CONFIG, WEIGHTS)
    assert store.read_files(store.get("globex", "bad")) == (CONFIG, WEIGHTS)
    assert store.get("acme", "good").version == good.version
    assert store.get("globex", "bad").version == other.version

    # A re-upload of the name works and gets a new, higher version.
    again = upload(store, "acme", "bad")
    assert again.version == 2
    assert store.read_files(store.get("acme", "bad")) == (CONFIG, WEIGHTS)

    # And a further restart changes nothing and logs nothing.
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="loraserve.adapters.store"):
        store = AdapterStore(tmp_path)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [(r.name, r.version) for r in store.list("acme")] == [("bad", 2), ("good", 1)]


def test_quarantine_keeps_version_counter_even_without_last_version(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, versions_kept=1)
    for _ in range(3):
        record = upload(store, "acme", "bot")
    assert record.version == 3
    name_dir = record.path.parent
    (name_dir / LAST_VERSION_FILE).unlink()  # lost in a crash: harmless before, too
    flip_byte(record.path)

    store = AdapterStore(tmp_path, versions_kept=1)
    with pytest.raises(AdapterNotFoundError):
        store.get("acme", "bot")
    assert (name_dir / LAST_VERSION_FILE).read_text() == "3"
    assert upload(store, "acme", "bot").version == 4


def test_second_quarantine_of_same_version_gets_its_own_directory(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    record = upload(store, "acme", "bot")
    truncate(record.path)
    AdapterStore(tmp_path)
    # Put a damaged v1 back by hand (as an operator restoring a backup might), start again.
    record.path.mkdir()
    (record.path / "meta.json").write_text("{}")
    store = AdapterStore(tmp_path)
    moved = sorted(p.name for p in (tmp_path / "quarantine" / "acme" / "bot").iterdir())
    assert len(moved) == 2 and all(name.startswith("v1-") for name in moved)
    assert store.list("acme") == []


def test_large_file_is_verified_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import loraserve.adapters.store as store_module

    monkeypatch.setattr(store_module, "_VERIFY_CHUNK", 1000)
    reads: list[int] = []
    real_open = open

    class CountingFile:
        def __init__(self, handle) -> None:  # type: ignore[no-untyped-def]
            self._handle = handle

        def read(self, size: int = -1) -> bytes:
            reads.append(size)
            return self._handle.read(size)

        def __enter__(self) -> CountingFile:
            return self

        def __exit__(self, *exc: object) -> None:
            self._handle.close()

    def counting_open(path, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        handle = real_open(path, mode, *args, **kwargs)
        if str(path).endswith(".safetensors") and "b" in mode:
            return CountingFile(handle)
        return handle

    store = AdapterStore(tmp_path)
    upload(store, "acme", "big", weights=WEIGHTS * 4)  # 40 KiB
    monkeypatch.setattr(store_module, "open", counting_open, raising=False)
    store = AdapterStore(tmp_path)
    assert store.get("acme", "big").version == 1
    assert reads and all(0 < size <= 1000 for size in reads)
    assert len(reads) > 40
