"""The tenants file reloads without a restart (SIGHUP or Server.reload_tenants)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from serving_support import ServerThread, free_port

from loraserve.client.config import ClientConfig
from loraserve.client.sync import LoraServeClient
from loraserve.server.config import ServerConfig
from loraserve.server.tenants import TenantsFileError, hash_key


def _write(path: Path, keys: dict[str, str]) -> None:
    path.write_text(
        "".join(f'[tenants.{t}]\napi_keys = ["{hash_key(k)}"]\n\n' for t, k in keys.items())
    )


def _tenant_of(target: str, key: str) -> str:
    with LoraServeClient(ClientConfig(target=target, api_key=key, timeout_s=10)) as client:
        return client.server_info().tenant


def test_reload_takes_effect_for_new_calls(default_model: Path, tmp_path: Path) -> None:
    tenants = tmp_path / "tenants.toml"
    _write(tenants, {"acme": "old-acme-key"})
    config = ServerConfig(
        model_path=default_model, port=0, metrics_port=0, data_dir=tmp_path / "d",
        tenants_file=tenants, access_log="",
    )  # fmt: skip
    server = ServerThread(config).start()
    try:
        assert _tenant_of(server.target, "old-acme-key") == "acme"
        _write(tenants, {"acme": "new-acme-key", "initech": "initech-key"})
        server.server.reload_tenants()
        assert _tenant_of(server.target, "new-acme-key") == "acme"
        assert _tenant_of(server.target, "initech-key") == "initech"
        with pytest.raises(grpc.RpcError) as err:
            _tenant_of(server.target, "old-acme-key")
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # A broken file is refused and the tenants in force stay.
        tenants.write_text("[tenants.acme]\napi_keys = ['plaintext']\n")
        with pytest.raises(TenantsFileError):
            server.server.reload_tenants()
        assert _tenant_of(server.target, "initech-key") == "initech"
    finally:
        server.stop()


def test_sighup_reloads_a_running_process(model_cache: Path, tmp_path: Path) -> None:
    tenants = tmp_path / "tenants.toml"
    _write(tenants, {"acme": "first-key"})
    port = free_port()
    env = {**os.environ, "LORASERVE_CACHE": str(model_cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "loraserve", "serve", "--port", str(port), "--metrics-port", "0",
         "--data-dir", str(tmp_path / "d"), "--tenants", str(tenants), "--access-log", ""],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    target = f"127.0.0.1:{port}"
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        while "serving on" not in proc.stdout.readline():
            assert time.monotonic() < deadline and proc.poll() is None
        assert _tenant_of(target, "first-key") == "acme"
        _write(tenants, {"acme": "second-key"})
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while True:
            try:
                assert _tenant_of(target, "second-key") == "acme"
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "SIGHUP did not reload the tenants file"
                time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
