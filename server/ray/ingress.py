"""The cluster's front door: loraserve's gRPC API, forwarded to Ray Serve replicas by handle.

Why not Ray Serve's own gRPC proxy: in Ray 2.60 it binds every interface (`[::]:port`,
`ray/serve/_private/grpc_util.py: start_grpc_server`), has no TLS and no standard
`grpc.health.v1` service. This ingress is the smallest thing that keeps the single server's
contract: it binds `--host` (with TLS when configured), serves health and reflection, and passes
each call's serialized request and metadata to a replica, whose ordinary loraserve server
authenticates, validates and answers; the status code and details come back unchanged.

Routing: Generate and GenerateStream carry the multiplexed model id `<tenant>/<adapter>` (the
tenant from the call's API key), so Serve prefers the replica that holds that adapter; base-model
calls and adapter management carry none and go to the least loaded replica (Serve's
power-of-two-choices). An upload's messages are collected here (bounded by the adapter size
limits) and replayed to one replica: Ray handles cannot stream a request.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loraserve.server.api.auth import Authorizer
from loraserve.server.config import ServerConfig
from loraserve.server.tenants import TenantRegistry
from loraserve.v1 import adapters_pb2, inference_pb2

log = logging.getLogger(__name__)

INFERENCE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
ADAPTERS = adapters_pb2.DESCRIPTOR.services_by_name["Adapters"].full_name
SERVICE_NAMES = (INFERENCE, ADAPTERS)

_DROPPED_METADATA = {"user-agent", "content-type", "te", "grpc-accept-encoding", "grpc-timeout"}
PER_REPLICA_RPCS = ("PinAdapter", "UnpinAdapter")
PER_REPLICA_MESSAGE = (
    "pinning over the API is not supported under serve-ray: a call reaches one replica, and a "
    "pin must hold on every one; start serve-ray with --preload TENANT/NAME, which every "
    "replica applies at start"
)
_UPLOAD_SLACK_BYTES = 1 << 20
"""Protobuf framing and the header, beyond the two files' size limits."""


def adapter_route(tenant: str, adapter: str) -> str:
    """The multiplexed model id of a request: its tenant-qualified adapter, "" for the base."""
    return f"{tenant}/{adapter}" if adapter else ""


class Ingress:
    """A grpc.aio server whose Inference and Adapters handlers forward to a deployment handle."""

    def __init__(self, config: ServerConfig, handle: Any) -> None:
        self.config = config
        self._handle = handle
        self.registry = (
            TenantRegistry.development()
            if config.tenants_file is None
            else TenantRegistry.from_file(config.tenants_file)
        )
        self._auth = Authorizer(self.registry)
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
            ]
        )
        self.port = 0

    async def start(self) -> int:
        from loraserve.server.app import _host_for_bind, _server_credentials

        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        unary = grpc.unary_unary_rpc_method_handler
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    INFERENCE,
                    {
                        "Generate": unary(self._forward_generate),
                        "GenerateStream": grpc.unary_stream_rpc_method_handler(
                            self._forward_generate_stream
                        ),
                        "GetServerInfo": unary(self._unary("/" + INFERENCE + "/GetServerInfo")),
                    },
                ),
                grpc.method_handlers_generic_handler(
                    ADAPTERS,
                    {
                        "UploadAdapter": grpc.stream_unary_rpc_method_handler(self._forward_upload),
                        **{
                            name: unary(self._unary(f"/{ADAPTERS}/{name}"))
                            for name in (
                                "ListAdapters",
                                "GetAdapter",
                                "DeleteAdapter",
                                "ListAdapterVersions",
                                "RollbackAdapter",
                            )
                        },
                        **{name: unary(self._per_replica_only) for name in PER_REPLICA_RPCS},
                    },
                ),
            )
        )
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        address = f"{_host_for_bind(self.config.host)}:{self.config.port}"
        credentials = _server_credentials(self.config)
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"cannot bind {self.config.host}:{self.config.port}")
        await self.server.start()
        await self.set_health(health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self, grace: float) -> None:
        await self.set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)

    async def set_health(self, status: int) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    # ----- forwarding -----

    def _unary(self, method: str) -> Callable[[bytes, grpc.aio.ServicerContext], Any]:
        async def forward(payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
            await self._auth.principal(context)  # refuse unknown keys before any replica work
            return await self._call(context, "", "unary", method, payload)

        return forward

    async def _per_replica_only(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Pins hold one replica's device memory, and a call here reaches one replica."""
        await self._auth.principal(context)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, PER_REPLICA_MESSAGE)
        raise AssertionError("abort raises")

    async def _forward_generate(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        route = await self._route(payload, context)
        return await self._call(context, route, "unary", f"/{INFERENCE}/Generate", payload)

    async def _forward_generate_stream(
        self, payload: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        route = await self._route(payload, context)
        handle = self._handle.options(stream=True, multiplexed_model_id=route)
        replies = handle.stream.remote(
            f"/{INFERENCE}/GenerateStream",
            payload,
            _forwarded_metadata(context),
            context.time_remaining(),
        )
        try:
            async for code, details, message in replies:
                if code != "OK":
                    await context.abort(grpc.StatusCode[code], details)
                yield message
        except Exception as exc:
            await _abort_for_ray_error(context, exc)
            raise
        finally:
            replies.cancel()

    async def _forward_upload(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> bytes:
        await self._auth.principal(context)  # authenticate before reading the stream
        limit = (
            self.config.max_adapter_bytes
            + self.config.max_adapter_config_bytes
            + _UPLOAD_SLACK_BYTES
        )
        chunks: list[bytes] = []
        total = 0
        async for chunk in requests:
            total += len(chunk)
            if total > limit:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"upload is larger than the {limit} bytes the adapter size limits allow",
                )
            chunks.append(chunk)
        return await self._call(context, "", "upload", f"/{ADAPTERS}/UploadAdapter", chunks)

    async def _route(self, payload: bytes, context: grpc.aio.ServicerContext) -> str:
        principal = await self._auth.principal(context)
        try:
            request = inference_pb2.GenerateRequest.FromString(payload)
        except Exception:  # undecodable: the replica's server gives the precise error
            return ""
        return adapter_route(principal.tenant, request.adapter)

    async def _call(
        self,
        context: grpc.aio.ServicerContext,
        route: str,
        kind: str,
        method: str,
        payload: bytes | list[bytes],
    ) -> bytes:
        handle = self._handle.options(multiplexed_model_id=route)
        try:
            code, details, response = await getattr(handle, kind).remote(
                method, payload, _forwarded_metadata(context), context.time_remaining()
            )
        except Exception as exc:
            await _abort_for_ray_error(context, exc)
            raise
        if code != "OK":
            await context.abort(grpc.StatusCode[code], details)
        return response


def _forwarded_metadata(context: grpc.aio.ServicerContext) -> Sequence[tuple[str, Any]]:
    return [
        (key, value)
        for key, value in context.invocation_metadata() or ()
        if key not in _DROPPED_METADATA and not key.startswith(":")
    ]


async def _abort_for_ray_error(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    """A replica that died (or could not be reached) is UNAVAILABLE: the client may retry."""
    import ray.exceptions
    from ray.serve.exceptions import BackPressureError

    if isinstance(exc, grpc.aio.AbortError | grpc.RpcError):
        return  # already a gRPC status
    if isinstance(exc, BackPressureError):
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "all replicas are saturated")
    if isinstance(exc, ray.exceptions.RayError):
        log.warning("replica call failed: %s", exc)
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"the replica serving this call failed ({type(exc).__name__}); retry",
        )
