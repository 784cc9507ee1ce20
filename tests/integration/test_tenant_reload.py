"""The tenants file reloads without a restart (SIGHUP or Server.reload_tenants)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import pytest

from loraserve.client.config import ClientConfig
from loraserve.client.sync import LoraServeClient
from loraserve.server.background import BackgroundServer, ServerProcess
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
        model_path=default_model, port=0, metrics_port=None, data_dir=tmp_path / "d",
        tenants_file=tenants, access_log="",
    )  # fmt: skip
    server = BackgroundServer(config).start()
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


def test_sighup_reloads_a_running_process(
    model_cache: Path, default_model: Path, tmp_path: Path
) -> None:
    tenants = tmp_path / "tenants.toml"
    _write(tenants, {"acme": "first-key"})
    server = ServerProcess(
        ["--model", str(default_model), "--no-metrics", "--data-dir", str(tmp_path / "d"),
         "--tenants", str(tenants), "--access-log", ""],
        tmp_path / "serve.log",
        {"LORASERVE_CACHE": str(model_cache)},
    )  # fmt: skip
    try:
        target = server.start(120).target
        assert _tenant_of(target, "first-key") == "acme"
        _write(tenants, {"acme": "second-key"})
        server.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while True:
            try:
                assert _tenant_of(target, "second-key") == "acme"
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "SIGHUP did not reload the tenants file"
                time.sleep(0.1)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0, server.output()
    finally:
        server.kill()
