"""AsyncLoraServeClient against the fake server (each test drives its own event loop)."""

from __future__ import annotations

import asyncio
import hashlib

import grpc
import pytest
from client_fakes import API_KEY, FakeServer, MakeAdapterDir

from loraserve.client.aio import AsyncLoraServeClient
from loraserve.client.config import ClientConfig
from loraserve.client.upload import CHUNK_SIZE, AdapterDirectoryError
from loraserve.v1 import adapters_pb2, inference_pb2


def client_for(server: FakeServer, timeout_s: float = 60.0) -> AsyncLoraServeClient:
    return AsyncLoraServeClient(
        ClientConfig(target=server.target, api_key=API_KEY, timeout_s=timeout_s)
    )


def test_generate_and_info_carry_key_and_deadline(fake_server: FakeServer) -> None:
    async def run() -> tuple[inference_pb2.GenerateResponse, inference_pb2.ServerInfo]:
        async with client_for(fake_server, timeout_s=9.0) as client:
            return await client.generate("hi", seed=3), await client.server_info()

    response, info = asyncio.run(run())
    assert response.text == "echo: hi" and info.model_type == "llama"
    for call in fake_server.state.calls:
        assert call.metadata["authorization"] == f"Bearer {API_KEY}"
        # Slack above 9 s: the deadline travels as a rounded duration.
        assert call.time_remaining is not None and 7.0 < call.time_remaining < 9.5
    assert fake_server.state.generate_requests[-1].sampling.seed == 3


def test_generate_stream(fake_server: FakeServer) -> None:
    async def run() -> list[inference_pb2.GenerateStreamResponse]:
        async with client_for(fake_server) as client:
            return [c async for c in client.generate_stream([("user", "yo")])]

    chunks = asyncio.run(run())
    assert "".join(c.text for c in chunks) == "echo: user: yo"
    assert chunks[-1].finish_reason == inference_pb2.FINISH_REASON_EOS


def test_leaving_a_stream_early_cancels_the_call(fake_server: FakeServer) -> None:
    fake_server.state.stream_length = 1000

    async def run() -> None:
        async with client_for(fake_server) as client:
            stream = client.generate_stream("x")
            async for _ in stream:
                break
            await stream.aclose()  # type: ignore[attr-defined]  # an async generator

    asyncio.run(run())
    assert fake_server.state.stream_ended.wait(5.0)
    assert not fake_server.state.stream_completed


def test_upload_list_get_delete(fake_server: FakeServer, make_adapter_dir: MakeAdapterDir) -> None:
    directory = make_adapter_dir(weights_size=CHUNK_SIZE + 10)
    weights = (directory / "adapter_model.safetensors").read_bytes()

    async def run() -> list[str]:
        async with client_for(fake_server) as client:
            info = await client.upload_adapter(directory, "a1", description="async")
            assert info.sha256 == hashlib.sha256(weights).hexdigest()
            names = [a.name for a in await client.list_adapters()]
            assert (await client.get_adapter("a1")).description == "async"
            assert (await client.delete_adapter("a1")).name == "a1"
            return names

    assert asyncio.run(run()) == ["a1"]
    messages = fake_server.state.upload_messages
    assert messages[0].HasField("header")
    chunks = [m.chunk for m in messages[1:]]
    sizes = [len(c.data) for c in chunks if c.file == adapters_pb2.ADAPTER_FILE_WEIGHTS]
    assert sizes == [CHUNK_SIZE, 10]
    assert "a1" not in fake_server.state.adapters


def test_errors_propagate_as_rpc_error(fake_server: FakeServer) -> None:
    async def run() -> None:
        async with client_for(fake_server) as client:
            await client.get_adapter("missing")

    with pytest.raises(grpc.RpcError) as raised:
        asyncio.run(run())
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_upload_refuses_pickle_locally(
    fake_server: FakeServer, make_adapter_dir: MakeAdapterDir
) -> None:
    directory = make_adapter_dir(weights_file="adapter_model.bin")

    async def run() -> None:
        async with client_for(fake_server) as client:
            await client.upload_adapter(directory, "x")

    with pytest.raises(AdapterDirectoryError, match="only safetensors"):
        asyncio.run(run())
    assert fake_server.state.calls == []


def test_wait_until_serving(fake_server: FakeServer) -> None:
    async def run() -> None:
        async with client_for(fake_server) as client:
            await client.wait_until_serving(5.0)
            fake_server.set_serving(False)
            with pytest.raises(TimeoutError, match="NOT_SERVING"):
                await client.wait_until_serving(0.5)

    asyncio.run(run())
