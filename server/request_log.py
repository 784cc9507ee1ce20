"""One record per finished request: the per-tenant request metrics and a JSON access-log line.

The access log never contains prompts or completions unless `access_log_content` is set:
tenants' data stays private by default. Every free-text field is clipped to a bounded length (a
caller cannot grow the log by megabytes per call; content fields get a larger bound), and every
line separator a log reader might split on (U+0085, U+2028, U+2029, besides the control characters
JSON escapes anyway) is written escaped, so one record is always exactly one line.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass
from typing import TextIO

from loraserve.server.engine.types import Usage
from loraserve.server.metrics import Metrics

MAX_FIELD_CHARS = 256
"""Longest logged value of a short free-text field (adapter name, message, ids)."""
MAX_CONTENT_CHARS = 64 * 1024
"""Longest logged prompt or completion (only with access_log_content)."""
_LINE_SEPARATORS = {"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_ESCAPE_SEPARATORS = str.maketrans(_LINE_SEPARATORS)


def clip(value: str | None, limit: int = MAX_FIELD_CHARS) -> str | None:
    """`value` cut to `limit` characters, marked as cut with the original length."""
    if value is None or len(value) <= limit:
        return value
    return f"{value[:limit]}...[{len(value)} chars]"


def one_line(text: str) -> str:
    """JSON text with the Unicode line separators escaped (json.dumps leaves them raw)."""
    return text.translate(_ESCAPE_SEPARATORS)


@dataclass
class RequestRecord:
    """What one request did, filled in as the call proceeds."""

    rpc: str
    tenant: str = "-"
    """"-" until authenticated."""
    adapter: str = ""
    request_id: str = ""
    adapter_version: int = 0
    outcome: str = "ok"
    """ok, cancelled, deadline, or a lowercase gRPC code name (invalid_argument, ...)."""
    message: str = ""
    usage: Usage | None = None
    finish_reason: str = ""
    prompt: str | None = None
    completion: str | None = None
    served_by: str = ""


class RequestLogger:
    """Records finished requests into metrics and the access log."""

    def __init__(
        self, metrics: Metrics, *, stream: TextIO | None = None, include_content: bool = False
    ) -> None:
        self._metrics = metrics
        self._stream = stream
        self._include_content = include_content
        self._lock = threading.Lock()

    @classmethod
    def open(cls, metrics: Metrics, target: str, include_content: bool) -> RequestLogger:
        """`target`: "-" for stderr, "" for no access log, else a file path (appended to)."""
        stream: TextIO | None
        if target == "-":
            stream = sys.stderr
        elif target:
            stream = open(target, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (process-long)
        else:
            stream = None
        return cls(metrics, stream=stream, include_content=include_content)

    def record(self, rec: RequestRecord) -> None:
        m = self._metrics
        m.requests.labels(rec.tenant, rec.outcome).inc()
        usage = rec.usage
        if usage is not None:
            m.request_duration.labels(rec.tenant).observe(usage.total_seconds)
            m.queue_wait.labels(rec.tenant).observe(usage.queue_seconds)
            m.time_to_first_token.labels(rec.tenant).observe(usage.time_to_first_token_seconds)
        if self._stream is None:
            return
        line = {
            "ts": round(time.time(), 6),
            "request_id": clip(rec.request_id),
            "rpc": clip(rec.rpc),
            "tenant": clip(rec.tenant),
            "adapter": clip(rec.adapter),
            "adapter_version": rec.adapter_version,
            "status": clip(rec.outcome),
        }
        if rec.served_by:
            line["served_by"] = rec.served_by
        if rec.message:
            line["message"] = clip(rec.message)
        if usage is not None:
            line.update(
                finish_reason=rec.finish_reason,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                queue_seconds=round(usage.queue_seconds, 6),
                ttft_seconds=round(usage.time_to_first_token_seconds, 6),
                total_seconds=round(usage.total_seconds, 6),
                compute_seconds=round(usage.compute_seconds, 6),
                cost=usage.cost,
            )
        if self._include_content:
            line["prompt"] = clip(rec.prompt, MAX_CONTENT_CHARS)
            line["completion"] = clip(rec.completion, MAX_CONTENT_CHARS)
        text = one_line(json.dumps(line, ensure_ascii=False))
        with self._lock:
            self._stream.write(text + "\n")
            self._stream.flush()
