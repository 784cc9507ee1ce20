"""Protobuf <-> domain conversions, kept apart so the servicers stay one-liners."""

from __future__ import annotations

from pathlib import Path

from loraserve.adapters.store import AdapterRecord
from loraserve.server.engine.engine import AdapterStatus, Residency, SamplingOverrides
from loraserve.server.engine.types import FinishReason, TokenLogprob, Usage
from loraserve.v1 import adapters_pb2, inference_pb2

FINISH_REASONS = {
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.EOS: inference_pb2.FINISH_REASON_EOS,
}

FILE_KINDS = {
    adapters_pb2.ADAPTER_FILE_CONFIG: "config",
    adapters_pb2.ADAPTER_FILE_WEIGHTS: "weights",
}


def sampling_overrides(params: inference_pb2.SamplingParams) -> SamplingOverrides:
    def opt(name: str):
        return getattr(params, name) if params.HasField(name) else None

    return SamplingOverrides(
        max_new_tokens=opt("max_new_tokens"),
        temperature=opt("temperature"),
        top_p=opt("top_p"),
        top_k=opt("top_k"),
        seed=opt("seed"),
        stop=tuple(params.stop),
        ignore_eos=opt("ignore_eos"),
    )


def model_name(model_path: Path) -> str:
    """What a tenant is told about the base model: its checkpoint directory's name, not the
    filesystem path (which tells about the server's disk layout)."""
    return Path(model_path).name


def usage_pb(usage: Usage) -> inference_pb2.Usage:
    return inference_pb2.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        queue_seconds=usage.queue_seconds,
        time_to_first_token_seconds=usage.time_to_first_token_seconds,
        total_seconds=usage.total_seconds,
        compute_seconds=usage.compute_seconds,
        cost=usage.cost,
    )


def token_logprobs_pb(entries: tuple[TokenLogprob, ...]) -> list[inference_pb2.TokenLogprob]:
    """Engine logprob entries as TokenLogprob messages, in order."""
    return [
        inference_pb2.TokenLogprob(
            token_id=e.token_id,
            logprob=e.logprob,
            top=[inference_pb2.TopLogprob(token_id=t.token_id, logprob=t.logprob) for t in e.top],
        )
        for e in entries
    ]


RESIDENCIES = {
    Residency.DEVICE: adapters_pb2.RESIDENCY_DEVICE,
    Residency.HOST: adapters_pb2.RESIDENCY_HOST,
    Residency.DISK: adapters_pb2.RESIDENCY_DISK,
}


def adapter_usage_pb(status: AdapterStatus) -> adapters_pb2.AdapterUsage:
    usage = status.usage
    return adapters_pb2.AdapterUsage(
        requests=usage.requests,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        compute_seconds=usage.compute_seconds,
        cost=usage.cost,
        last_used=usage.last_used,
        resident=RESIDENCIES[status.resident],
    )


def adapter_info(
    record: AdapterRecord, status: AdapterStatus | None = None
) -> adapters_pb2.AdapterInfo:
    """`status` (the engine's view: usage, residency, pin) fills usage and pinned when given."""
    info = adapters_pb2.AdapterInfo(
        name=record.name,
        tenant=record.tenant,
        version=record.version,
        rank=record.rank,
        alpha=record.alpha,
        use_rslora=record.use_rslora,
        target_modules=list(record.target_modules),
        size_bytes=record.size_bytes,
        sha256=record.sha256,
        created_at=record.created_at,
        description=record.description,
        latest=record.latest,
    )
    if status is not None:
        info.usage.CopyFrom(adapter_usage_pb(status))
        info.pinned = status.pinned
    return info
