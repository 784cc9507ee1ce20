"""Per-tenant limits: the tenants file's overrides over the server-wide `--tenant-max-*` defaults.

Every place that enforces a tenant limit (request admission in the scheduler, the adapter quota
and the upload slots in the adapter service) asks one `TenantLimitTable` for the tenant's
`TenantLimits`; the fallback from a tenant's own value to the server default lives only in
`TenantLimits.resolve`. Each resolved `Limit` knows where it came from, so a refusal can say
whether the tenant's own limit or the server default applied.

SIGHUP swaps the table's overrides in one reference assignment: a lookup sees the old or the
new file, whole; what was admitted under the old limits stays admitted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

LIMIT_NAMES = (
    "max_requests",
    "max_queued_tokens",
    "max_adapters",
    "max_adapter_bytes",
    "max_uploads",
)
"""Keys a `[tenants.NAME]` table may set; each overrides the flag `--tenant-` + its name."""

LIMIT_MAXIMA: Mapping[str, int] = MappingProxyType(
    {
        "max_requests": 1_000_000,
        "max_queued_tokens": 10**12,
        "max_adapters": 1_000_000,
        "max_adapter_bytes": 1 << 50,  # 1 PiB
        "max_uploads": 10_000,
    }
)
"""Largest value the tenants file accepts per limit: far above any real deployment, low enough
that a typo (an extra few digits) is refused rather than lifting the limit in practice."""


def flag_of(name: str) -> str:
    """The server flag that sets a limit's default: max_requests -> --tenant-max-requests."""
    return "--tenant-" + name.replace("_", "-")


@dataclass(frozen=True)
class LimitDefaults:
    """The server-wide defaults (the `--tenant-max-*` flags; ServerConfig.tenant_max_*)."""

    max_requests: int = 256
    """Requests one tenant may have waiting or running at once."""
    max_queued_tokens: int = 1_000_000
    """Prompt plus requested completion tokens one tenant may have waiting."""
    max_adapters: int = 1000
    """Adapters one tenant may store."""
    max_adapter_bytes: int = 16 << 30
    """Bytes of adapter weights one tenant may store (uploads in progress count)."""
    max_uploads: int = 4
    """Uploads one tenant may have in progress at once."""


@dataclass(frozen=True)
class Limit:
    """One limit as it applies to one tenant."""

    name: str
    """One of LIMIT_NAMES."""
    value: int
    own: bool
    """True: set in the tenant's table of the tenants file; False: the server default."""

    def describe(self) -> str:
        """For refusal messages: "limit 3, this tenant's max_requests in the tenants file"."""
        if self.own:
            return f"limit {self.value}, this tenant's {self.name} in the tenants file"
        return f"limit {self.value}, the server default {flag_of(self.name)}"


@dataclass(frozen=True)
class TenantLimits:
    """Every limit of one tenant, resolved."""

    max_requests: Limit
    max_queued_tokens: Limit
    max_adapters: Limit
    max_adapter_bytes: Limit
    max_uploads: Limit

    @classmethod
    def resolve(cls, defaults: LimitDefaults, overrides: Mapping[str, int]) -> TenantLimits:
        """The tenant's own value where its table sets one, else the server default."""
        return cls(
            **{
                name: Limit(name, overrides[name], True)
                if name in overrides
                else Limit(name, getattr(defaults, name), False)
                for name in LIMIT_NAMES
            }
        )


LimitsLookup = Callable[[str], TenantLimits]
"""Tenant name -> its limits now (what the scheduler and the adapter service are given)."""


_MAX_CACHED_TENANTS = 4096


class TenantLimitTable:
    """The one lookup of per-tenant limits: defaults plus the tenants file's overrides.

    Thread-safe without a lock: `update` replaces the overrides mapping and the cache of
    resolved limits in one assignment each (a lookup racing an update may resolve from the old
    table once, as it could before the update). Lookups run on every request: a tenant's
    resolved limits are built once per table.
    """

    def __init__(
        self,
        defaults: LimitDefaults | None = None,
        overrides: Mapping[str, Mapping[str, int]] | None = None,
    ) -> None:
        self.defaults = defaults or LimitDefaults()
        self._overrides: Mapping[str, Mapping[str, int]] = dict(overrides or {})
        self._resolved: dict[str, TenantLimits] = {}

    def update(self, overrides: Mapping[str, Mapping[str, int]]) -> None:
        """New overrides (a reloaded tenants file) for every lookup from now on."""
        self._overrides = dict(overrides)
        self._resolved = {}

    def __call__(self, tenant: str) -> TenantLimits:
        resolved = self._resolved
        limits = resolved.get(tenant)
        if limits is None:
            limits = TenantLimits.resolve(self.defaults, self._overrides.get(tenant, {}))
            if len(resolved) < _MAX_CACHED_TENANTS:  # an admin may name any tenant: bounded
                resolved[tenant] = limits
        return limits
