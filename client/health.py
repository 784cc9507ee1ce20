"""Waiting for a server to report SERVING through the standard grpc.health.v1 service."""

from __future__ import annotations

import asyncio
import time

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraserve.client.channel import Metadata

POLL_INTERVAL_S = 0.2
"""Pause between checks while the server is up but not yet SERVING (model still loading)."""

_PROBE_TIMEOUT_S = 2.0
"""Longest single Check; bounds how stale one probe can be when the deadline is long."""

# Codes meaning "not ready yet, keep waiting": unreachable, slow, or service not registered yet.
_RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.NOT_FOUND}
)


def _status_name(status: int) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def _timeout_error(target: str, timeout_s: float, last: str) -> TimeoutError:
    return TimeoutError(f"{target} not SERVING after {timeout_s:g}s (last: {last})")


def wait_until_serving_sync(
    channel: grpc.Channel, target: str, metadata: Metadata, timeout_s: float, service: str = ""
) -> None:
    """Blocks until `service` ("" = the whole server) is SERVING; TimeoutError otherwise."""
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service=service)
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            # wait_for_ready: while the server is not listening yet, wait instead of failing fast.
            response = stub.Check(
                request,
                timeout=min(remaining, _PROBE_TIMEOUT_S),
                metadata=metadata,
                wait_for_ready=True,
            )
        except grpc.RpcError as e:
            if e.code() not in _RETRYABLE:
                raise
            last = e.code().name
        else:
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = _status_name(response.status)
        time.sleep(max(0.0, min(POLL_INTERVAL_S, deadline - time.monotonic())))
    raise _timeout_error(target, timeout_s, last)


async def wait_until_serving_async(
    channel: grpc.aio.Channel, target: str, metadata: Metadata, timeout_s: float, service: str = ""
) -> None:
    """The asyncio twin of wait_until_serving_sync."""
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service=service)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last = "no answer"
    while (remaining := deadline - loop.time()) > 0:
        try:
            response = await stub.Check(
                request,
                timeout=min(remaining, _PROBE_TIMEOUT_S),
                metadata=metadata,
                wait_for_ready=True,
            )
        except grpc.RpcError as e:
            if e.code() not in _RETRYABLE:
                raise
            last = e.code().name
        else:
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = _status_name(response.status)
        await asyncio.sleep(max(0.0, min(POLL_INTERVAL_S, deadline - loop.time())))
    raise _timeout_error(target, timeout_s, last)
