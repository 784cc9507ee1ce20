"""SharedAdapterStore: several processes' stores on one root see each other's writes at once."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_adapter_store import upload

from loraserve.adapters.errors import AdapterNotFoundError
from loraserve.adapters.shared_store import SharedAdapterStore
from loraserve.adapters.store import AdapterStore


def test_a_write_through_one_store_is_read_by_the_other_at_once(tmp_path: Path) -> None:
    first, second = SharedAdapterStore(tmp_path), SharedAdapterStore(tmp_path)
    upload(first, "acme", "bot", weights=b"one")
    assert second.get("acme", "bot").version == 1  # second has now read (and once cached) v1
    upload(first, "acme", "bot", weights=b"two")
    record = second.get("acme", "bot")
    assert record.version == 2 and second.read_files(record)[1] == b"two"
    assert [r.version for r in second.list("acme")] == [2]
    second.delete("acme", "bot")
    with pytest.raises(AdapterNotFoundError):
        first.get("acme", "bot")
    assert first.list("acme") == []
    upload(second, "acme", "bot", weights=b"three")
    assert first.get("acme", "bot").version == 3  # numbers are never reused across stores


def test_the_plain_store_caches_what_the_shared_one_must_not(tmp_path: Path) -> None:
    """Why the subclass exists: a single-process store keeps serving a record deleted elsewhere."""
    plain = AdapterStore(tmp_path)
    upload(plain, "acme", "bot")
    plain.get("acme", "bot")
    SharedAdapterStore(tmp_path).delete("acme", "bot")
    assert plain.get("acme", "bot").version == 1  # stale
    with pytest.raises(AdapterNotFoundError):
        SharedAdapterStore(tmp_path).get("acme", "bot")


def test_opening_a_store_keeps_a_live_owners_upload_in_progress(tmp_path: Path) -> None:
    first = SharedAdapterStore(tmp_path)
    txn = first.begin_upload("acme", "bot")
    txn.write("config", b'{"peft_type": "LORA"}')
    SharedAdapterStore(tmp_path)  # a replica (re)starting on the same root
    txn.write("weights", b"weights")
    record = txn.commit({"rank": 4, "alpha": 8.0, "use_rslora": False, "target_modules": ["q"]})
    assert first.read_files(record)[1] == b"weights"


def test_opening_a_store_removes_a_dead_owners_debris(tmp_path: Path) -> None:
    # A process that opens a store, starts an upload and dies without cleaning up.
    script = textwrap.dedent(
        f"""
        import os
        from loraserve.adapters.shared_store import SharedAdapterStore
        store = SharedAdapterStore({str(tmp_path)!r})
        txn = store.begin_upload("acme", "bot")
        txn.write("weights", b"half")
        os._exit(0)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    debris = [p for p in (tmp_path / "tmp").iterdir() if p.is_dir()]
    assert len(debris) == 1 and any(debris[0].rglob("*"))
    store = SharedAdapterStore(tmp_path)
    left = sorted(p.name for p in (tmp_path / "tmp").iterdir())
    assert left == sorted([store.owner, f"{store.owner}.lock"])
    with pytest.raises(AdapterNotFoundError):
        store.get("acme", "bot")
