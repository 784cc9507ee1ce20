"""Channel creation and per-call metadata, shared by the sync and asyncio clients."""

from __future__ import annotations

from pathlib import Path

import grpc
import grpc.aio

from loraserve import __version__
from loraserve.client.config import ClientConfig

Metadata = tuple[tuple[str, str], ...]
"""gRPC call metadata as the stubs accept it."""

ChannelOption = tuple[str, str | int]
"""One grpc channel argument."""


def call_metadata(config: ClientConfig) -> Metadata:
    """The metadata sent with every call: the bearer key when one is configured."""
    if config.api_key is None:
        return ()
    return (("authorization", f"Bearer {config.api_key}"),)


def channel_options(config: ClientConfig) -> list[ChannelOption]:
    """Channel arguments: a recognisable user agent and the TLS name override if any."""
    options: list[ChannelOption] = [("grpc.primary_user_agent", f"loraserve-client/{__version__}")]
    if config.tls_server_name is not None:
        # Lets a client dial an IP or an internal alias while verifying the certificate's name.
        options.append(("grpc.ssl_target_name_override", config.tls_server_name))
    return options


def channel_credentials(config: ClientConfig) -> grpc.ChannelCredentials:
    """TLS credentials from the configured PEM files (None fields mean system roots / no mTLS)."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read_optional(config.tls_ca),
        private_key=_read_optional(config.tls_key),
        certificate_chain=_read_optional(config.tls_cert),
    )


def create_channel(config: ClientConfig) -> grpc.Channel:
    """A blocking-API channel to config.target."""
    options = channel_options(config)
    if config.uses_tls:
        return grpc.secure_channel(config.target, channel_credentials(config), options=options)
    return grpc.insecure_channel(config.target, options=options)


def create_aio_channel(config: ClientConfig) -> grpc.aio.Channel:
    """An asyncio channel to config.target; create it inside the event loop that will use it."""
    options = channel_options(config)
    if config.uses_tls:
        return grpc.aio.secure_channel(config.target, channel_credentials(config), options=options)
    return grpc.aio.insecure_channel(config.target, options=options)


def _read_optional(path: Path | None) -> bytes | None:
    # Read eagerly so a wrong path is a FileNotFoundError naming it, not a handshake failure.
    return None if path is None else path.read_bytes()
