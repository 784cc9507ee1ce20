"""The one typed configuration object shared by the sync and asyncio clients."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_TARGET = "127.0.0.1:50051"
"""Where a client connects when nothing else is said: the server's default loopback bind."""


@dataclass(frozen=True)
class ClientConfig:
    """How to reach and authenticate to one loraserve server."""

    target: str = DEFAULT_TARGET
    """gRPC target, "host:port" (any target string grpc accepts, e.g. "dns:///host:port")."""
    api_key: str | None = None
    """Sent as `authorization: Bearer <api_key>` on every call; None sends no credentials."""
    timeout_s: float = 60.0
    """Default deadline of every call, in seconds (a whole stream counts as one call)."""
    tls: bool = False
    """Use TLS even without any of the paths below (then the system's root CAs are trusted)."""
    tls_ca: Path | None = None
    """PEM file of the root CA(s) that signed the server certificate; implies TLS."""
    tls_cert: Path | None = None
    """PEM client certificate chain for mutual TLS; needs tls_key; implies TLS."""
    tls_key: Path | None = None
    """PEM private key of tls_cert; implies TLS."""
    tls_server_name: str | None = None
    """Name to verify the server certificate against instead of the target's host name."""

    def __post_init__(self) -> None:
        # Fail at construction, not at the first RPC, so a bad flag points at itself.
        if not self.target:
            raise ValueError("target must be a non-empty 'host:port'")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("mutual TLS needs both a client certificate and its key")
        if self.tls_server_name is not None and not self.uses_tls:
            raise ValueError("a TLS server name override needs TLS (tls or tls_ca)")

    @property
    def uses_tls(self) -> bool:
        """True when the channel is a TLS channel."""
        return self.tls or any(p is not None for p in (self.tls_ca, self.tls_cert, self.tls_key))
