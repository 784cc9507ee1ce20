"""Bearer-key parsing and the Authorizer's UNAUTHENTICATED / PERMISSION_DENIED decisions."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest

from loraserve.server.api.auth import Authorizer, bearer_key
from loraserve.server.tenants import Principal, TenantRegistry, hash_key

KEYS = {"acme": "acme-key", "root": "root-key"}


class Aborted(Exception):
    """Raised by FakeContext.abort, like grpc.aio's AbortError."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


class FakeContext:
    """The two ServicerContext methods the authorizer uses."""

    def __init__(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> None:
        self._metadata = metadata
        self.aborts: list[tuple[grpc.StatusCode, str]] = []

    def invocation_metadata(self) -> Sequence[tuple[str, str | bytes]] | None:
        return self._metadata

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self.aborts.append((code, details))
        raise Aborted(code, details)


def _ctx(authorization: str | None, *extra: tuple[str, str]) -> FakeContext:
    metadata: list[tuple[str, str | bytes]] = [("user-agent", "grpc-python"), *extra]
    if authorization is not None:
        metadata.append(("authorization", authorization))
    return FakeContext(metadata)


@pytest.fixture
def authorizer(tmp_path: Path) -> Authorizer:
    path = tmp_path / "tenants.toml"
    path.write_text(
        f'[tenants.acme]\napi_keys = ["{hash_key(KEYS["acme"])}"]\n\n'
        f'[tenants.root]\napi_keys = ["{hash_key(KEYS["root"])}"]\nadmin = true\n'
    )
    return Authorizer(TenantRegistry.from_file(path))


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Bearer k", "k"),
        ("bearer k", "k"),
        ("BEARER k", "k"),
        ("Bearer    k   ", "k"),
        ("Bearer abc.def-ghi_123", "abc.def-ghi_123"),
        ("Basic x", None),
        ("Token k", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Bearer    ", None),
        ("k", None),
        ("", None),
    ],
)
def test_bearer_key_parsing(header: str, expected: str | None) -> None:
    assert bearer_key(_ctx(header)) == expected  # type: ignore[arg-type]


def test_bearer_key_missing_header_or_metadata() -> None:
    assert bearer_key(_ctx(None)) is None  # type: ignore[arg-type]
    assert bearer_key(FakeContext([])) is None  # type: ignore[arg-type]
    assert bearer_key(FakeContext(None)) is None  # type: ignore[arg-type]


def test_bearer_key_ignores_other_headers_and_binary_values() -> None:
    ctx = FakeContext([("x-authorization", "Bearer nope"), ("authorization", "Bearer yes")])
    assert bearer_key(ctx) == "yes"  # type: ignore[arg-type]
    assert bearer_key(FakeContext([("authorization", b"Bearer k")])) is None  # type: ignore[arg-type]


def test_principal_for_a_known_key(authorizer: Authorizer) -> None:
    ctx = _ctx(f"Bearer {KEYS['acme']}")
    assert asyncio.run(authorizer.principal(ctx)) == Principal("acme", admin=False)  # type: ignore[arg-type]
    assert ctx.aborts == []


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic acme-key", "Bearer "])
def test_principal_aborts_unauthenticated(authorizer: Authorizer, header: str | None) -> None:
    ctx = _ctx(header)
    with pytest.raises(Aborted) as err:
        asyncio.run(authorizer.principal(ctx))  # type: ignore[arg-type]
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer" in err.value.details
    assert ctx.aborts == [(grpc.StatusCode.UNAUTHENTICATED, err.value.details)]


def test_development_mode_needs_no_key() -> None:
    auth = Authorizer(TenantRegistry.development())
    assert asyncio.run(auth.principal(_ctx(None))) == Principal("dev", admin=True)  # type: ignore[arg-type]
    assert asyncio.run(auth.acting_tenant(_ctx(None), "")) == "dev"  # type: ignore[arg-type]


def _acting(authorizer: Authorizer, tenant: str, requested: str) -> str:
    ctx = _ctx(f"Bearer {KEYS[tenant]}")
    return asyncio.run(authorizer.acting_tenant(ctx, requested))  # type: ignore[arg-type]


@pytest.mark.parametrize("requested", ["", "acme"])
def test_acting_tenant_is_the_callers_own(authorizer: Authorizer, requested: str) -> None:
    assert _acting(authorizer, "acme", requested) == "acme"


def test_admin_acts_for_itself_by_default(authorizer: Authorizer) -> None:
    assert _acting(authorizer, "root", "") == "root"


@pytest.mark.parametrize("other", ["acme", "globex", "not-in-file"])
def test_admin_may_act_for_another_tenant(authorizer: Authorizer, other: str) -> None:
    assert _acting(authorizer, "root", other) == other


@pytest.mark.parametrize("other", ["root", "globex", "../x"])
def test_non_admin_acting_for_another_is_permission_denied(
    authorizer: Authorizer, other: str
) -> None:
    with pytest.raises(Aborted) as err:
        _acting(authorizer, "acme", other)
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "admin" in err.value.details


@pytest.mark.parametrize("bad", ["../x", "a/b", ".hidden", "x" * 65, "naïve"])
def test_admin_with_invalid_tenant_name_is_invalid_argument(
    authorizer: Authorizer, bad: str
) -> None:
    with pytest.raises(Aborted) as err:
        _acting(authorizer, "root", bad)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details.startswith("tenant: ")


def test_acting_tenant_without_a_key_is_unauthenticated(authorizer: Authorizer) -> None:
    ctx = _ctx(None)
    with pytest.raises(Aborted) as err:
        asyncio.run(authorizer.acting_tenant(ctx, "acme"))  # type: ignore[arg-type]
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert len(ctx.aborts) == 1
