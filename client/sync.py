"""Blocking client for every loraserve RPC: LoraServeClient."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol

from loraserve.client.channel import call_metadata, create_channel
from loraserve.client.config import ClientConfig
from loraserve.client.health import wait_until_serving_sync
from loraserve.client.request import Logprobs, Prompt, Sampling, build_generate_request
from loraserve.client.upload import plan_upload, upload_requests
from loraserve.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc


class LoraServeClient:
    """One channel to one server. RPC failures raise grpc.RpcError (read .code(), .details()).

    Use as a context manager, or call close(), to release the channel.
    """

    def __init__(self, config: ClientConfig | None = None) -> None:
        self.config = config or ClientConfig()
        self._channel = create_channel(self.config)
        self._metadata = call_metadata(self.config)
        self._inference = inference_pb2_grpc.InferenceStub(self._channel)
        self._adapters = adapters_pb2_grpc.AdaptersStub(self._channel)

    def __enter__(self) -> LoraServeClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def _timeout(self, timeout_s: float | None) -> float:
        return self.config.timeout_s if timeout_s is None else timeout_s

    # Inference

    def generate(
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
        response: inference_pb2.GenerateResponse = self._inference.Generate(
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
    ) -> Iterator[inference_pb2.GenerateStreamResponse]:
        """Like generate, but yields a message per token; the last carries finish_reason, usage.

        The deadline covers the whole stream. Closing the iterator early cancels the call.
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
        # Started here, not on the first next(), so the deadline counts from this call.
        call: _StreamCall = self._inference.GenerateStream(
            request, timeout=self._timeout(timeout_s), metadata=self._metadata
        )
        return _cancel_on_close(call)

    def server_info(self, *, timeout_s: float | None = None) -> inference_pb2.ServerInfo:
        """The base model, device and limits, and the tenant the server sees for this key."""
        info: inference_pb2.ServerInfo = self._inference.GetServerInfo(
            inference_pb2.GetServerInfoRequest(),
            timeout=self._timeout(timeout_s),
            metadata=self._metadata,
        )
        return info

    # Adapters

    def upload_adapter(
        self,
        directory: Path | str,
        name: str,
        *,
        description: str = "",
        tenant: str = "",
        timeout_s: float | None = None,
    ) -> adapters_pb2.AdapterInfo:
        """Uploads a PEFT adapter directory (adapter_config.json + adapter_model.safetensors).

        Raises AdapterDirectoryError, before connecting, when the directory is not uploadable.
        """
        plan = plan_upload(Path(directory), name, description=description, tenant=tenant)
        info: adapters_pb2.AdapterInfo = self._adapters.UploadAdapter(
            upload_requests(plan), timeout=self._timeout(timeout_s), metadata=self._metadata
        )
        return info

    def list_adapters(
        self, *, tenant: str = "", timeout_s: float | None = None
    ) -> list[adapters_pb2.AdapterInfo]:
        """The caller's adapters (or, for an admin key, `tenant`'s), sorted by name."""
        response: adapters_pb2.ListAdaptersResponse = self._adapters.ListAdapters(
            adapters_pb2.ListAdaptersRequest(tenant=tenant),
            timeout=self._timeout(timeout_s),
            metadata=self._metadata,
        )
        return list(response.adapters)

    def get_adapter(
        self, name: str, *, tenant: str = "", timeout_s: float | None = None
    ) -> adapters_pb2.AdapterInfo:
        """Describes one adapter: `name` its latest version, `name@N` version N; NOT_FOUND if
        the caller has no such adapter or version."""
        info: adapters_pb2.AdapterInfo = self._adapters.GetAdapter(
            adapters_pb2.GetAdapterRequest(name=name, tenant=tenant),
            timeout=self._timeout(timeout_s),
            metadata=self._metadata,
        )
        return info

    def delete_adapter(
        self, name: str, *, tenant: str = "", timeout_s: float | None = None
    ) -> adapters_pb2.AdapterInfo:
        """Deletes an adapter: every version for `name`, version N only for `name@N`; returns
        what was deleted as it was before (for `name`, its latest version)."""
        response: adapters_pb2.DeleteAdapterResponse = self._adapters.DeleteAdapter(
            adapters_pb2.DeleteAdapterRequest(name=name, tenant=tenant),
            timeout=self._timeout(timeout_s),
            metadata=self._metadata,
        )
        return response.deleted

    def pin_adapter(
        self, name: str, *, tenant: str, timeout_s: float | None = None
    ) -> adapters_pb2.AdapterInfo:
        """Admin only: loads `tenant`'s adapter onto the device tier and keeps it there.

        `name` follows the name's latest version (a new upload moves the pin); `name@N` pins
        version N only. RESOURCE_EXHAUSTED when it does not fit beside the other pins.
        """
        info: adapters_pb2.AdapterInfo = self._adapters.PinAdapter(
            adapters_pb2.PinAdapterRequest(name=name, tenant=tenant),
            timeout=self._timeout(timeout_s),
            metadata=self._metadata,
        )
        return info

    def unpin_adapter(
        self, name: str, *, tenant: str, timeout_s: float | None = None
    ) -> adapters_pb2.AdapterInfo:
        """Admin only: ends a pin; the adapter stays loaded until evicted as usual."""
        info: adapters_pb2.AdapterInfo = self._adapters.UnpinAdapter(
            adapters_pb2.PinAdapterRequest(name=name, tenant=tenant),
            timeout=self._timeout(timeout_s),
            metadata=self._metadata,
        )
        return info

    def list_adapter_versions(
        self, name: str, *, tenant: str = "", timeout_s: float | None = None
    ) -> list[adapters_pb2.AdapterInfo]:
        """Every stored version of adapter `name`, oldest first; exactly one has `latest`."""
        response: adapters_pb2.ListAdapterVersionsResponse = self._adapters.ListAdapterVersions(
            adapters_pb2.ListAdapterVersionsRequest(name=name, tenant=tenant),
            timeout=self._timeout(timeout_s),
            metadata=self._metadata,
        )
        return list(response.versions)

    def rollback_adapter(
        self, name: str, to_version: int, *, tenant: str = "", timeout_s: float | None = None
    ) -> adapters_pb2.AdapterInfo:
        """Makes stored version `to_version` of `name` the latest (durably); returns it.
        NOT_FOUND if that version is not stored. Requests already running keep their version."""
        info: adapters_pb2.AdapterInfo = self._adapters.RollbackAdapter(
            adapters_pb2.RollbackAdapterRequest(name=name, to_version=to_version, tenant=tenant),
            timeout=self._timeout(timeout_s),
            metadata=self._metadata,
        )
        return info

    # Health

    def wait_until_serving(self, timeout_s: float, *, service: str = "") -> None:
        """Blocks until the health service reports SERVING; raises TimeoutError after timeout_s."""
        wait_until_serving_sync(
            self._channel, self.config.target, self._metadata, timeout_s, service
        )


class _StreamCall(Protocol):
    """What a server-streaming call object offers here: iteration and cancellation."""

    def __iter__(self) -> Iterator[inference_pb2.GenerateStreamResponse]: ...

    def cancel(self) -> bool: ...


def _cancel_on_close(call: _StreamCall) -> Iterator[inference_pb2.GenerateStreamResponse]:
    try:
        yield from call
    finally:
        # Frees the request's batch row on the server at once when the caller stops reading early.
        call.cancel()
