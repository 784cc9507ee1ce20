"""Local CLI commands (no server): hash-key, and the wiring of `adapters inspect`."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest

from loraserve.cli import main
from loraserve.server.tenants import TenantRegistry


def test_hash_key_matches_registry(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["hash-key", "s3cret"]) == 0
    line = capsys.readouterr().out.strip()
    assert line == "sha256:" + hashlib.sha256(b"s3cret").hexdigest()
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(f'[tenants.acme]\napi_keys = ["{line}"]\n')
    registry = TenantRegistry.from_file(tenants)
    principal = registry.authenticate("s3cret")
    assert principal is not None and principal.tenant == "acme"
    assert registry.authenticate("s3cret ") is None


def test_hash_key_from_stdin_and_empty(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("from-stdin\n"))
    assert main(["hash-key", "-"]) == 0
    assert capsys.readouterr().out.strip().endswith(hashlib.sha256(b"from-stdin").hexdigest())
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert main(["hash-key", "-"]) == 1
    assert "empty" in capsys.readouterr().err


def test_adapters_inspect_is_wired_to_the_inspect_tool(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["adapters", "inspect", "--help"]) == 0
    assert "effective rank" in capsys.readouterr().out.lower()
    assert main(["adapters", "inspect", "/no/such/adapter"]) == 2
