"""Fixtures for client and CLI tests: a fake server per test and adapter directories."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from client_fakes import API_KEY, FakeServer, MakeAdapterDir, start_fake_server


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    """A fake server requiring API_KEY, stopped after the test."""
    server = start_fake_server(api_key=API_KEY)
    yield server
    server.stop()


@pytest.fixture
def make_adapter_dir(tmp_path: Path) -> MakeAdapterDir:
    """Writes a PEFT-looking adapter directory; weights are random bytes of the given size."""

    def make(
        name: str = "adapter",
        weights_size: int = 1000,
        weights_file: str = "adapter_model.safetensors",
    ) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        config = {"r": 4, "lora_alpha": 8, "target_modules": ["v_proj", "q_proj"]}
        (directory / "adapter_config.json").write_text(json.dumps(config))
        (directory / weights_file).write_bytes(os.urandom(weights_size))
        return directory

    return make
