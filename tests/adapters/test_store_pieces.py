"""The weights file's piece sums: recorded at upload whatever the chunking, checked piece by piece
on load (each a job of its own, so a load hashes on several threads), and older versions without
them still checked whole."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from loraserve.adapters.errors import AdapterCorruptError
from loraserve.adapters.store import PIECE_BYTES, AdapterRecord, AdapterStore

WEIGHTS = bytes(range(256)) * (PIECE_BYTES * 5 // 2 // 256)  # two and a half pieces


Upload = Callable[[bytes, int], AdapterRecord]
"""upload(weights, chunk): commits a version of t/a whose weights arrive `chunk` bytes at a time."""


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path)


@pytest.fixture
def upload(store: AdapterStore, version_meta: dict[str, object]) -> Upload:
    def run(weights: bytes, chunk: int) -> AdapterRecord:
        with store.begin_upload("t", "a") as txn:
            txn.write("config", b"{}")
            for start in range(0, len(weights), chunk):
                txn.write("weights", weights[start : start + chunk])
            return txn.commit(version_meta)

    return run


def _meta(record: AdapterRecord) -> dict:
    return json.loads((record.path / "meta.json").read_text())


@pytest.mark.parametrize("chunk", [700_001, PIECE_BYTES, 4 * PIECE_BYTES])
def test_upload_records_each_piece_s_sum_whatever_the_chunks(upload: Upload, chunk: int) -> None:
    record = upload(WEIGHTS, chunk)
    meta = _meta(record)
    want = [
        hashlib.sha256(WEIGHTS[start : start + PIECE_BYTES]).hexdigest()
        for start in range(0, len(WEIGHTS), PIECE_BYTES)
    ]
    assert len(want) == 3 and meta["weights_pieces_sha256"] == want
    assert meta["weights_piece_bytes"] == PIECE_BYTES
    assert meta["weights_sha256"] == hashlib.sha256(WEIGHTS).hexdigest()


def test_empty_weights_have_no_pieces(store: AdapterStore, upload: Upload) -> None:
    record = upload(b"", 10)
    assert _meta(record)["weights_pieces_sha256"] == []
    store.read_files(record)  # and verify


def test_a_load_checks_each_piece_as_a_job_and_names_the_bad_one(
    store: AdapterStore, upload: Upload
) -> None:
    record = upload(WEIGHTS, PIECE_BYTES)
    files = store.read_unverified(record)
    jobs = files.checksum_jobs()
    assert len(jobs) == 1 + 3  # the config, then each piece
    for job in jobs:
        job()
    path = record.path / "adapter_model.safetensors"
    damaged = bytearray(WEIGHTS)
    damaged[PIECE_BYTES + 7] ^= 0x01
    path.write_bytes(bytes(damaged))
    failed = []
    for job in store.read_unverified(record).checksum_jobs():
        try:
            job()
        except AdapterCorruptError as exc:
            failed.append(str(exc))
    assert len(failed) == 1
    assert f"bytes {PIECE_BYTES} to {2 * PIECE_BYTES}" in failed[0] and "adapter_model" in failed[0]
    with pytest.raises(AdapterCorruptError, match="recorded at upload"):
        store.read_files(record)


def test_a_file_of_another_length_is_checked_whole(store: AdapterStore, upload: Upload) -> None:
    record = upload(WEIGHTS, PIECE_BYTES)
    (record.path / "adapter_model.safetensors").write_bytes(WEIGHTS + b"x")
    jobs = store.read_unverified(record).checksum_jobs()
    assert len(jobs) == 2
    with pytest.raises(AdapterCorruptError, match=r"\(2621441 bytes\)"):
        jobs[1]()


def test_a_version_stored_without_pieces_is_checked_whole(
    store: AdapterStore, upload: Upload
) -> None:
    record = upload(WEIGHTS, PIECE_BYTES)
    meta = _meta(record)
    del meta["weights_pieces_sha256"], meta["weights_piece_bytes"]
    (record.path / "meta.json").write_text(json.dumps(meta))
    files = store.read_unverified(record)
    assert files.weights_pieces is None and len(files.checksum_jobs()) == 2
    files.verify()
    damaged = bytearray(WEIGHTS)
    damaged[-1] ^= 0x01
    (record.path / "adapter_model.safetensors").write_bytes(bytes(damaged))
    with pytest.raises(AdapterCorruptError, match="does not match"):
        store.read_files(record)


@pytest.mark.parametrize(
    "change",
    [
        {"weights_piece_bytes": PIECE_BYTES // 2},
        {"weights_pieces_sha256": ["0" * 64]},  # too few for the size
        {"weights_pieces_sha256": [1, 2, 3]},
        {"weights_pieces_sha256": "abc"},
    ],
)
def test_piece_sums_that_cannot_describe_the_file_are_corrupt(
    store: AdapterStore, upload: Upload, change: dict
) -> None:
    record = upload(WEIGHTS, PIECE_BYTES)
    (record.path / "meta.json").write_text(json.dumps({**_meta(record), **change}))
    with pytest.raises(AdapterCorruptError, match="unreadable"):
        store.read_unverified(record)
