"""TLS and mutual TLS wiring: CA file, client certificate and server-name override.

Certificates are minted with the openssl binary per test session; skipped without it.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from client_fakes import FakeServer, start_fake_server

from loraserve.client.config import ClientConfig
from loraserve.client.sync import LoraServeClient

SERVER_NAME = "loraserve.test"
"""The only name in the server certificate; 127.0.0.1 is not in it."""


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _issue(directory: Path, name: str, san: str | None) -> None:
    """Makes name.key and name.pem, signed by ca.pem."""
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip
    extensions = directory / f"{name}.ext"
    extensions.write_text(f"subjectAltName=DNS:{san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "1", "-out", f"{name}.pem", "-extfile", extensions.name,
        cwd=directory,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.fail("openssl missing: install the Debian package openssl (.ci/run does)")
    directory = tmp_path_factory.mktemp("pki")
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=test-ca",
        cwd=directory,
    )  # fmt: skip
    _issue(directory, "server", SERVER_NAME)
    _issue(directory, "client", None)
    return directory


@pytest.fixture
def mtls_server(pki: Path) -> Iterator[FakeServer]:
    credentials = grpc.ssl_server_credentials(
        [((pki / "server.key").read_bytes(), (pki / "server.pem").read_bytes())],
        root_certificates=(pki / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    server = start_fake_server(api_key=None, credentials=credentials)
    yield server
    server.stop()


def test_mutual_tls_with_server_name_override(pki: Path, mtls_server: FakeServer) -> None:
    config = ClientConfig(
        target=mtls_server.target,
        timeout_s=5.0,
        tls_ca=pki / "ca.pem",
        tls_cert=pki / "client.pem",
        tls_key=pki / "client.key",
        tls_server_name=SERVER_NAME,
    )
    with LoraServeClient(config) as client:
        assert client.server_info().model_type == "llama"


def test_tls_without_client_certificate_is_refused(pki: Path, mtls_server: FakeServer) -> None:
    config = ClientConfig(
        target=mtls_server.target,
        timeout_s=5.0,
        tls_ca=pki / "ca.pem",
        tls_server_name=SERVER_NAME,
    )
    with LoraServeClient(config) as client, pytest.raises(grpc.RpcError) as raised:
        client.server_info()
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def test_missing_ca_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.pem"):
        LoraServeClient(ClientConfig(tls_ca=tmp_path / "nope.pem"))
