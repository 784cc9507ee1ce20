"""Fixtures for integration tests: a real server on a free loopback port, tenants, adapters."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from serving_support import (
    KEYS,
    AdapterShape,
    client_for,
    integration_config,
    make_peft_adapter,
)

from loraserve.client.sync import LoraServeClient
from loraserve.server.background import BackgroundServer
from loraserve.server.tenants import hash_key
from loraserve.testing.tiny_model import default_model_path


@pytest.fixture(scope="session")
def default_model(model_cache: Path) -> Path:
    return default_model_path(model_cache)


@pytest.fixture(scope="session")
def tenants_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tenants") / "tenants.toml"
    path.write_text(
        f'[tenants.acme]\napi_keys = ["{hash_key(KEYS["acme"])}"]\n\n'
        f'[tenants.globex]\napi_keys = ["{hash_key(KEYS["globex"])}"]\n\n'
        f'[tenants.root]\napi_keys = ["{hash_key(KEYS["root"])}"]\nadmin = true\n'
    )
    return path


@pytest.fixture(scope="session")
def adapter_dirs(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEFT adapters for the embedded test model."""
    root = tmp_path_factory.mktemp("peft-adapters")
    shapes = {
        "qv": AdapterShape(rank=8, alpha=16, targets=["q_proj", "v_proj"], seed=11),
        "mlp": AdapterShape(
            rank=4, alpha=8, targets=["gate_proj", "up_proj", "down_proj"], seed=12
        ),
        "wide": AdapterShape(rank=32, alpha=32, targets="all-linear", use_rslora=True, seed=13),
    }
    return {name: make_peft_adapter(default_model, root / name, s) for name, s in shapes.items()}


@pytest.fixture(scope="module")
def server(
    default_model: Path, tenants_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BackgroundServer]:
    config = integration_config(default_model, tenants_file, tmp_path_factory.mktemp("data"))
    thread = BackgroundServer(config).start()
    yield thread
    thread.stop()


@pytest.fixture
def acme(server: BackgroundServer) -> Iterator[LoraServeClient]:
    with client_for(server, "acme") as c:
        yield c


@pytest.fixture
def globex(server: BackgroundServer) -> Iterator[LoraServeClient]:
    with client_for(server, "globex") as c:
        yield c


@pytest.fixture
def admin(server: BackgroundServer) -> Iterator[LoraServeClient]:
    with client_for(server, "root") as c:
        yield c
