"""Authenticates every call from its `authorization: Bearer <key>` metadata."""

from __future__ import annotations

import grpc

from loraserve.adapters.errors import AdapterValidationError
from loraserve.adapters.names import validate_tenant_name
from loraserve.server.engine.types import EngineError, ErrorKind
from loraserve.server.tenants import Principal, TenantRegistry


def bearer_key(context: grpc.aio.ServicerContext) -> str | None:
    """The API key of a call, or None when absent or not a Bearer credential."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, credential = value.partition(" ")
            if scheme.lower() == "bearer" and credential.strip():
                return credential.strip()
            return None
    return None


UNAUTHENTICATED_MESSAGE = "missing or unknown API key: send metadata 'authorization: Bearer <key>'"


def unauthenticated() -> EngineError:
    """The error of a call without a valid key."""
    return EngineError(ErrorKind.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


class Authorizer:
    """Turns call metadata into a Principal, or aborts the call."""

    def __init__(self, registry: TenantRegistry) -> None:
        self.registry = registry

    async def principal(self, context: grpc.aio.ServicerContext) -> Principal:
        principal = self.registry.authenticate(bearer_key(context))
        if principal is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        assert principal is not None
        return principal

    async def acting_tenant(
        self,
        context: grpc.aio.ServicerContext,
        requested: str,
        principal: Principal | None = None,
    ) -> str:
        """The tenant a call acts for: the caller's own, or (admins only) the one it names."""
        if principal is None:
            principal = await self.principal(context)
        if not requested or requested == principal.tenant:
            return principal.tenant
        if not principal.admin:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "only an admin key may act on another tenant's adapters",
            )
        try:
            return validate_tenant_name(requested)
        except AdapterValidationError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"tenant: {exc.message}")
            raise
