"""The real `loraserve` processes: serve in development mode, the CLI against it, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from loraserve.server.background import ServerProcess

CLI = [sys.executable, "-m", "loraserve"]


def _env(model_cache: Path) -> dict[str, str]:
    return {**os.environ, "LORASERVE_CACHE": str(model_cache), "HF_HUB_OFFLINE": "1"}


def _wait_for_line(proc: subprocess.Popen[str], needle: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    seen = []
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"never saw {needle!r}; output: {''.join(seen)}")


def _cli(args: list[str], env: dict[str, str], target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args, "--target", target],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_serve_cli_roundtrip_and_sigterm(
    model_cache: Path, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    env = _env(model_cache)
    server = ServerProcess(
        ["--model", "embedded", "--data-dir", str(tmp_path / "data")], tmp_path / "serve.log", env
    )
    try:
        server.start(120)
        target = server.target
        assert server.port > 0 and server.metrics_port > 0  # both bound to port 0, reported
        assert "start-up objects out of the cyclic collector's scans" in server.output()
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            assert b"python_info" in r.read()
        upload = _cli(
            ["adapters", "upload", str(adapter_dirs["qv"]), "--name", "cli-adapter", "--json"],
            env,
            target,
        )
        assert upload.returncode == 0, upload.stderr
        assert json.loads(upload.stdout)["version"] == 1
        gen = _cli(
            [
                "generate",
                "--adapter",
                "cli-adapter",
                "--max-new-tokens",
                "5",
                "--ignore-eos",
                "--json",
                "hello",
            ],
            env,
            target,
        )
        assert gen.returncode == 0, gen.stderr
        result = json.loads(gen.stdout)
        assert len(result["token_ids"]) == 5 and result["finish_reason"] == "length"
        assert result["adapter_version"] == 1 and result["usage"]["completion_tokens"] == 5
        assert result["usage"]["compute_seconds"] > 0 and result["usage"]["cost"] == 0
        stream = _cli(["generate", "--stream", "--max-new-tokens", "3", "hello"], env, target)
        assert stream.returncode == 0, stream.stderr
        listing = _cli(["adapters", "list", "--json"], env, target)
        assert [a["name"] for a in json.loads(listing.stdout)["adapters"]] == ["cli-adapter"]
        missing = _cli(["generate", "--adapter", "nope", "hi"], env, target)
        assert missing.returncode == 1
        assert "error: NOT_FOUND" in missing.stderr and "Traceback" not in missing.stderr
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0, server.output()
    finally:
        server.kill()


def test_dev_mode_refuses_non_loopback_bind(model_cache: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [*CLI, "serve", "--host", "0.0.0.0", "--no-metrics", "--data-dir", str(tmp_path)],
        env=_env(model_cache),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "development mode" in result.stderr and "--tenants" in result.stderr


@pytest.mark.parametrize("problem", ["missing model", "bad tenants file"])
def test_start_failures_are_clear(problem: str, model_cache: Path, tmp_path: Path) -> None:
    args = ["serve", "--port", "0", "--no-metrics", "--data-dir", str(tmp_path)]
    if problem == "missing model":
        args += ["--model", str(tmp_path / "no-such-model")]
        needle = "not a Hugging Face checkpoint directory"
    else:
        bad = tmp_path / "tenants.toml"
        bad.write_text('[tenants.acme]\napi_keys = ["plaintext-key"]\n')
        args += ["--tenants", str(bad), "--model", "embedded"]
        needle = "sha256"
    result = subprocess.run(
        [*CLI, *args], env=_env(model_cache), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert needle in result.stderr and "Traceback" not in result.stderr


def test_no_model_outside_development_mode_is_refused(
    model_cache: Path, tmp_path: Path, tenants_file: Path
) -> None:
    """With --tenants and no --model, the server does not fall back to the random test model."""
    result = subprocess.run(
        [*CLI, "serve", "--tenants", str(tenants_file), "--data-dir", str(tmp_path)],
        env=_env(model_cache),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--model PATH" in result.stderr and "--model embedded" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "adapters").exists()
