"""A running gRPC server from a ServerConfig: the services over `build_runtime`'s objects.

`Server.start()` binds the port (health NOT_SERVING), builds the runtime (server/runtime.py, the
one composition root), then flips health to SERVING; `Server.stop(grace)` flips it back, stops
accepting calls and lets in-flight ones finish. Port 0 binds a free port; `start()` returns it.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loraserve.adapters.errors import AdapterError, AdapterNotFoundError
from loraserve.server.adapter_service import AdapterService, key_of
from loraserve.server.api.adapters import AdaptersServicer
from loraserve.server.api.auth import Authorizer
from loraserve.server.api.inference import InferenceServicer
from loraserve.server.api.wire import add_guarded
from loraserve.server.config import ConfigError, ServerConfig
from loraserve.server.engine.compute_threads import helper_pool, serial_torch_ops
from loraserve.server.engine.engine import Engine
from loraserve.server.engine.types import EngineError
from loraserve.server.limits import TenantLimitTable
from loraserve.server.metrics import Metrics
from loraserve.server.request_log import RequestLogger
from loraserve.server.runtime import Runtime, build_runtime
from loraserve.server.tenants import TenantRegistry
from loraserve.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
    adapters_pb2.DESCRIPTOR.services_by_name["Adapters"].full_name,
)


class Server:
    """One loraserve process: gRPC server, engine thread, adapter store."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config.validate()
        self.registry = (
            TenantRegistry.development()
            if config.tenants_file is None
            else TenantRegistry.from_file(config.tenants_file)
        )
        self.limits = TenantLimitTable(self.config.limit_defaults(), self.registry.limits)
        """Per-tenant limits: the tenants file's overrides over --tenant-max-* (reloaded)."""
        self.health = health.aio.HealthServicer()
        self.grpc_server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
            ]
        )
        self.port = 0
        self.metrics_port = 0
        self.served_by = config.replica_id or socket.gethostname()
        """Names this replica in responses and the access log (Ray's replica tag, or the host)."""
        self.runtime = Runtime(self.config)
        self.metrics = Metrics(
            price_per_device_hour=config.price_per_device_hour,
            price_per_gb_hour=config.price_per_gb_hour,
        )
        self.metrics.declare_tenants(self.registry.tenants)
        self.request_log = RequestLogger.open(
            self.metrics, config.access_log, config.access_log_content
        )

    async def start(self) -> int:
        """Binds, loads the model and starts serving; returns the bound port."""
        config = self.config
        # The event loop's thread and its executor's threads live as long as the server and
        # must not run parallel torch operators beside the engine thread (compute_threads).
        serial_torch_ops()
        asyncio.get_running_loop().set_default_executor(helper_pool("loraserve-io"))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        auth = self.auth = Authorizer(self.registry)
        # grpc.aio registers handlers only before start; they answer UNAVAILABLE until loaded.
        # Registered through wire.add_guarded: undecodable request bytes are INVALID_ARGUMENT.
        add_guarded(
            inference_pb2_grpc.add_InferenceServicer_to_server,
            InferenceServicer(self.runtime, auth, self.request_log, self.served_by),
            self.grpc_server,
        )
        add_guarded(
            adapters_pb2_grpc.add_AdaptersServicer_to_server,
            AdaptersServicer(self.runtime, auth, self.metrics),
            self.grpc_server,
        )
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc_server
        )
        address = f"{_host_for_bind(config.host)}:{config.port}"
        credentials = _server_credentials(config)
        if credentials is None:
            self.port = self.grpc_server.add_insecure_port(address)
        else:
            self.port = self.grpc_server.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"cannot bind {config.host}:{config.port}")
        # Serve health (NOT_SERVING) while the model loads, so orchestrators can watch it.
        await self.grpc_server.start()
        if config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(config.metrics_port, config.host)
        parts = await asyncio.to_thread(build_runtime, config, self.metrics, limits=self.limits)
        loaded, engine = parts.loaded, parts.engine
        self.metrics.watch(engine, parts.store, loaded, self.registry.tenants, config.currency)
        engine.start()
        # Before SERVING: a preloaded adapter is on the device when the first request comes.
        await asyncio.to_thread(preload_adapters, config, parts.adapter_service, engine)
        self.runtime.ready(engine, parts.adapter_service)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving %s (%s) on %s:%d, device %s, dtype %s%s",
            config.model_path,
            loaded.architecture,
            config.host,
            self.port,
            loaded.device,
            str(loaded.dtype).removeprefix("torch."),
            " [development mode: single tenant 'dev', no API keys, loopback only]"
            if config.dev_mode
            else f" [{len(self.registry.tenants)} tenants]",
        )
        return self.port

    def reload_tenants(self) -> None:
        """Re-reads the tenants file; new calls use it, calls in flight keep their principal.

        Per-tenant limits change with it for new requests and uploads; what was admitted under
        the old limits keeps running. A bad file raises TenantsFileError and the old tenants
        and limits stay in force.
        """
        if self.config.tenants_file is None:
            log.info("tenants reload ignored: development mode has no tenants file")
            return
        registry = TenantRegistry.from_file(self.config.tenants_file)
        self.registry = registry
        self.auth.registry = registry  # one reference swap: handlers see old or new, whole
        self.limits.update(registry.limits)
        self.metrics.declare_tenants(registry.tenants)
        log.info("tenants reloaded: %d tenants", len(registry.tenants))

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, let in-flight ones finish within `grace` seconds."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc_server.stop(self.config.grace_seconds if grace is None else grace)
        if self.runtime.engine is not None:
            await asyncio.to_thread(self.runtime.engine.stop, 5.0)

    async def wait(self) -> None:
        await self.grpc_server.wait_for_termination()

    async def _set_health(self, status: int) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)


def preload_adapters(config: ServerConfig, service: AdapterService, engine: Engine) -> None:
    """Pins every --preload adapter on the device; ConfigError naming the first that fails."""
    for tenant, spec in config.preloads():
        try:
            record, follow = service.get_for_pin(tenant, spec)
            engine.pin(key_of(record), follow_latest=follow)
        except AdapterNotFoundError:
            raise ConfigError(
                f"--preload {tenant}/{spec}: tenant {tenant!r} has no adapter {spec!r} in "
                f"{config.data_dir}"
            ) from None
        except (AdapterError, EngineError) as exc:
            message = exc.message if isinstance(exc, EngineError) else str(exc)
            raise ConfigError(f"--preload {tenant}/{spec}: {message}") from None
        log.info("preloaded and pinned adapter %s/%s (version %d)", tenant, spec, record.version)


def _server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS (and, with a client CA, mutual TLS) credentials; None for plaintext."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    client_ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def _host_for_bind(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
