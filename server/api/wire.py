"""Registers the servicers so that undecodable request bytes are INVALID_ARGUMENT, not UNKNOWN.

protobuf refuses invalid UTF-8 in a string field, and any corrupt wire bytes, while gRPC decodes
the request, before a handler runs: left alone, grpc logs a traceback and the caller gets
UNKNOWN. Here each method's deserializer returns a CorruptMessage marker instead of raising, and
each handler is wrapped to answer that marker with INVALID_ARGUMENT (for a client stream, when
the handler reads the bad message), so the handler's own cleanup still runs.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

CORRUPT_MESSAGE = (
    "request is not a valid protobuf message (corrupt bytes, or a string field that is not "
    "valid UTF-8)"
)


class CorruptMessage:
    """Stands in for a request message protobuf could not decode."""


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except (DecodeError, ValueError, UnicodeDecodeError):
            return CorruptMessage()

    return decode


def _guard_unary_unary(behavior: Callable) -> Callable:
    @functools.wraps(behavior)
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, CorruptMessage):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, CORRUPT_MESSAGE)
        return await behavior(request, context)

    return handle


def _guard_unary_stream(behavior: Callable) -> Callable:
    @functools.wraps(behavior)
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, CorruptMessage):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, CORRUPT_MESSAGE)
        async for response in behavior(request, context):
            yield response

    return handle


def _guard_stream_unary(behavior: Callable) -> Callable:
    @functools.wraps(behavior)
    async def handle(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        async def checked() -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, CorruptMessage):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, CORRUPT_MESSAGE)
                yield request

        return await behavior(checked(), context)

    return handle


_GUARDS = {
    "unary_unary": _guard_unary_unary,
    "unary_stream": _guard_unary_stream,
    "stream_unary": _guard_stream_unary,
}


class _Capture:
    """Stands in for a grpc server to collect what a generated add_*_to_server registers."""

    def __init__(self) -> None:
        self.handlers: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same handlers also arrive through add_registered_method_handlers

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.handlers[service] = handlers


def add_guarded(
    add_to_server: Callable[[Any, Any], None], servicer: Any, server: grpc.aio.Server
) -> None:
    """Registers `servicer` like the generated `add_to_server`, with undecodable requests
    answered INVALID_ARGUMENT."""
    capture = _Capture()
    add_to_server(servicer, capture)
    if not capture.handlers:
        # Stubs from a grpcio-tools too old to register methods by name: refuse to start
        # rather than serve nothing.
        raise RuntimeError(f"{add_to_server.__name__} registered no method handlers")
    for service, handlers in capture.handlers.items():
        guarded = {}
        for method, handler in handlers.items():
            kind = next(k for k in (*_GUARDS, "stream_stream") if getattr(handler, k) is not None)
            if kind not in _GUARDS:
                raise TypeError(f"{service}/{method}: bidirectional streams are not guarded")
            guarded[method] = handler._replace(  # type: ignore[attr-defined]
                request_deserializer=_tolerant(handler.request_deserializer),
                **{kind: _GUARDS[kind](getattr(handler, kind))},
            )
        generic = grpc.method_handlers_generic_handler(service, guarded)
        server.add_generic_rpc_handlers((generic,))
        server.add_registered_method_handlers(service, guarded)
