"""asyncio client for every loraserve RPC: AsyncLoraServeClient."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol

from loraserve.client.channel import call_metadata, create_aio_channel
from loraserve.client.config import ClientConfig
from loraserve.client.health import wait_until_serving_async
from loraserve.client.request import Logprobs, Prompt, Sampling, build_generate_request
from loraserve.client.upload import plan_upload, upload_requests_async
from loraserve.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc


class AsyncLoraServeClient:
    """One grpc.aio channel to one server. RPC failures raise grpc.RpcError.

    Create it inside the event loop that uses it; `async with` (or `await close()`) releases it.
    """

    def __init__(self, config: ClientConfig | None = None) -> None:
        self.config = config or ClientConfig()
        self._channel = create_aio_channel(self.config)
        self._metadata = call_metadata(self.config)
        self._inference = inference_pb2_grpc.InferenceStub(self._channel)
        self._adapters = adapters_pb2_grpc.AdaptersStub(self._channel)

    async def __aenter__(self) -> AsyncLoraServeClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        await self._channel.close()

    def _timeout(self, timeout_s: float | None) -> float:
        return self.config.timeout_s if timeout_s is None else timeout_s

    # Inference

    async def generate(
        self,
        prompt: Prompt,
        *,
        adapter: str = "",
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        ignore_eos: bool | None = None,
        timeout_s: float | None = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
        prompt_logprobs: bool = False,
    ) -> inference_pb2.GenerateResponse:
        """Generates a whole completion of `prompt` (a str, or chat messages) with `adapter`.

        Unset sampling fields take the server's defaults; timeout_s overrides config.timeout_s.
        logprobs / top_logprobs / prompt_logprobs fill response.logprobs (one TokenLogprob per
        generated token, with the top_logprobs most likely alternatives) and
        response.prompt_logprobs (every prompt token after the first).
        """
        sampling = Sampling(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            ignore_eos=ignore_eos,
        )
        scoring = Logprobs(logprobs, top_logprobs, prompt_logprobs)
        request = build_generate_request(prompt, adapter, sampling, scoring)
        response: inference_pb2.GenerateResponse = await self._inference.Generate(
            request, timeout=self._timeout(timeout_s), metadata=self._metadata
        )
        return response

    def generate_stream(
        self,
        prompt: Prompt,
        *,
        adapter: str = "",
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        ignore_eos: bool | None = None,
        timeout_s: float | None = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
        prompt_logprobs: bool = False,
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        """Like generate, but an async iterator of per-token messages (`async for`).

        The last message carries finish_reason and usage. The deadline covers the whole
        stream; closing the iterator early (aclose, or leaving `async for`) cancels the call.
        With logprobs, each message's logprobs holds the entries of its own token_ids; the
        first message carries prompt_logprobs.
        """
        sampling = Sampling(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            ignore_eos=ignore_eos,
        )
        scoring = Logprobs(logprobs, top_logprobs, prompt_logprobs)
        request = build_generate_request(prompt, adapter, sampling, scoring)
        # Started here, not on the first __anext__, so the deadline counts from this call.
        call: _AsyncStreamCall = self._inference.GenerateStream(
            request, timeout=self._timeout(timeout_s), metadata=self._metadata
        )
        return _cancel_on_close(call)

    async def server_info(self, *, timeout_s: float | None = None) -> inference_pb2.ServerInfo:
        """The base model, device and limits, and the tenant the server sees for this key."""
        info: inference_pb2.ServerInfo = await self._inference.GetServerInfo(
            inference_pb2.GetServerInfoRequest(),
            timeout=self._timeout(timeout_s),
            metadata=self._metadata,
        )
        return info

    # Adapters

    async def upload_adapter(
        self,
        directory: Path | str,
        name: str,
        *,
        description: str = "",
        tenant: str = "",
        timeout_s: float | None = None,
    ) -> adapters_pb2.AdapterInfo:
        """Uploads a PEFT adapter directory (adapter_config.json + adapter_model.safetensors).

        Raises AdapterDirectoryError, before sending anything, when the directory is not
        uploadable. Hashing and reading run in worker threads, off the event loop.
        """
        plan = await asyncio.to_thread(
            plan_upload, Path(directory), name, description=description, tenant=tenant
        )
        info: adapters_pb2.AdapterInfo = await self._adapters.UploadAdapter(
            upload_requests_async(plan), timeout=self._timeout(timeout_s), metadata=self._metadata
        )
        return info

    async def list_adapters(
        self, *, tenant: str = "", timeout_s: float | None = None
    ) -> list[adapters_pb2.AdapterInfo]:
        """The caller's adapters (or, for an admin key, `tenant`'s), sorted by name."""
        response: adapters_pb2.ListAdaptersResponse = await self._adapters.ListAdapters(
            adapters_pb2.ListAdaptersRequest(tenant=tenant),
            timeout=self._timeout(timeout_s),
            metadata=self._metadata,
        )
        return list(response.adapters)

    async def get_adapter(
        self, name: str, *, tenant: str = "", timeout_s: float | None = None
    ) -> adapters_pb2.AdapterInfo:
        """Describes one adapter: `name` its latest version, `name@N` version N; NOT_FOUND if
        the caller has no such adapter or version."""
        info: adapters_pb2.AdapterInfo = await self._adapters.GetAdapter(
            adapters_pb2.GetAdapterRequest(name=name, tenant=tenant),
            timeout=self._timeout(timeout_s),
            metadata=self._metadata,
        )
        return info

    async def delete_adapter(
        self, name: str, *, tenant: str = "", timeout_s: float | None = None
    ) -> adapters_pb2.AdapterInfo:
        """Deletes an adapter: every version for `name`, version N only for `name@N`; returns
        what was deleted as it was before (for `name`, its latest version)."""
        response: adapters_pb2.DeleteAdapterResponse = await self._adapters.DeleteAdapter(
            adapters_pb2.DeleteAdapterRequest(name=name, tenant=tenant),
            timeout=self._timeout(timeout_s),
            metadata=self._metadata,
        )
        return response.deleted

    async def pin_adapter(
        self, name: str, *, tenant: str, timeout_s: float | None = None
    ) -> adapters_pb2.AdapterInfo:
        """Admin only: loads `tenant`'s adapter onto the device tier and keeps it there.

        `name` follows the name's latest version (a new upload moves the pin); `name@N` pins
        version N only. RESOURCE_EXHAUSTED when it does not fit beside the other pins.
        """
        info: adapters_pb2.AdapterInfo = await self._adapters.PinAdapter(
            adapters_pb2.PinAdapterRequest(name=name, tenant=tenant),
            timeout=self._timeout(timeout_s),
            metadata=self._metadata,
        )
        return info

    async def unpin_adapter(
        self, name: str, *, tenant: str, timeout_s: float | None = None
    ) -> adapters_pb2.AdapterInfo:
        """Admin only: ends a pin; the adapter stays loaded until evicted as usual."""
        info: adapters_pb2.AdapterInfo = await self._adapters.UnpinAdapter(
            adapters_pb2.PinAdapterRequest(name=name, tenant=tenant),
            timeout=self._timeout(timeout_s),
            metadata=self._metadata,
        )
        return info

    async def list_adapter_versions(
        self, name: str, *, tenant: str = "", timeout_s: float | None = None
    ) -> list[adapters_pb2.AdapterInfo]:
        """Every stored version of adapter `name`, oldest first; exactly one has `latest`."""
        response: adapters_pb2.ListAdapterVersionsResponse = (
            await self._adapters.ListAdapterVersions(
                adapters_pb2.ListAdapterVersionsRequest(name=name, tenant=tenant),
                timeout=self._timeout(timeout_s),
                metadata=self._metadata,
            )
        )
        return list(response.versions)

    async def rollback_adapter(
        self, name: str, to_version: int, *, tenant: str = "", timeout_s: float | None = None
    ) -> adapters_pb2.AdapterInfo:
        """Makes stored version `to_version` of `name` the latest (durably); returns it.
        NOT_FOUND if that version is not stored. Requests already running keep their version."""
        info: adapters_pb2.AdapterInfo = await self._adapters.RollbackAdapter(
            adapters_pb2.RollbackAdapterRequest(name=name, to_version=to_version, tenant=tenant),
            timeout=self._timeout(timeout_s),
            metadata=self._metadata,
        )
        return info

    # Health

    async def wait_until_serving(self, timeout_s: float, *, service: str = "") -> None:
        """Waits until the health service reports SERVING; raises TimeoutError after timeout_s."""
        await wait_until_serving_async(
            self._channel, self.config.target, self._metadata, timeout_s, service
        )


class _AsyncStreamCall(Protocol):
    """What a grpc.aio server-streaming call offers here: async iteration and cancellation."""

    def __aiter__(self) -> AsyncIterator[inference_pb2.GenerateStreamResponse]: ...

    def cancel(self) -> bool: ...


async def _cancel_on_close(
    call: _AsyncStreamCall,
) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
    try:
        async for response in call:
            yield response
    finally:
        # Frees the request's batch row on the server at once when the caller stops reading early.
        call.cancel()
