"""Crash safety of real `loraserve serve` processes: kill -9 mid-upload and mid-generation, and
a file corrupted on disk while the server was down. Acknowledged adapters always survive whole.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from serving_support import KEYS

from loraserve.client.config import ClientConfig
from loraserve.client.sync import LoraServeClient
from loraserve.client.upload import plan_upload
from loraserve.server.background import ServerProcess
from loraserve.v1 import adapters_pb2, adapters_pb2_grpc

START_TIMEOUT = 90.0
TENANT = "acme"


def client_of(server: ServerProcess) -> LoraServeClient:
    return LoraServeClient(ClientConfig(target=server.target, api_key=KEYS[TENANT], timeout_s=30))


@dataclass
class Cluster:
    """Starts servers on one data dir; kills every one it started when the test ends."""

    data_dir: Path
    tenants_file: Path
    model_cache: Path
    model: Path
    logs: Path
    started: list[ServerProcess] = field(default_factory=list)

    def start(self) -> ServerProcess:
        args = ["--host", "127.0.0.1", "--no-metrics", "--model", str(self.model),
                "--tenants", str(self.tenants_file), "--data-dir", str(self.data_dir),
                "--access-log", ""]  # fmt: skip
        log = self.logs / f"serve-{len(self.started)}.log"
        server = ServerProcess(args, log, {"LORASERVE_CACHE": str(self.model_cache)})
        self.started.append(server)
        return server.start(START_TIMEOUT)

    def close(self) -> None:
        for server in self.started:
            server.kill()


@pytest.fixture
def cluster(
    tmp_path: Path, tenants_file: Path, model_cache: Path, default_model: Path
) -> Iterator[Cluster]:
    logs = tmp_path / "logs"
    logs.mkdir()
    c = Cluster(tmp_path / "data", tenants_file, model_cache, default_model, logs)
    try:
        yield c
    finally:
        c.close()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _upload_acknowledged(server: ServerProcess, adapter_dirs: dict[str, Path]) -> dict[str, str]:
    """Uploads two adapters and waits for each ack; returns name -> sha256 of its weights."""
    acked = {}
    with client_of(server) as client:
        for name, source in (("alpha", "qv"), ("beta", "mlp")):
            info = client.upload_adapter(adapter_dirs[source], name)
            expected = _sha256(adapter_dirs[source] / "adapter_model.safetensors")
            assert info.version == 1 and info.sha256 == expected
            acked[name] = expected
    return acked


def _check_intact(server: ServerProcess, data_dir: Path, acked: dict[str, str]) -> None:
    """Every acknowledged adapter is listed, its checksums match, and it generates."""
    with client_of(server) as client:
        assert sorted(a.name for a in client.list_adapters()) == sorted(acked)
        for name, sha in acked.items():
            info = client.get_adapter(name)
            assert info.sha256 == sha
            on_disk = data_dir / "adapters" / "tenants" / TENANT / name / f"v{info.version}"
            assert _sha256(on_disk / "adapter_model.safetensors") == sha
            # Loading for generation re-reads the files and verifies both checksums.
            result = client.generate("hello", adapter=name, max_new_tokens=3, ignore_eos=True)
            assert len(result.token_ids) == 3


def _upload_dir(data_dir: Path) -> Path | None:
    """The in-progress upload directory under adapters/tmp, once it holds weight bytes."""
    tmp = data_dir / "adapters" / "tmp"
    if not tmp.is_dir():
        return None
    for entry in tmp.iterdir():
        weights = entry / "adapter_model.safetensors"
        if entry.name.startswith("upload-") and weights.is_file() and weights.stat().st_size:
            return entry
    return None


def test_kill9_mid_upload_keeps_acknowledged_adapters(
    cluster: Cluster, adapter_dirs: dict[str, Path]
) -> None:
    server = cluster.start()
    acked = _upload_acknowledged(server, adapter_dirs)

    plan = plan_upload(adapter_dirs["wide"], "interrupted")
    weights = plan.weights_path.read_bytes()
    stop = threading.Event()
    sent = threading.Event()

    def slow_requests() -> Iterator[adapters_pb2.UploadAdapterRequest]:
        yield plan.header()
        yield adapters_pb2.UploadAdapterRequest(
            chunk=adapters_pb2.FileChunk(file=adapters_pb2.ADAPTER_FILE_CONFIG, data=plan.config)
        )
        step = max(1, len(weights) // 400)  # hundreds of small chunks, never all of them
        for start in range(0, len(weights) - step, step):
            if stop.is_set():
                return
            yield adapters_pb2.UploadAdapterRequest(
                chunk=adapters_pb2.FileChunk(
                    file=adapters_pb2.ADAPTER_FILE_WEIGHTS, data=weights[start : start + step]
                )
            )
            sent.set()
            stop.wait(0.05)

    outcome: list[BaseException | object] = []

    def upload() -> None:
        channel = grpc.insecure_channel(server.target)
        try:
            stub = adapters_pb2_grpc.AdaptersStub(channel)
            metadata = (("authorization", f"Bearer {KEYS[TENANT]}"),)
            outcome.append(stub.UploadAdapter(slow_requests(), timeout=60, metadata=metadata))
        except BaseException as exc:
            outcome.append(exc)
        finally:
            channel.close()

    uploader = threading.Thread(target=upload, name="slow-upload", daemon=True)
    uploader.start()
    try:
        deadline = time.monotonic() + 30
        while _upload_dir(cluster.data_dir) is None:
            assert time.monotonic() < deadline, "the upload never reached the server's disk"
            assert uploader.is_alive(), f"upload ended early: {outcome}"
            time.sleep(0.02)
        assert sent.is_set() and uploader.is_alive()
        server.kill()
    finally:
        stop.set()
        uploader.join(30)
    assert not uploader.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], grpc.RpcError), outcome
    assert _upload_dir(cluster.data_dir) is not None  # the kill left debris behind

    restarted = cluster.start()
    assert list((cluster.data_dir / "adapters" / "tmp").iterdir()) == []
    _check_intact(restarted, cluster.data_dir, acked)
    with client_of(restarted) as client, pytest.raises(grpc.RpcError) as missing:
        client.get_adapter("interrupted")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert not (cluster.data_dir / "adapters" / "tenants" / TENANT / "interrupted").exists()


def test_kill9_mid_generation_then_restart_serves(
    cluster: Cluster, adapter_dirs: dict[str, Path]
) -> None:
    server = cluster.start()
    acked = _upload_acknowledged(server, adapter_dirs)
    with client_of(server) as client:
        stream = client.generate_stream(
            "hello", adapter="alpha", max_new_tokens=1000, ignore_eos=True, timeout_s=60
        )
        first = next(stream)
        assert not first.finish_reason  # still generating
        server.kill()
        with pytest.raises(grpc.RpcError):
            for message in stream:
                assert not message.finish_reason, "generation finished before the kill"

    restarted = cluster.start()
    _check_intact(restarted, cluster.data_dir, acked)
    assert list((cluster.data_dir / "adapters" / "tmp").iterdir()) == []


def test_file_corrupted_while_down_is_quarantined_at_start(
    cluster: Cluster, adapter_dirs: dict[str, Path]
) -> None:
    server = cluster.start()
    acked = _upload_acknowledged(server, adapter_dirs)
    assert server.stop(30) == 0

    version_dir = cluster.data_dir / "adapters" / "tenants" / TENANT / "alpha" / "v1"
    weights = version_dir / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))

    restarted = cluster.start()
    log = restarted.output()
    assert "quarantined corrupt adapter tenant=acme name=alpha version=1" in log, log
    assert "ERROR" in log
    assert not version_dir.exists()
    assert len(list((cluster.data_dir / "adapters" / "quarantine" / TENANT / "alpha").iterdir()))
    del acked["alpha"]
    _check_intact(restarted, cluster.data_dir, acked)
    with client_of(restarted) as client, pytest.raises(grpc.RpcError) as missing:
        client.generate("hello", adapter="alpha", max_new_tokens=2)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
