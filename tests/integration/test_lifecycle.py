"""Server lifecycle: health while loading, reflection, versions under load, freeing memory."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from loraserve.client.config import ClientConfig
from loraserve.client.sync import LoraServeClient
from loraserve.server import runtime as runtime_module
from loraserve.server.app import Server
from loraserve.server.background import BackgroundServer
from loraserve.server.config import ServerConfig


def test_not_serving_until_model_loaded(
    default_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    real_load = runtime_module.load_base_model

    def slow_load(*args, **kwargs):
        release.wait(30)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(runtime_module, "load_base_model", slow_load)
    config = ServerConfig(model_path=default_model, port=0, metrics_port=None, data_dir=tmp_path)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def make() -> Server:  # grpc.aio binds a server to the loop it is created on
        return Server(config)

    server = asyncio.run_coroutine_threadsafe(make(), loop).result(10)
    started = asyncio.run_coroutine_threadsafe(server.start(), loop)
    try:
        deadline = time.monotonic() + 30
        while server.port == 0:  # bound (port 0: a free one) before the model loads
            assert time.monotonic() < deadline and not started.done(), "never bound"
            time.sleep(0.01)
        port = server.port
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 30
            while True:
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            with LoraServeClient(ClientConfig(target=f"127.0.0.1:{port}")) as client:
                with pytest.raises(grpc.RpcError) as err:
                    client.generate("hi")
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "loading" in err.value.details()
                release.set()
                started.result(60)
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                assert status == health_pb2.HealthCheckResponse.SERVING
                named = health_pb2.HealthCheckRequest(service="loraserve.v1.Inference")
                assert (
                    health.Check(named, timeout=2).status == health_pb2.HealthCheckResponse.SERVING
                )
                assert len(client.generate("hi", max_new_tokens=3, ignore_eos=True).token_ids) == 3
    finally:
        release.set()
        asyncio.run_coroutine_threadsafe(server.stop(0.5), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_reflection_lists_services(server: BackgroundServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(stub.ServerReflectionInfo(iter([request]), timeout=10))
        names = {s.name for s in response.list_services_response.service}
    assert {"loraserve.v1.Inference", "loraserve.v1.Adapters", "grpc.health.v1.Health"} <= names


def test_running_request_finishes_on_its_version(
    server: BackgroundServer, acme: LoraServeClient, adapter_dirs: dict[str, Path]
) -> None:
    """A request that was running while v2 committed finishes on v1, token for token."""
    tokens_wanted = 240  # long enough to still be decoding when the upload returns
    acme.upload_adapter(adapter_dirs["qv"], "moving")
    alone_v1 = acme.generate(
        "steady", adapter="moving", max_new_tokens=tokens_wanted, ignore_eos=True
    )
    stream = acme.generate_stream(
        "steady", adapter="moving", max_new_tokens=tokens_wanted, ignore_eos=True
    )
    first = next(stream)
    assert first.adapter_version == 1
    assert acme.upload_adapter(adapter_dirs["mlp"], "moving").version == 2
    # The request must still be running now that v2 has committed, or this test proves nothing.
    metrics = server.server.metrics  # type: ignore[union-attr]
    assert metrics.registry.get_sample_value("loraserve_requests_running") == 1, (
        "the stream finished before v2 committed"
    )
    rest = list(stream)
    tokens = [t for m in (first, *rest) for t in m.token_ids]
    assert len(tokens) == tokens_wanted
    assert tokens == list(alone_v1.token_ids), "the running request switched versions mid-way"
    assert rest[-1].adapter_version == 1
    assert acme.generate("steady", adapter="moving", max_new_tokens=4).adapter_version == 2
    acme.delete_adapter("moving")


def test_delete_frees_device_pages(
    server: BackgroundServer, acme: LoraServeClient, adapter_dirs: dict[str, Path]
) -> None:
    engine = server.server.runtime.engine  # type: ignore[union-attr]
    acme.upload_adapter(adapter_dirs["wide"], "temporary")
    acme.generate("load it", adapter="temporary", max_new_tokens=2)
    assert any(k.name == "temporary" for k in engine.device_pool.resident())
    assert engine.device_pool.resident_bytes() > 0
    acme.delete_adapter("temporary")
    deadline = time.monotonic() + 10
    while any(k.name == "temporary" for k in engine.device_pool.resident()):
        assert time.monotonic() < deadline, "deleted adapter still holds device pages"
        time.sleep(0.01)
