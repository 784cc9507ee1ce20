"""RequestLogger: every free-text field bounded, one line per record whatever the text holds."""

from __future__ import annotations

import io
import json

import pytest

from loraserve.server.metrics import Metrics
from loraserve.server.request_log import (
    MAX_CONTENT_CHARS,
    MAX_FIELD_CHARS,
    RequestLogger,
    RequestRecord,
    clip,
)

SEPARATORS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
"""Everything str.splitlines() splits on."""


def _log(include_content: bool = False) -> tuple[RequestLogger, io.StringIO]:
    stream = io.StringIO()
    return RequestLogger(Metrics(), stream=stream, include_content=include_content), stream


def test_clip_marks_what_it_cut() -> None:
    assert clip("short") == "short" and clip(None) is None
    cut = clip("x" * 1000)
    assert (
        cut is not None and cut.startswith("x" * MAX_FIELD_CHARS) and cut.endswith("[1000 chars]")
    )


@pytest.mark.parametrize("include_content", [False, True])
def test_each_record_is_one_bounded_line(include_content: bool) -> None:
    logger, stream = _log(include_content)
    text = ("a" + SEPARATORS) * 100_000
    logger.record(
        RequestRecord(
            rpc="Generate",
            tenant="acme",
            adapter=text,
            message=text,
            prompt=text,
            completion=text,
        )
    )
    written = stream.getvalue()
    assert written.endswith("\n") and len(written.splitlines()) == 1
    limit = 4 * MAX_FIELD_CHARS * 6 + (2 * MAX_CONTENT_CHARS * 6 if include_content else 0)
    assert len(written) < limit + 1024
    record = json.loads(written)
    assert record["adapter"].startswith("a" + SEPARATORS)
    assert ("prompt" in record) == include_content
