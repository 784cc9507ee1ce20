"""Plain-data views of responses (for JSON output) and merging a token stream into one reply."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from loraserve.v1 import adapters_pb2, inference_pb2

JsonObject = dict[str, Any]
"""A JSON-serialisable object."""


def finish_reason_name(reason: inference_pb2.FinishReason) -> str | None:
    """The reason as "length", "stop" or "eos"; None while not finished."""
    if reason == inference_pb2.FINISH_REASON_UNSPECIFIED:
        return None
    return inference_pb2.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()


def usage_to_dict(usage: inference_pb2.Usage) -> JsonObject:
    """Token counts and timings; explicit fields so every key is present even when 0."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "queue_seconds": usage.queue_seconds,
        "time_to_first_token_seconds": usage.time_to_first_token_seconds,
        "total_seconds": usage.total_seconds,
        "compute_seconds": usage.compute_seconds,
        "cost": usage.cost,
    }


@dataclass(frozen=True)
class TopLogprob:
    """One of the most likely tokens at a position."""

    token_id: int
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A token's natural-log probability and the most likely alternatives (most likely first)."""

    token_id: int
    logprob: float
    top: tuple[TopLogprob, ...]

    @property
    def rank1(self) -> bool:
        """The token is the most likely one (needs top_logprobs >= 1 in the request)."""
        return bool(self.top) and self.top[0].token_id == self.token_id


def token_logprobs(entries: Iterable[inference_pb2.TokenLogprob]) -> list[TokenLogprob]:
    """A response's logprobs or prompt_logprobs as plain Python values."""
    return [
        TokenLogprob(
            token_id=e.token_id,
            logprob=e.logprob,
            top=tuple(TopLogprob(t.token_id, t.logprob) for t in e.top),
        )
        for e in entries
    ]


def logprobs_to_list(entries: Iterable[inference_pb2.TokenLogprob]) -> list[JsonObject]:
    """[{"token_id", "logprob", "top": [{"token_id", "logprob"}, ...]}, ...]."""
    return [
        {
            "token_id": e.token_id,
            "logprob": e.logprob,
            "top": [{"token_id": t.token_id, "logprob": t.logprob} for t in e.top],
        }
        for e in entries
    ]


def generate_response_to_dict(response: inference_pb2.GenerateResponse) -> JsonObject:
    """{"text", "token_ids", "finish_reason", "usage", "request_id", "adapter_version"}, plus
    "logprobs" and "prompt_logprobs" when the response carries them."""
    out: JsonObject = {
        "text": response.text,
        "token_ids": list(response.token_ids),
        "finish_reason": finish_reason_name(response.finish_reason),
        "usage": usage_to_dict(response.usage),
        "request_id": response.request_id,
        "adapter_version": response.adapter_version,
    }
    if response.logprobs:
        out["logprobs"] = logprobs_to_list(response.logprobs)
    if response.prompt_logprobs:
        out["prompt_logprobs"] = logprobs_to_list(response.prompt_logprobs)
    return out


def adapter_info_to_dict(info: adapters_pb2.AdapterInfo) -> JsonObject:
    """Every AdapterInfo field, with integers kept integers (proto JSON makes uint64 strings)."""
    return {
        "name": info.name,
        "tenant": info.tenant,
        "version": info.version,
        "rank": info.rank,
        "alpha": info.alpha,
        "use_rslora": info.use_rslora,
        "target_modules": list(info.target_modules),
        "size_bytes": info.size_bytes,
        "sha256": info.sha256,
        "created_at": info.created_at,
        "description": info.description,
        "usage": adapter_usage_to_dict(info.usage),
        "pinned": info.pinned,
        "latest": info.latest,
    }


RESIDENCY_NAMES = {
    adapters_pb2.RESIDENCY_UNSPECIFIED: "unknown",
    adapters_pb2.RESIDENCY_DEVICE: "device",
    adapters_pb2.RESIDENCY_HOST: "host",
    adapters_pb2.RESIDENCY_DISK: "disk",
}


def adapter_usage_to_dict(usage: adapters_pb2.AdapterUsage) -> JsonObject:
    """AdapterUsage (per adapter name, since the server process started), residency by name."""
    return {
        "requests": usage.requests,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "compute_seconds": usage.compute_seconds,
        "cost": usage.cost,
        "last_used": usage.last_used,
        "resident": RESIDENCY_NAMES.get(usage.resident, "unknown"),
    }


def server_info_to_dict(info: inference_pb2.ServerInfo) -> JsonObject:
    """Every ServerInfo field, in proto order."""
    return {
        "model_path": info.model_path,
        "model_type": info.model_type,
        "architecture": info.architecture,
        "device": info.device,
        "dtype": info.dtype,
        "max_lora_rank": info.max_lora_rank,
        "max_new_tokens": info.max_new_tokens,
        "max_prompt_tokens": info.max_prompt_tokens,
        "max_adapter_bytes": info.max_adapter_bytes,
        "target_modules": list(info.target_modules),
        "max_batch_size": info.max_batch_size,
        "version": info.version,
        "tenant": info.tenant,
        "has_chat_template": info.has_chat_template,
        "currency": info.currency,
        "model_name": info.model_name,
    }


class StreamAccumulator:
    """Folds GenerateStreamResponse messages, as they arrive, into one GenerateResponse."""

    def __init__(self) -> None:
        self.response = inference_pb2.GenerateResponse()
        self._text: list[str] = []

    def add(self, chunk: inference_pb2.GenerateStreamResponse) -> None:
        """Appends one message's text and tokens; keeps the last non-empty metadata."""
        self._text.append(chunk.text)
        self.response.token_ids.extend(chunk.token_ids)
        self.response.logprobs.extend(chunk.logprobs)
        self.response.prompt_logprobs.extend(chunk.prompt_logprobs)
        if chunk.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED:
            self.response.finish_reason = chunk.finish_reason
        if chunk.HasField("usage"):
            self.response.usage.CopyFrom(chunk.usage)
        if chunk.request_id:
            self.response.request_id = chunk.request_id
        if chunk.adapter_version:
            self.response.adapter_version = chunk.adapter_version

    def result(self) -> inference_pb2.GenerateResponse:
        """The whole completion so far."""
        self.response.text = "".join(self._text)
        return self.response


def merge_stream(
    chunks: Iterable[inference_pb2.GenerateStreamResponse],
) -> inference_pb2.GenerateResponse:
    """The GenerateResponse equivalent of a whole (blocking) stream."""
    accumulator = StreamAccumulator()
    for chunk in chunks:
        accumulator.add(chunk)
    return accumulator.result()
