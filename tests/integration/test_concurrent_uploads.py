"""Two concurrent uploads of one name: each lands whole as its own version, never a mix."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from serving_support import client_for

from loraserve.server.background import BackgroundServer


def test_concurrent_uploads_of_one_name_land_whole(
    server: BackgroundServer, adapter_dirs: dict[str, Path]
) -> None:
    sources = {
        "qv": adapter_dirs["qv"],
        "mlp": adapter_dirs["mlp"],
    }
    digests = {
        hashlib.sha256((d / "adapter_model.safetensors").read_bytes()).hexdigest(): name
        for name, d in sources.items()
    }
    results: dict[str, object] = {}
    barrier = threading.Barrier(len(sources))

    def upload(name: str, directory: Path) -> None:
        with client_for(server, "acme") as client:
            barrier.wait(10)
            results[name] = client.upload_adapter(directory, "contended")

    threads = [threading.Thread(target=upload, args=item) for item in sources.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    infos = list(results.values())
    assert len(infos) == 2
    assert sorted(i.version for i in infos) == [1, 2], "each upload is its own whole version"  # type: ignore[attr-defined]
    for info in infos:
        assert info.sha256 in digests  # type: ignore[attr-defined]
    with client_for(server, "acme") as client:
        current = client.get_adapter("contended")
        assert current.version == 2 and current.sha256 in digests
        winner = next(i for i in infos if i.version == 2)  # type: ignore[attr-defined]
        assert current.sha256 == winner.sha256  # type: ignore[attr-defined]
        # The stored files are exactly one of the two uploads: rank and targets match it.
        expected_rank = {"qv": 8, "mlp": 4}[digests[current.sha256]]
        assert current.rank == expected_rank
        out = client.generate("still whole?", adapter="contended", max_new_tokens=3)
        assert out.adapter_version == 2
        client.delete_adapter("contended")
