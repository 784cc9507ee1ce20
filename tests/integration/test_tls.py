"""TLS and mutual TLS on the gRPC port, with throwaway certificates made at test time."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from serving_support import make_pki

from loraserve.client.config import ClientConfig
from loraserve.client.sync import LoraServeClient
from loraserve.server.background import BackgroundServer
from loraserve.server.config import ConfigError, ServerConfig


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _server(default_model: Path, data: Path, pki: Path, *, mutual: bool) -> BackgroundServer:
    config = ServerConfig(
        model_path=default_model,
        port=0,
        metrics_port=None,
        data_dir=data,
        access_log="",
        tls_cert=pki / "server.pem",
        tls_key=pki / "server.key",
        tls_client_ca=(pki / "ca.pem") if mutual else None,
    )
    return BackgroundServer(config).start()


@pytest.fixture(scope="module")
def tls_server(
    default_model: Path, pki: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BackgroundServer]:
    server = _server(default_model, tmp_path_factory.mktemp("tls"), pki, mutual=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls_server(
    default_model: Path, pki: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BackgroundServer]:
    server = _server(default_model, tmp_path_factory.mktemp("mtls"), pki, mutual=True)
    yield server
    server.stop()


def _client(server: BackgroundServer, **tls: object) -> LoraServeClient:
    return LoraServeClient(ClientConfig(target=server.target, timeout_s=10, **tls))  # type: ignore[arg-type]


def test_tls_client_with_the_ca_is_served(tls_server: BackgroundServer, pki: Path) -> None:
    with _client(tls_server, tls_ca=pki / "ca.pem") as client:
        assert len(client.generate("over tls", max_new_tokens=3, ignore_eos=True).token_ids) == 3


def test_plaintext_client_is_refused_by_a_tls_server(tls_server: BackgroundServer) -> None:
    with _client(tls_server) as client, pytest.raises(grpc.RpcError) as err:
        client.server_info(timeout_s=3)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_client_that_does_not_trust_the_server_is_refused(
    tls_server: BackgroundServer, pki: Path
) -> None:
    with (
        _client(tls_server, tls_ca=pki / "other-ca.pem") as client,
        pytest.raises(grpc.RpcError) as err,
    ):
        client.server_info(timeout_s=3)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_mutual_tls_accepts_a_certificate_from_the_client_ca(
    mtls_server: BackgroundServer, pki: Path
) -> None:
    with _client(
        mtls_server, tls_ca=pki / "ca.pem", tls_cert=pki / "client.pem", tls_key=pki / "client.key"
    ) as client:
        assert client.server_info().tenant == "dev"


@pytest.mark.parametrize("who", ["no certificate", "certificate from another CA"])
def test_mutual_tls_refuses_other_clients(
    mtls_server: BackgroundServer, pki: Path, who: str
) -> None:
    tls: dict[str, object] = {"tls_ca": pki / "ca.pem"}
    if who != "no certificate":
        tls.update(tls_cert=pki / "stranger.pem", tls_key=pki / "stranger.key")
    with _client(mtls_server, **tls) as client, pytest.raises(grpc.RpcError) as err:
        client.server_info(timeout_s=3)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    # The server keeps serving proper clients.
    with _client(
        mtls_server, tls_ca=pki / "ca.pem", tls_cert=pki / "client.pem", tls_key=pki / "client.key"
    ) as client:
        assert client.server_info().tenant == "dev"


def test_tls_settings_are_validated(pki: Path, tmp_path: Path) -> None:
    base = ServerConfig(tls_cert=pki / "server.pem", tls_key=pki / "server.key")
    base.validate()
    for changes, field in (
        ({"tls_key": None}, "tls_cert/tls_key"),
        ({"tls_cert": None, "tls_key": None, "tls_client_ca": pki / "ca.pem"}, "tls_client_ca"),
        ({"tls_cert": tmp_path / "missing.pem"}, "tls_cert"),
    ):
        with pytest.raises(ConfigError) as err:
            dataclasses.replace(base, **changes).validate()  # type: ignore[arg-type]
        assert field in str(err.value)
