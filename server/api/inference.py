"""The Inference service: Generate, GenerateStream, GetServerInfo."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

import loraserve
from loraserve.adapters.errors import AdapterError
from loraserve.adapters.names import split_version
from loraserve.server.adapter_service import AdapterService
from loraserve.server.api.auth import Authorizer, bearer_key, unauthenticated
from loraserve.server.api.convert import (
    FINISH_REASONS,
    model_name,
    sampling_overrides,
    token_logprobs_pb,
    usage_pb,
)
from loraserve.server.api.errors import abort_for, status_for
from loraserve.server.api.stream_pacing import LoopWaker, PacedEvents
from loraserve.server.engine.engine import Engine
from loraserve.server.engine.types import (
    AdapterRef,
    EngineError,
    ErrorEvent,
    Event,
    FinishEvent,
    LogprobOptions,
    SamplingParams,
    TokenEvent,
)
from loraserve.server.request_log import RequestLogger, RequestRecord
from loraserve.server.runtime import Runtime
from loraserve.v1 import inference_pb2, inference_pb2_grpc


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    """Thin: authenticate, turn the request into an engine submission, relay its events."""

    def __init__(
        self, runtime: Runtime, auth: Authorizer, request_log: RequestLogger, served_by: str = ""
    ) -> None:
        self._runtime = runtime
        self._auth = auth
        self._log = request_log
        self._served_by = served_by
        self._loop_waker: LoopWaker | None = None

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GenerateResponse:
        async for request_id, event in self._events(request, context, "Generate", stream=False):
            if isinstance(event, FinishEvent):
                return inference_pb2.GenerateResponse(
                    text=event.text,
                    token_ids=list(event.token_ids),
                    finish_reason=FINISH_REASONS[event.finish_reason],
                    usage=usage_pb(event.usage),
                    request_id=request_id,
                    adapter_version=event.adapter_version,
                    served_by=self._served_by,
                    logprobs=token_logprobs_pb(event.logprobs),
                    prompt_logprobs=token_logprobs_pb(event.prompt_logprobs),
                )
        raise AssertionError("the event stream ended without a finish event")

    async def GenerateStream(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        first = True  # prompt_logprobs ride on the first message only
        async for request_id, event in self._events(request, context, "GenerateStream"):
            # Each engine event carries exactly the entries of its own token ids, whatever
            # text is held back (stop sequences, partial characters), so they stay aligned.
            if isinstance(event, TokenEvent):
                yield inference_pb2.GenerateStreamResponse(
                    text=event.text,
                    token_ids=list(event.token_ids),
                    request_id=request_id,
                    adapter_version=event.adapter_version,
                    logprobs=token_logprobs_pb(event.logprobs),
                    prompt_logprobs=token_logprobs_pb(event.prompt_logprobs if first else ()),
                )
                first = False
            elif isinstance(event, FinishEvent):
                yield inference_pb2.GenerateStreamResponse(
                    text=event.text_delta,
                    token_ids=list(event.new_token_ids),
                    finish_reason=FINISH_REASONS[event.finish_reason],
                    usage=usage_pb(event.usage),
                    request_id=request_id,
                    adapter_version=event.adapter_version,
                    served_by=self._served_by,
                    logprobs=token_logprobs_pb(event.new_logprobs),
                    prompt_logprobs=token_logprobs_pb(event.prompt_logprobs if first else ()),
                )

    async def GetServerInfo(
        self, request: inference_pb2.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ServerInfo:
        principal = await self._auth.principal(context)
        try:
            engine, _ = self._runtime.require()
        except EngineError as exc:
            await abort_for(context, exc)
            raise
        loaded = engine.loaded
        config = self._runtime.config
        return inference_pb2.ServerInfo(
            # The filesystem path tells a tenant about the server's disk: admins only.
            model_path=str(loaded.model_path) if principal.admin else "",
            model_name=model_name(loaded.model_path),
            model_type=loaded.model_type,
            architecture=loaded.architecture,
            device=str(loaded.device),
            dtype=str(loaded.dtype).removeprefix("torch."),
            max_lora_rank=config.max_lora_rank,
            max_new_tokens=config.max_new_tokens_limit,
            max_prompt_tokens=engine.max_prompt_tokens,
            max_adapter_bytes=config.max_adapter_bytes,
            target_modules=loaded.spec.leaf_names(),
            max_batch_size=config.max_batch_size,
            version=loraserve.__version__,
            tenant=principal.tenant,
            has_chat_template=engine.has_chat_template,
            currency=config.currency,
        )

    def _waker(self) -> LoopWaker:
        """The waker of the running loop (the servicer serves one loop; made on first use)."""
        loop = asyncio.get_running_loop()
        if self._loop_waker is None or self._loop_waker.loop is not loop:
            self._loop_waker = LoopWaker(loop)
        return self._loop_waker

    async def _events(
        self,
        request: inference_pb2.GenerateRequest,
        context: grpc.aio.ServicerContext,
        rpc: str,
        stream: bool = True,
    ) -> AsyncIterator[tuple[str, Event]]:
        """Submits the request and yields (request_id, event) until it finishes or fails;
        with stream=False, the token events are dropped on the engine thread.

        Leaving early (client gone, deadline) cancels the request inside the engine. Every
        outcome is recorded once (metrics and access log).
        """
        # The adapter name is logged only once the caller is authenticated (and clipped by the
        # logger): an anonymous caller must not be able to write its free text into the log.
        record = RequestRecord(rpc=rpc, served_by=self._served_by)
        logged = False

        async def fail(exc: Exception, request_id: str = "") -> None:
            nonlocal logged
            code, message = status_for(exc, request_id)
            record.outcome, record.message, logged = code.name.lower(), message, True
            self._log.record(record)
            await context.abort(code, message)

        handle = None
        try:
            principal = self._auth.registry.authenticate(bearer_key(context))
            if principal is None:
                await fail(unauthenticated())
            assert principal is not None
            record.tenant = principal.tenant
            record.adapter = request.adapter
            try:
                engine, adapters = self._runtime.require()
                # One hop to a worker thread, never the event loop, where it would stall every
                # other tenant's calls: the adapter lookup reads the store, tokenizing takes
                # time proportional to the prompt, and so does converting a request's repeated
                # fields (up to a message's worth of chat turns or stops). One hop, not one per
                # step: each costs the loop a future, a thread wake-up and a callback.
                ref, sampling, prompt_ids, logprobs = await asyncio.to_thread(
                    _prepare, engine, adapters, principal.tenant, request
                )
            except (AdapterError, EngineError) as exc:
                await fail(exc)
                return
            # A unary call reads only the finish event: its tokens never reach the loop.
            events = PacedEvents(
                self._waker(), self._runtime.config.stream_interval_seconds, keep_tokens=stream
            )
            try:
                handle = engine.submit(
                    tenant=principal.tenant,
                    adapter=ref,
                    prompt_ids=prompt_ids,
                    sampling=sampling,
                    sink=events.sink,
                    logprobs=logprobs,
                )
            except EngineError as exc:
                await fail(exc)
                return
            record.request_id = handle.request_id
            while True:
                event = await events.next()
                if isinstance(event, ErrorEvent):
                    await fail(event.error, handle.request_id)
                    return
                if isinstance(event, FinishEvent):
                    record.adapter_version = event.adapter_version
                    record.usage = event.usage
                    record.finish_reason = event.finish_reason.value
                    record.prompt, record.completion = request.prompt, event.text
                    logged = True
                    self._log.record(record)
                    yield handle.request_id, event
                    return
                yield handle.request_id, event
        except asyncio.CancelledError:
            if not logged:
                remaining = context.time_remaining()
                record.outcome = (
                    "deadline" if remaining is not None and remaining <= 0 else "cancelled"
                )
                logged = True
                self._log.record(record)
            raise
        finally:
            if handle is not None:
                handle.cancel()


def _prepare(
    engine: Engine, adapters: AdapterService, tenant: str, request: inference_pb2.GenerateRequest
) -> tuple[AdapterRef | None, SamplingParams, list[int], LogprobOptions]:
    """The adapter, checked sampling parameters, prompt token ids and logprob options of a
    request (on a worker thread)."""
    ref = None
    if request.adapter:
        # `name@N` pins version N; a malformed suffix is INVALID_ARGUMENT.
        name, version = split_version(request.adapter, field="adapter")
        # Existence check up front: an unknown (or another tenant's) adapter is NOT_FOUND right
        # away, never a silent fallback to the base model.
        adapters.get(tenant, request.adapter)
        ref = AdapterRef(tenant, name, version)
    sampling = engine.sampling(sampling_overrides(request.sampling))
    logprobs = engine.logprob_options(
        request.logprobs, request.top_logprobs, request.prompt_logprobs
    )
    messages = [(m.role, m.content) for m in request.messages]
    prompt_ids = engine.encode(request.prompt, messages, scoring=request.prompt_logprobs)
    return ref, sampling, prompt_ids, logprobs
