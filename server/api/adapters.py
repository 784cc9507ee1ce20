"""The Adapters service: upload (client-streaming), list, get, delete, versions, rollback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from loraserve.adapters.errors import AdapterError, AdapterValidationError
from loraserve.adapters.store import AdapterRecord
from loraserve.server.adapter_service import (
    AdapterService,
    FileDeclaration,
    UploadSession,
    UploadSlot,
    key_of,
)
from loraserve.server.api.auth import Authorizer
from loraserve.server.api.convert import FILE_KINDS, adapter_info
from loraserve.server.api.errors import abort_for, status_for
from loraserve.server.engine.compute_threads import helper_pool
from loraserve.server.engine.types import EngineError
from loraserve.server.metrics import Metrics
from loraserve.server.runtime import Runtime
from loraserve.server.tenants import Principal
from loraserve.v1 import adapters_pb2, adapters_pb2_grpc

MAX_DECLARATIONS = 16
"""File declarations looked at in a header; an adapter has two (more are refused, with a
precise message per duplicate, up to this many)."""
VALIDATION_WORKERS = 2
"""Uploads validated at once; each holds its files (up to --max-adapter-bytes) in memory."""


class AdaptersServicer(adapters_pb2_grpc.AdaptersServicer):
    """Thin: authenticate, pick the acting tenant, call AdapterService, encode."""

    def __init__(self, runtime: Runtime, auth: Authorizer, metrics: Metrics) -> None:
        self._runtime = runtime
        self._auth = auth
        self._metrics = metrics
        self._validators = helper_pool("loraserve-validate", VALIDATION_WORKERS)

    def _service(self) -> AdapterService:
        return self._runtime.require()[1]

    def _described(self, record: AdapterRecord) -> adapters_pb2.AdapterInfo:
        """AdapterInfo with the engine's view: usage since the start, residency, pin."""
        engine = self._runtime.require()[0]
        return adapter_info(record, engine.adapter_status(key_of(record)))

    async def UploadAdapter(
        self,
        request_iterator: AsyncIterator[adapters_pb2.UploadAdapterRequest],
        context: grpc.aio.ServicerContext,
    ) -> adapters_pb2.AdapterInfo:
        # Authenticate before reading any bytes of the stream.
        principal = await self._auth.principal(context)
        slot: UploadSlot | None = None
        session: UploadSession | None = None
        try:
            service = self._service()
            # Counted from the first byte: a stalled stream holds a connection and, after its
            # header, open files and a temp directory.
            slot = service.uploads.acquire(principal.tenant)
            config = service.config
            messages = aiter(request_iterator)
            async with asyncio.timeout(config.upload_deadline_seconds):
                first = await _next_message(messages, config.upload_idle_seconds)
                if first is None or first.WhichOneof("part") != "header":
                    raise AdapterValidationError(
                        "header", "the first message must be an UploadHeader"
                    )
                header = first.header
                tenant = await self._auth.acting_tenant(context, header.tenant, principal)
                if tenant not in self._auth.registry.tenants:
                    # An admin acts for tenants that exist; a typo must not create a new one.
                    raise AdapterValidationError(
                        "tenant", f"{tenant!r} is not a tenant in the tenants file"
                    )
                if len(header.files) > MAX_DECLARATIONS:
                    # Refused before walking them: a header may hold a million of them.
                    raise AdapterValidationError(
                        "files", f"{len(header.files)} declarations; an adapter has two files"
                    )
                declarations = [
                    FileDeclaration(kind=FILE_KINDS[f.file], size=f.size, sha256=f.sha256)
                    for f in header.files
                    if _known_file(f.file)
                ]
                if len(declarations) != len(header.files):
                    raise AdapterValidationError(
                        "files", "a declaration names an unknown file kind"
                    )
                session = await _begin(
                    service, tenant, header.name, header.description, declarations
                )
                while message := await _next_message(messages, config.upload_idle_seconds):
                    if message.WhichOneof("part") != "chunk":
                        raise AdapterValidationError(
                            "header", "only the first message may be a header"
                        )
                    if not _known_file(message.chunk.file):
                        raise AdapterValidationError("chunk.file", "unknown file kind")
                    # Hashing and writing up to 4 MiB: off the loop too.
                    await asyncio.to_thread(
                        session.add_chunk, FILE_KINDS[message.chunk.file], message.chunk.data
                    )
                finishing, session = session, None  # finish() cleans up after itself
                # Validation holds the files in memory and takes seconds for big adapters: a
                # pool of its own bounds that memory and never starves the request path's
                # threads (tokenizing runs on the default pool).
                finished = asyncio.get_running_loop().run_in_executor(
                    self._validators, finishing.finish
                )
                try:
                    # Shielded: cancelling a finish() still queued would skip it, and with it
                    # the only cleanup of the temp directory (the session is ours no more).
                    record = await asyncio.shield(finished)
                except asyncio.CancelledError:
                    finishing.cancel()  # the caller is gone: finish() aborts, never commits
                    raise
            self._metrics.uploads.labels(principal.tenant, "ok").inc()
            # With usage (the name's earlier versions count), residency and pin, as GetAdapter.
            return await asyncio.to_thread(self._described, record)
        except (_IdleTimeout, TimeoutError) as exc:
            self._metrics.uploads.labels(principal.tenant, "deadline_exceeded").inc()
            what = (
                f"sent nothing for {config.upload_idle_seconds:g} s (--upload-idle-seconds)"
                if isinstance(exc, _IdleTimeout)
                else f"took longer than {config.upload_deadline_seconds:g} s "
                "(--upload-deadline-seconds)"
            )
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"upload ended: it {what}")
            raise
        except (AdapterError, EngineError, OSError) as exc:
            code, message = status_for(exc)
            self._metrics.uploads.labels(principal.tenant, code.name.lower()).inc()
            await context.abort(code, message)
            raise
        finally:
            # Every way out (refusal, cancel, disconnect, deadline, a bug) removes what was
            # written. Synchronous on purpose: an await here could itself be cancelled.
            if session is not None:
                session.abort()
            if slot is not None:
                slot.release()

    async def ListAdapters(
        self, request: adapters_pb2.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> adapters_pb2.ListAdaptersResponse:
        tenant = await self._auth.acting_tenant(context, request.tenant)
        try:
            records = await asyncio.to_thread(self._service().list, tenant)
            # Off the loop: each reads the tiers' locks, which the engine may hold briefly.
            infos = await asyncio.to_thread(lambda: [self._described(r) for r in records])
        except (AdapterError, EngineError, OSError) as exc:
            await abort_for(context, exc)
            raise
        return adapters_pb2.ListAdaptersResponse(adapters=infos)

    async def GetAdapter(
        self, request: adapters_pb2.GetAdapterRequest, context: grpc.aio.ServicerContext
    ) -> adapters_pb2.AdapterInfo:
        tenant = await self._auth.acting_tenant(context, request.tenant)
        try:
            record = await asyncio.to_thread(self._service().get, tenant, request.name)
            info = await asyncio.to_thread(self._described, record)
        except (AdapterError, EngineError, OSError) as exc:
            await abort_for(context, exc)
            raise
        return info

    async def DeleteAdapter(
        self, request: adapters_pb2.DeleteAdapterRequest, context: grpc.aio.ServicerContext
    ) -> adapters_pb2.DeleteAdapterResponse:
        tenant = await self._auth.acting_tenant(context, request.tenant)
        try:
            record = await asyncio.to_thread(self._service().delete, tenant, request.name)
        except (AdapterError, EngineError, OSError) as exc:
            await abort_for(context, exc)
            raise
        return adapters_pb2.DeleteAdapterResponse(deleted=adapter_info(record))

    async def PinAdapter(
        self, request: adapters_pb2.PinAdapterRequest, context: grpc.aio.ServicerContext
    ) -> adapters_pb2.AdapterInfo:
        tenant = await self._admin_tenant(context, request.tenant, "PinAdapter")
        try:
            engine, service = self._runtime.require()

            def pin() -> adapters_pb2.AdapterInfo:
                record, follow = service.get_for_pin(tenant, request.name)
                engine.pin(key_of(record), follow_latest=follow)
                return self._described(record)

            # Blocks until the engine thread has the adapter in device pages.
            return await asyncio.to_thread(pin)
        except (AdapterError, EngineError, OSError) as exc:
            await abort_for(context, exc)
            raise

    async def UnpinAdapter(
        self, request: adapters_pb2.PinAdapterRequest, context: grpc.aio.ServicerContext
    ) -> adapters_pb2.AdapterInfo:
        tenant = await self._admin_tenant(context, request.tenant, "UnpinAdapter")
        try:
            engine, service = self._runtime.require()

            def unpin() -> adapters_pb2.AdapterInfo:
                record, _ = service.get_for_pin(tenant, request.name)
                engine.unpin(tenant, record.name)  # unpinning what is not pinned is a no-op
                return self._described(record)

            return await asyncio.to_thread(unpin)
        except (AdapterError, EngineError, OSError) as exc:
            await abort_for(context, exc)
            raise

    async def _admin_tenant(
        self, context: grpc.aio.ServicerContext, requested: str, rpc: str
    ) -> str:
        """The tenant an admin-only call names; PERMISSION_DENIED for a tenant key, and
        INVALID_ARGUMENT when the (required) tenant is missing or unknown."""
        principal = await self._auth.principal(context)
        if not principal.admin:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{rpc} needs an admin key: pinning takes device memory from every tenant",
            )
        if not requested:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "tenant: required (the adapter's owner)"
            )
        return await self._configured_tenant(context, requested, principal)

    async def ListAdapterVersions(
        self, request: adapters_pb2.ListAdapterVersionsRequest, context: grpc.aio.ServicerContext
    ) -> adapters_pb2.ListAdapterVersionsResponse:
        tenant = await self._versions_tenant(context, request.tenant)
        try:

            def described() -> list[adapters_pb2.AdapterInfo]:
                records = self._service().list_versions(tenant, request.name)
                return [self._described(r) for r in records]

            infos = await asyncio.to_thread(described)
        except (AdapterError, EngineError, OSError) as exc:
            await abort_for(context, exc)
            raise
        return adapters_pb2.ListAdapterVersionsResponse(versions=infos)

    async def RollbackAdapter(
        self, request: adapters_pb2.RollbackAdapterRequest, context: grpc.aio.ServicerContext
    ) -> adapters_pb2.AdapterInfo:
        tenant = await self._versions_tenant(context, request.tenant)
        try:
            record = await asyncio.to_thread(
                self._service().rollback, tenant, request.name, request.to_version
            )
            return await asyncio.to_thread(self._described, record)
        except (AdapterError, EngineError, OSError) as exc:
            await abort_for(context, exc)
            raise

    async def _versions_tenant(self, context: grpc.aio.ServicerContext, requested: str) -> str:
        """The tenant a version RPC acts for, authorized like UploadAdapter: the caller's own,
        or (admins only) a tenant of the tenants file."""
        return await self._configured_tenant(
            context, requested, await self._auth.principal(context)
        )

    async def _configured_tenant(
        self, context: grpc.aio.ServicerContext, requested: str, principal: Principal
    ) -> str:
        """The tenant the caller acts for (PERMISSION_DENIED for another tenant unless admin),
        which must be in the tenants file (INVALID_ARGUMENT otherwise)."""
        tenant = await self._auth.acting_tenant(context, requested, principal)
        if tenant not in self._auth.registry.tenants:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"tenant: {tenant!r} is not a tenant in the tenants file",
            )
        return tenant


def _known_file(kind: int) -> bool:
    return kind in FILE_KINDS


class _IdleTimeout(Exception):
    """The client sent no message within the idle timeout."""


async def _next_message(
    messages: AsyncIterator[adapters_pb2.UploadAdapterRequest], idle_seconds: float
) -> adapters_pb2.UploadAdapterRequest | None:
    """The next message of the stream, None at its end; _IdleTimeout if none comes in time."""
    try:
        return await asyncio.wait_for(anext(messages, None), idle_seconds)
    except TimeoutError:
        raise _IdleTimeout from None


async def _begin(
    service: AdapterService,
    tenant: str,
    name: str,
    description: str,
    declarations: list[FileDeclaration],
) -> UploadSession:
    """service.begin_upload off the event loop, such that a cancel while it runs still
    removes the temp directory it creates (the thread finishes whatever happens to us)."""
    started = asyncio.ensure_future(
        asyncio.to_thread(service.begin_upload, tenant, name, description, declarations)
    )
    try:
        return await asyncio.shield(started)
    except asyncio.CancelledError:
        started.add_done_callback(_abort_begun)
        raise


def _abort_begun(started: asyncio.Future[UploadSession]) -> None:
    if not started.cancelled() and started.exception() is None:
        started.result().abort()
