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
