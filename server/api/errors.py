"""Maps domain errors to gRPC status codes (never a blanket INTERNAL for bad input)."""

from __future__ import annotations

import logging

import grpc

from loraserve.adapters.errors import (
    AdapterCorruptError,
    AdapterError,
    AdapterNotFoundError,
    AdapterQuotaError,
    AdapterValidationError,
)
from loraserve.server.engine.types import EngineError, ErrorKind

log = logging.getLogger(__name__)

_ENGINE_CODES = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str] | None:
    """The status and message for a known domain error; None for anything unexpected."""
    if isinstance(exc, EngineError):
        return _ENGINE_CODES[exc.kind], exc.message
    if isinstance(exc, AdapterValidationError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, AdapterQuotaError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, AdapterNotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, AdapterCorruptError):
        return grpc.StatusCode.INTERNAL, f"stored adapter is corrupt: {exc}"
    if isinstance(exc, AdapterError):
        return grpc.StatusCode.INTERNAL, str(exc)
    return None


def status_for(exc: Exception, request_id: str = "") -> tuple[grpc.StatusCode, str]:
    """The status and message for `exc`; INTERNAL (logged, with the request id) if unknown."""
    mapped = status_of(exc)
    if mapped is not None:
        return mapped
    log.error("unexpected error%s", f" in request {request_id}" if request_id else "", exc_info=exc)
    suffix = f" (request {request_id})" if request_id else ""
    return grpc.StatusCode.INTERNAL, f"internal error{suffix}: {type(exc).__name__}"


async def abort_for(
    context: grpc.aio.ServicerContext, exc: Exception, request_id: str = ""
) -> None:
    """Aborts the call with the status matching `exc` (INTERNAL, logged, for anything unknown)."""
    await context.abort(*status_for(exc, request_id))
