"""Tenants and API keys: the TOML tenants file, key hashing and constant-time authentication.

File format (keys are stored only as sha256 hashes; `loraserve hash-key` prints one):

    [tenants.acme]
    api_keys = ["sha256:<64 hex digits>"]
    admin = false        # optional; an admin may act on any tenant's adapters
    max_requests = 16    # optional per-tenant limits over the --tenant-max-* defaults
                         # (also max_queued_tokens, max_adapters, max_adapter_bytes, max_uploads)

Without a tenants file the server runs in development mode: one tenant named "dev", no keys.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from loraserve.adapters.errors import AdapterValidationError
from loraserve.adapters.names import validate_tenant_name
from loraserve.server.limits import LIMIT_MAXIMA, LIMIT_NAMES

DEV_TENANT = "dev"
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_TABLE_KEYS = ("api_keys", "admin", *LIMIT_NAMES)


class TenantsFileError(ValueError):
    """The tenants file is missing, not TOML, or has a bad entry."""


@dataclass(frozen=True)
class Principal:
    """Who is calling."""

    tenant: str
    admin: bool


def hash_key(api_key: str) -> str:
    """The stored form of an API key: "sha256:<hex>"."""
    return "sha256:" + hashlib.sha256(api_key.encode()).hexdigest()


@dataclass(frozen=True)
class _KeyEntry:
    digest: bytes
    principal: Principal


class TenantRegistry:
    """Authenticates bearer keys against the configured tenants."""

    def __init__(
        self,
        entries: list[_KeyEntry],
        *,
        dev_mode: bool,
        limits: dict[str, dict[str, int]] | None = None,
    ) -> None:
        self._entries = entries
        self.dev_mode = dev_mode
        self.tenants = sorted({e.principal.tenant for e in entries}) or [DEV_TENANT]
        self.limits: dict[str, dict[str, int]] = limits or {}
        """Tenant -> the limits its table sets (server.limits.LIMIT_NAMES); absent: defaults."""

    @classmethod
    def development(cls) -> TenantRegistry:
        return cls([], dev_mode=True)

    @classmethod
    def from_file(cls, path: Path) -> TenantRegistry:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise TenantsFileError(f"tenants file {path}: {exc.strerror or exc}") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise TenantsFileError(f"tenants file {path}: not valid TOML: {exc}") from exc
        tenants = data.get("tenants")
        if not isinstance(tenants, dict) or not tenants:
            raise TenantsFileError(f"tenants file {path}: needs at least one [tenants.NAME] table")
        entries: list[_KeyEntry] = []
        limits: dict[str, dict[str, int]] = {}
        seen: set[bytes] = set()
        for name, table in tenants.items():
            where = f"tenants file {path}: [tenants.{name}]"
            try:
                validate_tenant_name(name)
            except AdapterValidationError as exc:
                raise TenantsFileError(f"{where}: bad tenant name: {exc.message}") from exc
            if not isinstance(table, dict):
                raise TenantsFileError(f"{where}: must be a table")
            for key in table:
                if key not in _TABLE_KEYS:
                    raise TenantsFileError(
                        f"{where}: unknown key {key!r} (allowed: {', '.join(_TABLE_KEYS)})"
                    )
            own = {key: _parse_limit(key, table[key], where) for key in LIMIT_NAMES if key in table}
            if own:
                limits[name] = own
            keys = table.get("api_keys")
            if not isinstance(keys, list) or not keys:
                raise TenantsFileError(f"{where}: api_keys must be a non-empty list")
            admin = table.get("admin", False)
            if not isinstance(admin, bool):
                raise TenantsFileError(f"{where}: admin must be true or false")
            for key in keys:
                digest = _parse_hash(key, where)
                if digest in seen:
                    raise TenantsFileError(f"{where}: an API key hash appears twice in the file")
                seen.add(digest)
                entries.append(_KeyEntry(digest, Principal(tenant=name, admin=admin)))
        return cls(entries, dev_mode=False, limits=limits)

    def authenticate(self, api_key: str | None) -> Principal | None:
        """The caller behind `api_key`, or None. Every stored hash is compared, in constant time."""
        if self.dev_mode:
            return Principal(tenant=DEV_TENANT, admin=True)
        if not api_key:
            return None
        digest = hashlib.sha256(api_key.encode()).digest()
        found: Principal | None = None
        for entry in self._entries:
            if hmac.compare_digest(entry.digest, digest):
                found = entry.principal
        return found


def _parse_limit(key: str, value: object, where: str) -> int:
    """A per-tenant limit: a whole number in 1..LIMIT_MAXIMA[key] (TOML booleans refused)."""
    top = LIMIT_MAXIMA[key]
    # bool is an int subclass: `max_requests = true` must not read as 1.
    if type(value) is not int:
        raise TenantsFileError(
            f"{where}: {key} must be a whole number in 1..{top}, got {type(value).__name__} "
            f"{value!r}"
        )
    if not 1 <= value <= top:
        raise TenantsFileError(f"{where}: {key} must be in 1..{top}, got {value}")
    return value


def _parse_hash(value: object, where: str) -> bytes:
    if not isinstance(value, str) or not value.startswith("sha256:"):
        raise TenantsFileError(f'{where}: each api_keys entry must be "sha256:<64 hex digits>"')
    hex_part = value.removeprefix("sha256:")
    if len(hex_part) != 64:
        raise TenantsFileError(f"{where}: sha256 hash must have 64 hex digits")
    if not _HEX64.fullmatch(hex_part):
        raise TenantsFileError(f"{where}: sha256 hash is not hex")
    return bytes.fromhex(hex_part)
