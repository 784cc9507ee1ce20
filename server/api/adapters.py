"""The Adapters service: upload (client-streaming), list, get, delete."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from loraserve.adapters.errors import AdapterError, AdapterValidationError
from loraserve.server.adapter_service import AdapterService, FileDeclaration, UploadSession
from loraserve.server.api.auth import Authorizer
from loraserve.server.api.convert import FILE_KINDS, adapter_info
from loraserve.server.api.errors import abort_for, status_for
from loraserve.server.engine.types import EngineError
from loraserve.server.metrics import Metrics
from loraserve.server.runtime import Runtime
from loraserve.v1 import adapters_pb2, adapters_pb2_grpc


class AdaptersServicer(adapters_pb2_grpc.AdaptersServicer):
    """Thin: authenticate, pick the acting tenant, call AdapterService, encode."""

    def __init__(self, runtime: Runtime, auth: Authorizer, metrics: Metrics) -> None:
        self._runtime = runtime
        self._auth = auth
        self._metrics = metrics

    def _service(self) -> AdapterService:
        return self._runtime.require()[1]

    async def UploadAdapter(
        self,
        request_iterator: AsyncIterator[adapters_pb2.UploadAdapterRequest],
        context: grpc.aio.ServicerContext,
    ) -> adapters_pb2.AdapterInfo:
        # Authenticate before reading any bytes of the stream.
        principal = await self._auth.principal(context)
        session: UploadSession | None = None
        try:
            first = await anext(aiter(request_iterator), None)
            if first is None or first.WhichOneof("part") != "header":
                raise AdapterValidationError("header", "the first message must be an UploadHeader")
            header = first.header
            tenant = await self._auth.acting_tenant(context, header.tenant, principal)
            declarations = [
                FileDeclaration(kind=FILE_KINDS[f.file], size=f.size, sha256=f.sha256)
                for f in header.files
                if _known_file(f.file)
            ]
            if len(declarations) != len(header.files):
                raise AdapterValidationError("files", "a declaration names an unknown file kind")
            session = await asyncio.to_thread(
                self._service().begin_upload, tenant, header.name, header.description, declarations
            )
            async for message in request_iterator:
                if message.WhichOneof("part") != "chunk":
                    raise AdapterValidationError("header", "only the first message may be a header")
                if not _known_file(message.chunk.file):
                    raise AdapterValidationError("chunk.file", "unknown file kind")
                session.add_chunk(FILE_KINDS[message.chunk.file], message.chunk.data)
            record = await asyncio.to_thread(session.finish)
            self._metrics.uploads.labels(principal.tenant, "ok").inc()
            return adapter_info(record)
        except (AdapterError, EngineError) as exc:
            if session is not None:
                await asyncio.to_thread(session.abort)
            code, message = status_for(exc)
            self._metrics.uploads.labels(principal.tenant, code.name.lower()).inc()
            await context.abort(code, message)
            raise
        except BaseException:
            # Client gone, deadline, or a bug: never leave a half-written upload behind.
            if session is not None:
                await asyncio.to_thread(session.abort)
            raise

    async def ListAdapters(
        self, request: adapters_pb2.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> adapters_pb2.ListAdaptersResponse:
        tenant = await self._auth.acting_tenant(context, request.tenant)
        try:
            records = await asyncio.to_thread(self._service().list, tenant)
        except (AdapterError, EngineError) as exc:
            await abort_for(context, exc)
            raise
        return adapters_pb2.ListAdaptersResponse(adapters=[adapter_info(r) for r in records])

    async def GetAdapter(
        self, request: adapters_pb2.GetAdapterRequest, context: grpc.aio.ServicerContext
    ) -> adapters_pb2.AdapterInfo:
        tenant = await self._auth.acting_tenant(context, request.tenant)
        try:
            record = await asyncio.to_thread(self._service().get, tenant, request.name)
        except (AdapterError, EngineError) as exc:
            await abort_for(context, exc)
            raise
        return adapter_info(record)

    async def DeleteAdapter(
        self, request: adapters_pb2.DeleteAdapterRequest, context: grpc.aio.ServicerContext
    ) -> adapters_pb2.DeleteAdapterResponse:
        tenant = await self._auth.acting_tenant(context, request.tenant)
        try:
            record = await asyncio.to_thread(self._service().delete, tenant, request.name)
        except (AdapterError, EngineError) as exc:
            await abort_for(context, exc)
            raise
        return adapters_pb2.DeleteAdapterResponse(deleted=adapter_info(record))


def _known_file(kind: int) -> bool:
    return kind in FILE_KINDS
