"""ServerProcess's argv: the child always binds port 0 (gRPC and metrics) and reports them."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraserve.server.background import SERVING_LINE, ServerProcess


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (["--data-dir", "d"], ["--data-dir", "d", "--metrics-port", "0"]),
        (["--metrics-port", "9400", "--tenants", "t"], ["--metrics-port", "0", "--tenants", "t"]),
        (["--metrics-port=9400"], ["--metrics-port=0"]),
        (["--no-metrics"], ["--no-metrics"]),
    ],
)
def test_metrics_port_is_always_a_free_one(given: list[str], expected: list[str]) -> None:
    assert ServerProcess(given, Path("log")).args == expected


@pytest.mark.parametrize("args", [["--port", "6000"], ["--port=6000"]])
def test_a_fixed_port_is_refused(args: list[str]) -> None:
    with pytest.raises(ValueError, match="free port"):
        ServerProcess(args, Path("log"))


def test_the_serving_line_gives_both_ports() -> None:
    text = "x\nloraserve: serving on 127.0.0.1:4321, metrics on 127.0.0.1:99\n"
    match = SERVING_LINE.search(text)
    assert match and (match["port"], match["metrics"]) == ("4321", "99")
    bare = SERVING_LINE.search("loraserve: serving on ::1:50051\n")
    assert bare and (bare["port"], bare["metrics"]) == ("50051", None)
