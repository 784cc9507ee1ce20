"""Tenants file parsing, API key hashing and authentication (server.tenants)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from loraserve.server.tenants import (
    DEV_TENANT,
    Principal,
    TenantRegistry,
    TenantsFileError,
    hash_key,
)

ACME_KEY = "acme-very-secret-key-123"
ROOT_KEY = "root-admin-key-456"
GLOBEX_KEYS = ("globex-key-one", "globex-key-two")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tenants.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _valid_file(tmp_path: Path) -> Path:
    return _write(
        tmp_path,
        f'[tenants.acme]\napi_keys = ["{hash_key(ACME_KEY)}"]\n\n'
        f'[tenants.globex]\napi_keys = ["{hash_key(GLOBEX_KEYS[0])}", '
        f'"{hash_key(GLOBEX_KEYS[1])}"]\nadmin = false\n\n'
        f'[tenants.root]\napi_keys = ["{hash_key(ROOT_KEY)}"]\nadmin = true\n',
    )


def _one_tenant(entry: str, name: str = "acme") -> str:
    return f"[tenants.{name}]\n{entry}\n"


def test_hash_key_format() -> None:
    digest = hash_key("hello")
    assert digest == "sha256:" + hashlib.sha256(b"hello").hexdigest()
    prefix, _, hex_part = digest.partition(":")
    assert prefix == "sha256" and len(hex_part) == 64
    assert hex_part == hex_part.lower() and int(hex_part, 16) >= 0
    assert hash_key("hello") == digest and hash_key("hello!") != digest
    # Non-ASCII keys hash their UTF-8 bytes.
    assert hash_key("clé") == "sha256:" + hashlib.sha256("clé".encode()).hexdigest()


def test_valid_file_with_admin_flag(tmp_path: Path) -> None:
    registry = TenantRegistry.from_file(_valid_file(tmp_path))
    assert not registry.dev_mode
    assert registry.tenants == ["acme", "globex", "root"]
    assert registry.authenticate(ACME_KEY) == Principal("acme", admin=False)
    assert registry.authenticate(ROOT_KEY) == Principal("root", admin=True)
    for key in GLOBEX_KEYS:
        assert registry.authenticate(key) == Principal("globex", admin=False)


@pytest.mark.parametrize("key", ["wrong-key", ACME_KEY + "x", ACME_KEY.upper(), "", None])
def test_unknown_empty_or_missing_key_is_none(tmp_path: Path, key: str | None) -> None:
    registry = TenantRegistry.from_file(_valid_file(tmp_path))
    assert registry.authenticate(key) is None


def test_the_stored_hash_itself_is_not_a_key(tmp_path: Path) -> None:
    registry = TenantRegistry.from_file(_valid_file(tmp_path))
    assert registry.authenticate(hash_key(ACME_KEY)) is None
    assert registry.authenticate(hash_key(ACME_KEY).removeprefix("sha256:")) is None


@pytest.mark.parametrize("key", [None, "", "anything"])
def test_development_mode_is_the_dev_admin(key: str | None) -> None:
    registry = TenantRegistry.development()
    assert registry.dev_mode
    assert registry.tenants == [DEV_TENANT]
    assert registry.authenticate(key) == Principal("dev", admin=True)


def test_uppercase_hex_in_the_file_is_accepted(tmp_path: Path) -> None:
    upper = "sha256:" + hash_key(ACME_KEY).removeprefix("sha256:").upper()
    registry = TenantRegistry.from_file(_write(tmp_path, _one_tenant(f'api_keys = ["{upper}"]')))
    assert registry.authenticate(ACME_KEY) == Principal("acme", admin=False)


def _all_values(obj: object, depth: int = 0) -> list[object]:
    """Every object reachable from `obj` through attributes and containers (a few levels deep)."""
    if depth > 6:
        return []
    found: list[object] = [obj]
    if isinstance(obj, dict):
        children = [*obj.keys(), *obj.values()]
    elif isinstance(obj, list | tuple | set | frozenset):
        children = list(obj)
    elif hasattr(obj, "__dict__"):
        children = list(vars(obj).values())
    elif hasattr(obj, "__slots__"):
        children = [getattr(obj, s) for s in obj.__slots__ if hasattr(obj, s)]
    else:
        children = []
    for child in children:
        found.extend(_all_values(child, depth + 1))
    return found


def test_keys_are_never_stored_in_plaintext(tmp_path: Path) -> None:
    registry = TenantRegistry.from_file(_valid_file(tmp_path))
    values = _all_values(registry)
    assert len(values) > 5, "the walk found nothing to inspect"
    for key in (ACME_KEY, ROOT_KEY, *GLOBEX_KEYS):
        for value in values:
            if isinstance(value, str):
                assert key not in value
            elif isinstance(value, bytes | bytearray):
                assert key.encode() not in value
    # What is held is the digest: the raw 32 sha256 bytes of each key.
    digests = {v for v in values if isinstance(v, bytes)}
    assert hashlib.sha256(ACME_KEY.encode()).digest() in digests


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(TenantsFileError) as err:
        TenantRegistry.from_file(path)
    assert str(path) in str(err.value)
    assert "No such file" in str(err.value)


@pytest.mark.parametrize("text", ["[tenants.acme\napi_keys = [", "= nope", "a = 'x' 'y'"])
def test_not_toml(tmp_path: Path, text: str) -> None:
    with pytest.raises(TenantsFileError, match="not valid TOML"):
        TenantRegistry.from_file(_write(tmp_path, text))


def test_not_utf8_is_reported_as_not_toml(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    path.write_bytes(b"\xff\xfe[tenants]\n")
    with pytest.raises(TenantsFileError, match="not valid TOML"):
        TenantRegistry.from_file(path)


@pytest.mark.parametrize("text", ["", "# nothing\n", "[tenants]\n", "tenants = 5\n", "[other]\n"])
def test_no_tenants(tmp_path: Path, text: str) -> None:
    with pytest.raises(TenantsFileError, match=r"at least one \[tenants.NAME\] table"):
        TenantRegistry.from_file(_write(tmp_path, text))


@pytest.mark.parametrize("name", ['"../x"', '"a/b"', '".hidden"', '"naïve"', '"x y"', '""'])
def test_bad_tenant_name(tmp_path: Path, name: str) -> None:
    text = _one_tenant(f'api_keys = ["{hash_key("k")}"]', name=name)
    with pytest.raises(TenantsFileError) as err:
        TenantRegistry.from_file(_write(tmp_path, text))
    assert "bad tenant name" in str(err.value)


def test_tenant_entry_must_be_a_table(tmp_path: Path) -> None:
    with pytest.raises(TenantsFileError, match=r"\[tenants.acme\]: must be a table"):
        TenantRegistry.from_file(_write(tmp_path, "[tenants]\nacme = 3\n"))


@pytest.mark.parametrize(
    "entry",
    [
        "admin = true",  # api_keys missing
        "api_keys = []",
        f'api_keys = "{hash_key("k")}"',  # a string, not a list
        "api_keys = 7",
        "[tenants.acme.api_keys]",  # a table, not a list
    ],
)
def test_api_keys_missing_empty_or_not_a_list(tmp_path: Path, entry: str) -> None:
    with pytest.raises(TenantsFileError) as err:
        TenantRegistry.from_file(_write(tmp_path, _one_tenant(entry)))
    assert "[tenants.acme]: api_keys must be a non-empty list" in str(err.value)


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ('"plaintext-key"', "sha256:<64 hex digits>"),  # plaintext key
        ('"sha1:' + "0" * 40 + '"', "sha256:<64 hex digits>"),
        ('"SHA256:' + "0" * 64 + '"', "sha256:<64 hex digits>"),
        ("42", "sha256:<64 hex digits>"),  # not a string at all
        ('"sha256:' + "ab" * 31 + '"', "64 hex digits"),  # short hex
        ('"sha256:' + "ab" * 33 + '"', "64 hex digits"),  # long hex
        ('"sha256:"', "64 hex digits"),
        ('"sha256:' + "zz" * 32 + '"', "not hex"),  # non-hex
        ('"sha256:' + "ab" * 31 + 'g0"', "not hex"),
    ],
)
def test_malformed_key_hash(tmp_path: Path, value: str, needle: str) -> None:
    with pytest.raises(TenantsFileError) as err:
        TenantRegistry.from_file(_write(tmp_path, _one_tenant(f"api_keys = [{value}]")))
    message = str(err.value)
    assert "[tenants.acme]" in message and needle in message, message
    # A key in the wrong form is never echoed back (it may be a real plaintext secret).
    assert "plaintext-key" not in message


def test_hash_with_embedded_whitespace_is_not_hex(tmp_path: Path) -> None:
    # 64 characters, but bytes.fromhex() skips whitespace between digit pairs: without a
    # stricter check this would load as a 24-byte "digest" that can never match any key.
    spaced = "ab " * 16 + "cd" * 8
    assert len(spaced) == 64
    with pytest.raises(TenantsFileError, match="not hex"):
        TenantRegistry.from_file(_write(tmp_path, _one_tenant(f'api_keys = ["sha256:{spaced}"]')))


def test_duplicate_hash_within_a_tenant(tmp_path: Path) -> None:
    h = hash_key("k")
    with pytest.raises(TenantsFileError, match="appears twice"):
        TenantRegistry.from_file(_write(tmp_path, _one_tenant(f'api_keys = ["{h}", "{h}"]')))


def test_duplicate_hash_across_tenants(tmp_path: Path) -> None:
    # One key for two tenants would make authentication ambiguous.
    h = hash_key("shared")
    upper = "sha256:" + h.removeprefix("sha256:").upper()
    text = _one_tenant(f'api_keys = ["{h}"]') + _one_tenant(f'api_keys = ["{upper}"]', "globex")
    with pytest.raises(TenantsFileError) as err:
        TenantRegistry.from_file(_write(tmp_path, text))
    assert "[tenants.globex]" in str(err.value) and "appears twice" in str(err.value)


@pytest.mark.parametrize("value", ['"true"', "1", "0", "[true]"])
def test_admin_must_be_a_bool(tmp_path: Path, value: str) -> None:
    text = _one_tenant(f'api_keys = ["{hash_key("k")}"]\nadmin = {value}')
    with pytest.raises(TenantsFileError, match=r"\[tenants.acme\]: admin must be true or false"):
        TenantRegistry.from_file(_write(tmp_path, text))


def test_error_messages_name_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, _one_tenant("api_keys = []"))
    with pytest.raises(TenantsFileError) as err:
        TenantRegistry.from_file(path)
    assert str(err.value).startswith(f"tenants file {path}:")


# ---- per-tenant limits (issue 12 item 5) ------------------------------------------------------


def test_limits_in_a_tenant_table_are_parsed(tmp_path: Path) -> None:
    key = f'api_keys = ["{hash_key(ACME_KEY)}"]'
    text = _one_tenant(
        f"{key}\nmax_requests = 3\nmax_queued_tokens = 500\nmax_adapters = 2\n"
        f"max_adapter_bytes = {1 << 30}\nmax_uploads = 1"
    ) + _one_tenant(f'api_keys = ["{hash_key(ROOT_KEY)}"]\nadmin = true', name="root")
    registry = TenantRegistry.from_file(_write(tmp_path, text))
    assert registry.limits == {
        "acme": {
            "max_requests": 3,
            "max_queued_tokens": 500,
            "max_adapters": 2,
            "max_adapter_bytes": 1 << 30,
            "max_uploads": 1,
        }
    }  # root sets none: absent, so every limit is the server default
    assert registry.authenticate(ACME_KEY) == Principal("acme", admin=False)


def test_a_file_without_limits_has_no_overrides(tmp_path: Path) -> None:
    assert TenantRegistry.from_file(_valid_file(tmp_path)).limits == {}
    assert TenantRegistry.development().limits == {}


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ("max_requests = true", "max_requests must be a whole number in 1..1000000, got bool"),
        ("max_uploads = false", "max_uploads must be a whole number in 1..10000, got bool"),
        ("max_adapters = 2.0", "max_adapters must be a whole number in 1..1000000, got float"),
        ('max_requests = "5"', "max_requests must be a whole number in 1..1000000, got str"),
        ("max_requests = [5]", "got list"),
        ("max_requests = 0", "max_requests must be in 1..1000000, got 0"),
        ("max_queued_tokens = -1", "max_queued_tokens must be in 1..1000000000000, got -1"),
        ("max_requests = 1000001", "max_requests must be in 1..1000000, got 1000001"),
        (
            f"max_adapter_bytes = {(1 << 50) + 1}",
            "max_adapter_bytes must be in 1..1125899906842624",
        ),
        ("max_uploads = 10001", "max_uploads must be in 1..10000, got 10001"),
    ],
)
def test_bad_limit_values_are_refused(tmp_path: Path, entry: str, needle: str) -> None:
    text = _one_tenant(f'api_keys = ["{hash_key(ACME_KEY)}"]\n{entry}')
    with pytest.raises(TenantsFileError) as err:
        TenantRegistry.from_file(_write(tmp_path, text))
    assert "[tenants.acme]" in str(err.value) and needle in str(err.value), str(err.value)


def test_limits_at_their_bounds_are_accepted(tmp_path: Path) -> None:
    text = _one_tenant(
        f'api_keys = ["{hash_key(ACME_KEY)}"]\nmax_requests = 1\nmax_uploads = 10000\n'
        f"max_adapter_bytes = {1 << 50}"
    )
    registry = TenantRegistry.from_file(_write(tmp_path, text))
    assert registry.limits["acme"] == {
        "max_requests": 1,
        "max_uploads": 10000,
        "max_adapter_bytes": 1 << 50,
    }


@pytest.mark.parametrize("key", ["max_request", "tenant_max_requests", "Admin", "rate_limit"])
def test_unknown_keys_are_refused_naming_the_key_and_the_tenant(tmp_path: Path, key: str) -> None:
    text = _one_tenant(f'api_keys = ["{hash_key(ACME_KEY)}"]\n{key} = 3', name="globex")
    with pytest.raises(TenantsFileError) as err:
        TenantRegistry.from_file(_write(tmp_path, text))
    message = str(err.value)
    assert f"[tenants.globex]: unknown key {key!r}" in message, message
    assert "max_requests" in message  # the allowed keys are listed


def test_a_limit_given_as_a_table_is_refused(tmp_path: Path) -> None:
    text = _one_tenant(f'api_keys = ["{hash_key(ACME_KEY)}"]\n[tenants.acme.max_requests]\nx = 1')
    with pytest.raises(TenantsFileError, match=r"\[tenants.acme\]: max_requests must be"):
        TenantRegistry.from_file(_write(tmp_path, text))
