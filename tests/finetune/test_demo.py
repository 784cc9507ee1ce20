"""`loraserve demo` end to end: each tenant's adapter knows its own facts, nobody else's."""

from __future__ import annotations

import io
from pathlib import Path

from loraserve.finetune.demo import run_demo


def test_demo_end_to_end(model_cache: Path, tmp_path: Path) -> None:
    out = io.StringIO()
    scores = run_demo(tmp_path, out=out)
    text = out.getvalue()
    # Measured, not assumed: each adapter answers most of its own 30 questions exactly.
    assert scores["acme"] >= 0.8 and scores["globex"] >= 0.8, (scores, text)
    assert "acme using globex's adapter: NOT_FOUND" in text
    assert "acme listing globex's adapters: PERMISSION_DENIED" in text
    assert "UNEXPECTED" not in text
    assert "generated tokens" in text and "demo finished" in text
