"""A fake in-process loraserve server for client tests: both services plus grpc.health.v1.

Behaviour is trivial and in memory: Generate echoes the prompt; uploads are reassembled,
checked against the header's sizes and sha256 and kept. Every call's metadata and remaining
deadline are recorded so tests can assert what the client sent.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from loraserve.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc

TENANT = "tenant-a"
"""The tenant every authenticated caller is."""

API_KEY = "secret-key"
"""The key the fake server fixture requires."""

MakeAdapterDir = Callable[..., Path]
"""The make_adapter_dir fixture: (name="adapter", weights_size=1000, weights_file=...) -> dir."""


@dataclass
class CallRecord:
    """What one RPC received."""

    method: str
    metadata: dict[str, str]
    time_remaining: float | None


@dataclass
class StoredAdapter:
    """An uploaded adapter with its exact bytes."""

    info: adapters_pb2.AdapterInfo
    config: bytes
    weights: bytes


@dataclass
class FakeState:
    """Shared between the servicers and the test."""

    api_key: str | None
    calls: list[CallRecord] = field(default_factory=list)
    adapters: dict[str, StoredAdapter] = field(default_factory=dict)
    generate_requests: list[inference_pb2.GenerateRequest] = field(default_factory=list)
    upload_messages: list[adapters_pb2.UploadAdapterRequest] = field(default_factory=list)
    stream_ended: threading.Event = field(default_factory=threading.Event)
    stream_completed: bool = False
    stream_length: int | None = None
    """When set, GenerateStream sends this many slow messages (for cancellation tests)."""

    def enter(self, method: str, context: grpc.ServicerContext) -> None:
        """Records the call and enforces the bearer key like the real server."""
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.calls.append(CallRecord(method, metadata, context.time_remaining()))
        if self.api_key is not None and metadata.get("authorization") != f"Bearer {self.api_key}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key")

    def adapter_version(self, name: str, context: grpc.ServicerContext) -> int:
        """0 for the base model; NOT_FOUND for an unknown adapter, as the real server does."""
        if not name:
            return 0
        if name not in self.adapters:
            context.abort(grpc.StatusCode.NOT_FOUND, f"adapter {name!r} not found")
        return self.adapters[name].info.version


def _prompt_text(request: inference_pb2.GenerateRequest) -> str:
    if request.messages:
        return " | ".join(f"{m.role}: {m.content}" for m in request.messages)
    return request.prompt


class FakeInference(inference_pb2_grpc.InferenceServicer):
    """Echoes the prompt, one character per token."""

    def __init__(self, state: FakeState) -> None:
        self.state = state

    def _completion(self, request: inference_pb2.GenerateRequest) -> str:
        text = f"echo: {_prompt_text(request)}"
        sampling = request.sampling
        limit = sampling.max_new_tokens if sampling.HasField("max_new_tokens") else 64
        return text[:limit]

    def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> inference_pb2.GenerateResponse:
        self.state.enter("Generate", context)
        self.state.generate_requests.append(request)
        version = self.state.adapter_version(request.adapter, context)
        text = self._completion(request)
        return inference_pb2.GenerateResponse(
            text=text,
            token_ids=[ord(c) for c in text],
            finish_reason=inference_pb2.FINISH_REASON_LENGTH,
            usage=inference_pb2.Usage(
                prompt_tokens=len(_prompt_text(request)), completion_tokens=len(text)
            ),
            request_id="req-1",
            adapter_version=version,
        )

    def GenerateStream(
        self, request: inference_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[inference_pb2.GenerateStreamResponse]:
        self.state.enter("GenerateStream", context)
        self.state.generate_requests.append(request)
        context.add_callback(self.state.stream_ended.set)
        version = self.state.adapter_version(request.adapter, context)
        if self.state.stream_length is not None:
            yield from self._slow_stream(context)
            return
        text = self._completion(request)
        for i, char in enumerate(text):
            last = i == len(text) - 1
            yield inference_pb2.GenerateStreamResponse(
                text=char,
                token_ids=[ord(char)],
                finish_reason=inference_pb2.FINISH_REASON_EOS if last else 0,
                usage=inference_pb2.Usage(completion_tokens=len(text)) if last else None,
                request_id="req-2",
                adapter_version=version,
            )
        self.state.stream_completed = True

    def _slow_stream(
        self, context: grpc.ServicerContext
    ) -> Iterator[inference_pb2.GenerateStreamResponse]:
        for _ in range(self.state.stream_length or 0):
            if not context.is_active():
                return
            yield inference_pb2.GenerateStreamResponse(text="x", token_ids=[120])
            time.sleep(0.01)
        self.state.stream_completed = True

    def GetServerInfo(
        self, request: inference_pb2.GetServerInfoRequest, context: grpc.ServicerContext
    ) -> inference_pb2.ServerInfo:
        self.state.enter("GetServerInfo", context)
        return inference_pb2.ServerInfo(
            model_path="/models/fake",
            model_type="llama",
            architecture="LlamaForCausalLM",
            device="cpu",
            dtype="float32",
            max_lora_rank=64,
            max_new_tokens=1024,
            target_modules=["q_proj", "v_proj"],
            version="0.1.0",
            tenant=TENANT,
        )


class FakeAdapters(adapters_pb2_grpc.AdaptersServicer):
    """Keeps uploaded adapters in memory, verifying each file against the header."""

    def __init__(self, state: FakeState) -> None:
        self.state = state

    def UploadAdapter(
        self,
        request_iterator: Iterator[adapters_pb2.UploadAdapterRequest],
        context: grpc.ServicerContext,
    ) -> adapters_pb2.AdapterInfo:
        self.state.enter("UploadAdapter", context)
        messages = list(request_iterator)
        self.state.upload_messages.extend(messages)
        if not messages or not messages[0].HasField("header"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "first message must be the header")
        header = messages[0].header
        received: dict[int, bytearray] = {
            adapters_pb2.ADAPTER_FILE_CONFIG: bytearray(),
            adapters_pb2.ADAPTER_FILE_WEIGHTS: bytearray(),
        }
        for message in messages[1:]:
            if not message.HasField("chunk"):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a second header")
            received[message.chunk.file].extend(message.chunk.data)
        for declaration in header.files:
            data = bytes(received[declaration.file])
            if len(data) != declaration.size or (
                hashlib.sha256(data).hexdigest() != declaration.sha256
            ):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "size or sha256 mismatch")
        config = bytes(received[adapters_pb2.ADAPTER_FILE_CONFIG])
        weights = bytes(received[adapters_pb2.ADAPTER_FILE_WEIGHTS])
        peft = json.loads(config)
        previous = self.state.adapters.get(header.name)
        info = adapters_pb2.AdapterInfo(
            name=header.name,
            tenant=header.tenant or TENANT,
            version=previous.info.version + 1 if previous else 1,
            rank=peft.get("r", 8),
            alpha=peft.get("lora_alpha", 16),
            target_modules=sorted(peft.get("target_modules", [])),
            size_bytes=len(weights),
            sha256=hashlib.sha256(weights).hexdigest(),
            created_at=1_700_000_000.0,
            description=header.description,
        )
        self.state.adapters[header.name] = StoredAdapter(info, config, weights)
        return info

    def ListAdapters(
        self, request: adapters_pb2.ListAdaptersRequest, context: grpc.ServicerContext
    ) -> adapters_pb2.ListAdaptersResponse:
        self.state.enter("ListAdapters", context)
        infos = [self.state.adapters[n].info for n in sorted(self.state.adapters)]
        return adapters_pb2.ListAdaptersResponse(adapters=infos)

    def _lookup(self, name: str, context: grpc.ServicerContext) -> StoredAdapter:
        if name not in self.state.adapters:
            context.abort(grpc.StatusCode.NOT_FOUND, f"adapter {name!r} not found")
        return self.state.adapters[name]

    def GetAdapter(
        self, request: adapters_pb2.GetAdapterRequest, context: grpc.ServicerContext
    ) -> adapters_pb2.AdapterInfo:
        self.state.enter("GetAdapter", context)
        return self._lookup(request.name, context).info

    def DeleteAdapter(
        self, request: adapters_pb2.DeleteAdapterRequest, context: grpc.ServicerContext
    ) -> adapters_pb2.DeleteAdapterResponse:
        self.state.enter("DeleteAdapter", context)
        stored = self._lookup(request.name, context)
        del self.state.adapters[request.name]
        return adapters_pb2.DeleteAdapterResponse(deleted=stored.info)


@dataclass
class FakeServer:
    """A running fake server and the handles tests need."""

    server: grpc.Server
    target: str
    state: FakeState
    health: health.HealthServicer

    def set_serving(self, serving: bool) -> None:
        """Flips the overall health status."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self.health.set("", status)

    def stop(self) -> None:
        """Stops at once, cancelling calls in flight."""
        self.server.stop(None).wait()


def start_fake_server(
    api_key: str | None = API_KEY,
    credentials: grpc.ServerCredentials | None = None,
    port: int = 0,
) -> FakeServer:
    """Starts the fake on 127.0.0.1 (port 0: a free one), TLS when credentials are given."""
    state = FakeState(api_key=api_key)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    inference_pb2_grpc.add_InferenceServicer_to_server(FakeInference(state), server)
    adapters_pb2_grpc.add_AdaptersServicer_to_server(FakeAdapters(state), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if credentials is None:
        port = server.add_insecure_port(f"127.0.0.1:{port}")
    else:
        port = server.add_secure_port(f"127.0.0.1:{port}", credentials)
    server.start()
    fake = FakeServer(server, f"127.0.0.1:{port}", state, health_servicer)
    fake.set_serving(True)
    return fake
