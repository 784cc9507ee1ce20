"""The Dockerfile's HEALTHCHECK, run for real against the fake server's health service.

Docker itself is not needed for this part (scripts/docker_smoke.sh builds and runs the image):
the probe is plain python, so it is run here against a stand-in "PID 1" whose command line is
`... serve --port N`, as in the container.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from client_fakes import FakeServer

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def healthcheck_argv() -> list[str]:
    text = DOCKERFILE.read_text()
    match = re.search(r"^HEALTHCHECK .*?CMD (\[.*?\])$", text, re.MULTILINE | re.DOTALL)
    assert match, "Dockerfile has no exec-form HEALTHCHECK"
    argv: list[str] = json.loads(match.group(1))
    assert argv[0] == "python"
    return [sys.executable, *argv[1:]]


def run_probe(server: FakeServer) -> int:
    """The HEALTHCHECK command, pointed at a stand-in server process started with --port N."""
    port = server.target.rsplit(":", 1)[1]
    stand_in = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "serve", "--port", port]
    )
    try:
        argv = [*healthcheck_argv(), str(stand_in.pid)]  # the image probes PID 1
        return subprocess.run(argv, capture_output=True, timeout=30).returncode
    finally:
        stand_in.kill()
        stand_in.wait()


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


def test_image_copies_every_package_folder() -> None:
    """`pip install .` in the image needs every folder pyproject maps into the package."""
    text = DOCKERFILE.read_text()
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    allowed = (ROOT / ".dockerignore").read_text().splitlines()
    for folder in mapping.values():
        assert re.search(rf"^COPY {folder} \./{folder}$", text, re.MULTILINE), folder
        assert f"!{folder}/" in allowed, f".dockerignore leaves {folder}/ out of the context"
    assert re.search(r"^RUN pip install \. ", text, re.MULTILINE)  # not editable
