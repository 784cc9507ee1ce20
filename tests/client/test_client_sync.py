"""LoraServeClient against the fake server: metadata, deadlines, every RPC, upload stream."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from pathlib import Path

import grpc
import pytest
from client_fakes import API_KEY, FakeServer, MakeAdapterDir, start_fake_server

from loraserve.client.config import ClientConfig
from loraserve.client.results import merge_stream
from loraserve.client.sync import LoraServeClient
from loraserve.client.upload import CHUNK_SIZE, AdapterDirectoryError
from loraserve.v1 import adapters_pb2, inference_pb2


def client_for(server: FakeServer, **overrides: object) -> LoraServeClient:
    config = ClientConfig(target=server.target, api_key=API_KEY, **overrides)  # type: ignore[arg-type]
    return LoraServeClient(config)


def test_generate_sends_bearer_key_deadline_and_only_given_sampling(
    fake_server: FakeServer,
) -> None:
    with client_for(fake_server, timeout_s=7.0) as client:
        response = client.generate("hello", max_new_tokens=5, temperature=0.0, stop=["\n"])
    assert response.text == "echo:"
    assert response.finish_reason == inference_pb2.FINISH_REASON_LENGTH
    call = fake_server.state.calls[-1]
    assert call.metadata["authorization"] == f"Bearer {API_KEY}"
    # Slack above 7 s: the deadline travels as a rounded duration.
    assert call.time_remaining is not None and 5.0 < call.time_remaining < 7.5
    sampling = fake_server.state.generate_requests[-1].sampling
    # temperature=0.0 must be sent (greedy) rather than dropped as falsy.
    assert sampling.HasField("max_new_tokens") and sampling.HasField("temperature")
    assert not sampling.HasField("top_p") and not sampling.HasField("seed")
    assert list(sampling.stop) == ["\n"]


def test_per_call_timeout_overrides_config(fake_server: FakeServer) -> None:
    with client_for(fake_server, timeout_s=60.0) as client:
        client.server_info(timeout_s=2.0)
    remaining = fake_server.state.calls[-1].time_remaining
    assert remaining is not None and remaining < 2.5


def test_chat_messages_in_any_form(fake_server: FakeServer) -> None:
    messages = [
        ("system", "be brief"),
        {"role": "user", "content": "hi"},
        inference_pb2.ChatMessage(role="assistant", content="yo"),
    ]
    with client_for(fake_server) as client:
        client.generate(messages)
    request = fake_server.state.generate_requests[-1]
    assert request.prompt == ""
    assert [(m.role, m.content) for m in request.messages] == [
        ("system", "be brief"),
        ("user", "hi"),
        ("assistant", "yo"),
    ]


def test_no_api_key_sends_no_authorization_and_server_error_propagates(
    fake_server: FakeServer,
) -> None:
    client = LoraServeClient(ClientConfig(target=fake_server.target))
    with client, pytest.raises(grpc.RpcError) as raised:
        client.server_info()
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization" not in fake_server.state.calls[-1].metadata


def test_generate_stream_yields_tokens_and_final_usage(fake_server: FakeServer) -> None:
    with client_for(fake_server) as client:
        chunks = list(client.generate_stream("abc", adapter=""))
    assert "".join(c.text for c in chunks) == "echo: abc"
    assert chunks[-1].finish_reason == inference_pb2.FINISH_REASON_EOS
    assert all(c.finish_reason == 0 for c in chunks[:-1])
    merged = merge_stream(chunks)
    assert merged.text == "echo: abc" and merged.usage.completion_tokens == len("echo: abc")
    assert fake_server.state.calls[-1].metadata["authorization"] == f"Bearer {API_KEY}"


def test_closing_a_stream_early_cancels_the_call(fake_server: FakeServer) -> None:
    fake_server.state.stream_length = 1000  # ten seconds of tokens if nobody cancels
    with client_for(fake_server) as client:
        stream = client.generate_stream("x")
        next(stream)
        stream.close()
        assert fake_server.state.stream_ended.wait(5.0)
    assert not fake_server.state.stream_completed


def test_unknown_adapter_is_not_found(fake_server: FakeServer) -> None:
    with client_for(fake_server) as client, pytest.raises(grpc.RpcError) as raised:
        client.generate("hi", adapter="nope")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nope" in (raised.value.details() or "")


def test_upload_streams_header_then_chunks_and_reassembles(
    fake_server: FakeServer, make_adapter_dir: MakeAdapterDir
) -> None:
    weights_size = 2 * CHUNK_SIZE + CHUNK_SIZE // 2
    directory = make_adapter_dir(weights_size=weights_size)
    config_bytes = (directory / "adapter_config.json").read_bytes()
    weights = (directory / "adapter_model.safetensors").read_bytes()

    with client_for(fake_server) as client:
        info = client.upload_adapter(directory, "my-adapter", description="d", tenant="t2")

    messages = fake_server.state.upload_messages
    assert messages[0].HasField("header")
    header = messages[0].header
    assert (header.name, header.description, header.tenant) == ("my-adapter", "d", "t2")
    declared = {d.file: (d.size, d.sha256) for d in header.files}
    assert declared == {
        adapters_pb2.ADAPTER_FILE_CONFIG: (
            len(config_bytes),
            hashlib.sha256(config_bytes).hexdigest(),
        ),
        adapters_pb2.ADAPTER_FILE_WEIGHTS: (weights_size, hashlib.sha256(weights).hexdigest()),
    }
    chunks = [m.chunk for m in messages[1:]]
    assert all(m.HasField("chunk") for m in messages[1:])
    assert all(0 < len(c.data) <= CHUNK_SIZE for c in chunks)
    files = [c.file for c in chunks]
    # The config's chunks come first, then the weights' (1 MiB, 1 MiB, 0.5 MiB).
    assert files == [adapters_pb2.ADAPTER_FILE_CONFIG] + [adapters_pb2.ADAPTER_FILE_WEIGHTS] * 3
    stored = fake_server.state.adapters["my-adapter"]
    assert stored.config == config_bytes and stored.weights == weights
    assert info.size_bytes == weights_size and info.version == 1
    assert info.sha256 == hashlib.sha256(weights).hexdigest()


def test_list_get_delete(fake_server: FakeServer, make_adapter_dir: MakeAdapterDir) -> None:
    with client_for(fake_server) as client:
        client.upload_adapter(make_adapter_dir("b"), "b")
        client.upload_adapter(make_adapter_dir("a"), "a")
        assert [a.name for a in client.list_adapters()] == ["a", "b"]
        assert client.get_adapter("a").target_modules == ["q_proj", "v_proj"]
        assert client.generate("hi", adapter="a").adapter_version == 1
        assert client.delete_adapter("a").name == "a"
        with pytest.raises(grpc.RpcError) as raised:
            client.get_adapter("a")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    methods = [c.method for c in fake_server.state.calls]
    assert methods.count("UploadAdapter") == 2


def test_upload_refuses_pickle_only_directory_locally(
    fake_server: FakeServer, make_adapter_dir: MakeAdapterDir
) -> None:
    directory = make_adapter_dir(weights_file="adapter_model.bin")
    with client_for(fake_server) as client, pytest.raises(AdapterDirectoryError) as raised:
        client.upload_adapter(directory, "x")
    assert "only safetensors" in str(raised.value)
    assert "adapter_model.bin" in str(raised.value)
    assert fake_server.state.calls == []


@pytest.mark.parametrize("remove", ["adapter_model.safetensors", "adapter_config.json"])
def test_upload_refuses_missing_file_locally(
    fake_server: FakeServer, make_adapter_dir: MakeAdapterDir, remove: str
) -> None:
    directory = make_adapter_dir()
    (directory / remove).unlink()
    with client_for(fake_server) as client, pytest.raises(AdapterDirectoryError, match=remove):
        client.upload_adapter(directory, "x")
    assert fake_server.state.calls == []


def test_upload_refuses_invalid_config_json(
    fake_server: FakeServer, make_adapter_dir: MakeAdapterDir
) -> None:
    directory = make_adapter_dir()
    (directory / "adapter_config.json").write_text("{not json")
    with client_for(fake_server) as client, pytest.raises(AdapterDirectoryError, match="JSON"):
        client.upload_adapter(directory, "x")


def test_wait_until_serving(fake_server: FakeServer) -> None:
    with client_for(fake_server) as client:
        client.wait_until_serving(5.0)
        fake_server.set_serving(False)
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="NOT_SERVING"):
            client.wait_until_serving(0.5)
        assert time.monotonic() - started < 3.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_wait_until_serving_times_out_when_nobody_listens() -> None:
    client = LoraServeClient(ClientConfig(target=f"127.0.0.1:{free_port()}"))
    with client, pytest.raises(TimeoutError):
        client.wait_until_serving(0.3)


def test_wait_until_serving_waits_for_a_server_that_starts_late() -> None:
    port = free_port()
    servers: list[FakeServer] = []
    starter = threading.Timer(0.5, lambda: servers.append(start_fake_server(port=port)))
    starter.start()
    try:
        with LoraServeClient(ClientConfig(target=f"127.0.0.1:{port}")) as client:
            client.wait_until_serving(10.0)
    finally:
        starter.join()
        for server in servers:
            server.stop()


def test_context_manager_closes_channel(fake_server: FakeServer) -> None:
    with client_for(fake_server) as client:
        client.server_info()
    with pytest.raises(ValueError):
        client.server_info()


def test_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        ClientConfig(timeout_s=0)
    with pytest.raises(ValueError, match="both"):
        ClientConfig(tls_cert=tmp_path / "c.pem")
    with pytest.raises(ValueError, match="server name"):
        ClientConfig(tls_server_name="x")
    assert ClientConfig(tls_ca=tmp_path / "ca.pem").uses_tls
    assert not ClientConfig().uses_tls


def test_fake_server_without_auth_accepts_anonymous() -> None:
    server = start_fake_server(api_key=None)
    try:
        with LoraServeClient(ClientConfig(target=server.target)) as client:
            assert client.server_info().tenant == "tenant-a"
    finally:
        server.stop()
