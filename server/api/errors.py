"""Maps domain errors to gRPC status codes (never a blanket INTERNAL for bad input)."""

from __future__ import annotations

import errno
import logging
import os

import grpc

from loraserve.adapters.errors import (
    AdapterCorruptError,
    AdapterError,
    AdapterNotFoundError,
    AdapterQuotaError,
    AdapterUploadCancelledError,
    AdapterValidationError,
)
from loraserve.server.engine.types import EngineError, ErrorKind

log = logging.getLogger(__name__)

_EXHAUSTED_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOSPC, errno.EDQUOT})

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
    if isinstance(exc, AdapterUploadCancelledError):
        return grpc.StatusCode.CANCELLED, str(exc)
    if isinstance(exc, AdapterCorruptError):
        # The details name files on the server's disk: for the operator's log only.
        log.error("stored adapter is corrupt: %s", exc)
        return grpc.StatusCode.INTERNAL, "stored adapter is corrupt (see the server log)"
    if isinstance(exc, AdapterError):
        return grpc.StatusCode.INTERNAL, str(exc)
    if isinstance(exc, OSError):
        # E.g. out of descriptors or disk: say what, never where (the filename is a server path).
        log.error("storage error: %s", exc)
        reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
        code = (
            grpc.StatusCode.RESOURCE_EXHAUSTED
            if exc.errno in _EXHAUSTED_ERRNOS
            else grpc.StatusCode.INTERNAL
        )
        return code, f"server storage error: {reason}; retry later"
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
