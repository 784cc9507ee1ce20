"""The image's HEALTHCHECK probe follows the server's --host/--port (and port 0)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraserve.server.background import ServerProcess
from loraserve.server.healthcheck import is_serving, listening_ports, main, serve_address


@pytest.mark.parametrize(
    ("cmdline", "expected"),
    [
        (["loraserve", "serve", "--host", "0.0.0.0", "--data-dir", "/data"], ("127.0.0.1", 50051)),
        (["python", "-m", "loraserve", "serve", "--port", "7000"], ("127.0.0.1", 7000)),
        (["loraserve", "serve", "--host", "0.0.0.0", "--port", "9", "--host", "::"], ("::1", 9)),
        (["loraserve", "serve", "--port=0", "--tenants", "/t.toml"], ("127.0.0.1", 0)),
    ],
)
def test_serve_address_follows_the_flags(cmdline: list[str], expected: tuple[str, int]) -> None:
    assert serve_address([*cmdline, ""]) == expected


def test_probe_of_a_running_server_on_port_zero(model_cache: Path, tmp_path: Path) -> None:
    """A child started with --port 0: the probe finds its port from /proc and sees SERVING."""
    server = ServerProcess(
        ["--model", "embedded", "--no-metrics", "--data-dir", str(tmp_path / "d")],
        tmp_path / "serve.log",
        {"LORASERVE_CACHE": str(model_cache)},
    ).start(120)
    try:
        assert server.port in listening_ports(server.pid)
        assert is_serving(server.target)
        assert main(str(server.pid)) == 0
    finally:
        server.stop()
    assert not is_serving(server.target, timeout=1)  # stopped: the probe fails
