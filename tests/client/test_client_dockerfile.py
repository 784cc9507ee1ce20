"""The Dockerfile's HEALTHCHECK one-liner, run for real against the fake server's health service.

Docker itself is not needed: the probe is plain python, so it is extracted and executed here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from client_fakes import FakeServer

DOCKERFILE = Path(__file__).resolve().parents[2] / "Dockerfile"


def healthcheck_argv(port: str) -> list[str]:
    text = DOCKERFILE.read_text()
    match = re.search(r"^HEALTHCHECK .*?CMD (\[.*?\])$", text, re.MULTILINE | re.DOTALL)
    assert match, "Dockerfile has no exec-form HEALTHCHECK"
    argv: list[str] = json.loads(match.group(1))
    assert argv[:2] == ["python", "-c"]
    assert "127.0.0.1:50051" in argv[2]
    return [sys.executable, "-c", argv[2].replace("127.0.0.1:50051", f"127.0.0.1:{port}")]


def run_probe(server: FakeServer) -> int:
    port = server.target.rsplit(":", 1)[1]
    return subprocess.run(healthcheck_argv(port), capture_output=True, timeout=30).returncode


def test_healthcheck_passes_when_serving_and_fails_otherwise(fake_server: FakeServer) -> None:
    assert run_probe(fake_server) == 0
    fake_server.set_serving(False)
    assert run_probe(fake_server) != 0


def test_dockerfile_essentials() -> None:
    text = DOCKERFILE.read_text()
    assert 'VOLUME ["/models", "/data"]' in text
    assert "EXPOSE 50051 9400" in text
    assert re.search(r"^USER (?!root)\w+", text, re.MULTILINE)
    assert 'ENTRYPOINT ["loraserve", "serve", "--host", "0.0.0.0", "--data-dir", "/data"]' in text
    assert re.search(r"^CMD \[.*--tenants", text, re.MULTILINE)
