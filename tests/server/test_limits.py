"""Per-tenant limits: the one lookup that resolves overrides over the defaults (server.limits)."""

from __future__ import annotations

import dataclasses

import loraserve.server.limits as limits_module
from loraserve.server.config import ServerConfig
from loraserve.server.limits import (
    LIMIT_MAXIMA,
    LIMIT_NAMES,
    Limit,
    LimitDefaults,
    TenantLimits,
    TenantLimitTable,
    flag_of,
)


def test_every_limit_has_a_default_a_bound_and_a_field() -> None:
    assert tuple(f.name for f in dataclasses.fields(LimitDefaults)) == LIMIT_NAMES
    assert tuple(f.name for f in dataclasses.fields(TenantLimits)) == LIMIT_NAMES
    assert set(LIMIT_MAXIMA) == set(LIMIT_NAMES)
    for name in LIMIT_NAMES:
        assert 1 <= getattr(LimitDefaults(), name) <= LIMIT_MAXIMA[name]
        # Each flag exists on the server config under the matching name.
        assert hasattr(ServerConfig(), flag_of(name).removeprefix("--").replace("-", "_"))


def test_resolve_takes_the_tenants_own_value_else_the_default() -> None:
    defaults = LimitDefaults(max_requests=10, max_uploads=5)
    limits = TenantLimits.resolve(defaults, {"max_requests": 2, "max_adapters": 7})
    assert limits.max_requests == Limit("max_requests", 2, own=True)
    assert limits.max_adapters == Limit("max_adapters", 7, own=True)
    assert limits.max_uploads == Limit("max_uploads", 5, own=False)
    assert limits.max_queued_tokens == Limit("max_queued_tokens", 1_000_000, own=False)


def test_describe_says_where_the_limit_comes_from() -> None:
    assert (
        Limit("max_requests", 2, own=True).describe()
        == "limit 2, this tenant's max_requests in the tenants file"
    )
    assert (
        Limit("max_adapter_bytes", 9, own=False).describe()
        == "limit 9, the server default --tenant-max-adapter-bytes"
    )


def test_the_config_flags_are_the_defaults() -> None:
    config = ServerConfig(
        tenant_max_requests=3,
        tenant_max_queued_tokens=4,
        tenant_max_adapters=5,
        tenant_max_adapter_bytes=6,
        tenant_max_uploads=7,
    )
    assert config.limit_defaults() == LimitDefaults(3, 4, 5, 6, 7)
    assert ServerConfig().limit_defaults() == LimitDefaults()


def test_the_table_looks_up_per_tenant_and_update_swaps_the_overrides() -> None:
    table = TenantLimitTable(LimitDefaults(max_requests=8), {"acme": {"max_requests": 1}})
    assert table("acme").max_requests == Limit("max_requests", 1, own=True)
    assert table("globex").max_requests == Limit("max_requests", 8, own=False)
    held = table("acme")
    table.update({"globex": {"max_requests": 3}})
    assert table("acme").max_requests == Limit("max_requests", 8, own=False)
    assert table("globex").max_requests == Limit("max_requests", 3, own=True)
    assert held.max_requests.value == 1  # a resolved value never changes under its holder
    assert TenantLimitTable()("anyone") == TenantLimits.resolve(LimitDefaults(), {})


def test_the_table_resolves_a_tenant_once_and_caches_a_bounded_number() -> None:
    table = TenantLimitTable(LimitDefaults(), {"acme": {"max_requests": 1}})
    assert table("acme") is table("acme")  # resolved once per table, not per request
    names = [f"t{i}" for i in range(limits_module._MAX_CACHED_TENANTS + 10)]
    for name in names:
        table(name)
    assert len(table._resolved) == limits_module._MAX_CACHED_TENANTS
    assert table(names[-1]) == TenantLimits.resolve(LimitDefaults(), {})  # still answered
