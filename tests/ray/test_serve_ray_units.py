"""serve-ray's pieces that need no cluster: flags, config checks, routing ids, paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraserve.cli import main
from loraserve.server.config import ConfigError, ServerConfig
from loraserve.server.ray.ingress import adapter_route
from loraserve.server.ray.launch import RayServeConfig, absolute_paths
from loraserve.server.ray.replica import replica_config


def test_help_lists_the_cluster_and_the_serve_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve-ray", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--replicas", "--address", "--tls-cert", "--tenants", "--data-dir", "--device"):
        assert flag in out


def test_bad_replica_count_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve-ray", "--replicas", "0"]) == 2
    assert "replicas: must be at least 1" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        RayServeConfig(replica_cpus=-1).validate()


def test_multiplexed_id_is_the_tenant_qualified_adapter() -> None:
    assert adapter_route("acme", "support-bot") == "acme/support-bot"
    assert adapter_route("globex", "support-bot") == "globex/support-bot"
    assert adapter_route("acme", "") == ""  # the base model: least loaded replica


def test_replicas_get_absolute_paths_and_a_private_loopback_server(tmp_path: Path) -> None:
    config = absolute_paths(ServerConfig(data_dir=Path("rel-data"), port=50051))
    assert config.data_dir.is_absolute() and config.data_dir.name == "rel-data"
    replica = replica_config(config, "abc123")
    assert (replica.host, replica.port, replica.metrics_port) == ("127.0.0.1", 0, 0)
    assert replica.replica_id == "abc123" and replica.shared_store
    assert replica.tls_cert is None and replica.data_dir == config.data_dir


def test_the_ingress_refuses_pins_clearly_rather_than_pinning_one_replica() -> None:
    """A pin must hold on every replica, and a forwarded call reaches one: refused, with the
    way that works (--preload, which every replica applies) in the message."""
    import asyncio

    import grpc

    from loraserve.client.aio import AsyncLoraServeClient
    from loraserve.client.config import ClientConfig
    from loraserve.server.ray.ingress import Ingress

    async def scenario() -> list[tuple[grpc.StatusCode, str]]:
        ingress = Ingress(ServerConfig(port=0), handle=None)  # no replica is ever called
        port = await ingress.start()
        seen = []
        try:
            async with AsyncLoraServeClient(ClientConfig(target=f"127.0.0.1:{port}")) as client:
                for call in (client.pin_adapter, client.unpin_adapter):
                    try:
                        await call("a", tenant="dev")
                    except grpc.aio.AioRpcError as exc:
                        seen.append((exc.code(), exc.details() or ""))
        finally:
            await ingress.stop(0)
        return seen

    seen = asyncio.run(scenario())
    assert len(seen) == 2
    for code, details in seen:
        assert code == grpc.StatusCode.UNIMPLEMENTED
        assert "not supported under serve-ray" in details and "--preload" in details


def test_preload_passes_through_to_the_replicas_config() -> None:
    from loraserve.server.ray.main import parse_configs

    config, _ = parse_configs(
        ["--model", "/models/m", "--preload", "acme/a", "--preload", "acme/b@2"]
    )
    assert config.preload == ("acme/a", "acme/b@2")
    assert replica_config(config, "r1").preload == config.preload
