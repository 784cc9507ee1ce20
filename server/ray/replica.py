"""One Ray Serve replica: a whole loraserve server (model, engine, services) on its own device.

The replica runs the ordinary loraserve gRPC server on a private loopback port and answers the
ingress's calls by forwarding the raw request bytes to it, so authentication, validation, error
codes, metrics and the access log are exactly the single server's. What Ray adds is routing:
`touch_adapter` is wired through `@serve.multiplexed`, whose capacity is the number of adapters
the replica's device budget holds (one page each, the smallest adapter), so Serve sends a
tenant-qualified adapter's requests to the replica that already holds it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from loraserve.server.app import Server
    from loraserve.server.config import ServerConfig

log = logging.getLogger(__name__)

Metadata = Sequence[tuple[str, str]]
Reply = tuple[str, str, bytes]
"""(status code name, details, serialized response); "OK" with the response on success."""

METRICS_TARGETS_DIR = "metrics-targets"
"""Under the data directory: one Prometheus file_sd JSON per live replica."""
REPLICAS_DIR = "replicas"
"""Under the data directory: one ReplicaInfo JSON per live replica."""


def build_replica_server(config: ServerConfig) -> Server:
    """The one place a replica builds its server: the single server's composition root."""
    from loraserve.server.app import Server

    return Server(config)


def replica_config(config: ServerConfig, replica_id: str) -> ServerConfig:
    """The replica's own server config: plaintext on a free loopback port, shared store."""
    return dataclasses.replace(
        config,
        host="127.0.0.1",
        port=0,
        metrics_port=0,  # the replica starts its own exporter, below, on a free port
        tls_cert=None,
        tls_key=None,
        tls_client_ca=None,
        replica_id=replica_id,
        shared_store=True,
    )


class LoraserveReplica:
    """The deployment class (serve-ray wraps it with serve.deployment)."""

    async def __init__(self, config: ServerConfig, metrics_host: str) -> None:
        from ray import serve

        self.replica_id = serve.get_replica_context().replica_tag
        self._server = build_replica_server(replica_config(config, self.replica_id))
        port = await self._server.start()
        engine, _ = self._server.runtime.require()
        capacity = max(1, engine.device_pool.num_pages)
        # Wired at init because the capacity is known only once the model is loaded (Serve
        # detects multiplexed functions set as instance attributes).
        self._touch: Callable[[str], Awaitable[str]] = serve.multiplexed(
            max_num_models_per_replica=capacity
        )(_adapter_marker)
        self._channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{port}",
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
            ],
        )
        self.metrics_port = self._server.metrics.serve(0, metrics_host)
        self._files = _register(
            config.data_dir,
            ReplicaInfo(
                replica=self.replica_id,
                node=os.uname().nodename,
                pid=os.getpid(),
                grpc_port=port,
                metrics_host=metrics_host,
                metrics_port=self.metrics_port,
            ),
        )
        log.info(
            "replica %s: adapter capacity %d, metrics on %s:%d",
            self.replica_id,
            capacity,
            metrics_host,
            self.metrics_port,
        )

    async def _route(self) -> None:
        from ray import serve

        adapter_id = serve.get_multiplexed_model_id()
        if adapter_id:
            await self._touch(adapter_id)

    async def unary(
        self, method: str, payload: bytes, metadata: Metadata, timeout: float | None
    ) -> Reply:
        """Any unary RPC of Inference or Adapters, by full method path."""
        await self._route()
        call = self._channel.unary_unary(method)
        try:
            response = await call(payload, metadata=tuple(metadata), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, exc.details() or "", b""
        return "OK", "", response

    async def stream(
        self, method: str, payload: bytes, metadata: Metadata, timeout: float | None
    ) -> AsyncIterator[Reply]:
        """A server-streaming RPC (GenerateStream): one reply per message, an error last."""
        await self._route()
        call = self._channel.unary_stream(method)(
            payload, metadata=tuple(metadata), timeout=timeout
        )
        try:
            async for message in call:
                yield "OK", "", message
        except grpc.aio.AioRpcError as exc:
            yield exc.code().name, exc.details() or "", b""
        finally:
            call.cancel()  # the ingress's client left: stop generating

    async def upload(
        self, method: str, chunks: list[bytes], metadata: Metadata, timeout: float | None
    ) -> Reply:
        """A client-streaming RPC (UploadAdapter), its messages collected by the ingress."""
        call = self._channel.stream_unary(method)

        async def requests() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

        try:
            response = await call(requests(), metadata=tuple(metadata), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, exc.details() or "", b""
        return "OK", "", response

    def pid(self) -> int:
        return os.getpid()

    async def __del__(self) -> None:
        # Serve calls this on graceful shutdown: drain in-flight requests, drop the target.
        for path in self._files:
            path.unlink(missing_ok=True)
        await self._server.stop()


async def _adapter_marker(adapter_id: str) -> str:
    """What Serve's multiplexing "loads": the id itself; the engine's tiers hold the weights."""
    return adapter_id


@dataclass(frozen=True)
class ReplicaInfo:
    """What a live replica publishes under `<data_dir>/replicas/<replica>.json`."""

    replica: str
    node: str
    pid: int
    grpc_port: int
    """The replica's own loraserve server, on the node's loopback (operators, tests)."""
    metrics_host: str
    metrics_port: int


def _register(data_dir: Path, info: ReplicaInfo) -> list[Path]:
    """Publishes the replica and its Prometheus file_sd target; prunes this node's dead ones."""
    replicas = Path(data_dir) / REPLICAS_DIR
    targets = Path(data_dir) / METRICS_TARGETS_DIR
    replicas.mkdir(parents=True, exist_ok=True)
    targets.mkdir(parents=True, exist_ok=True)
    for path in replicas.glob("*.json"):
        try:
            other = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if other.get("node") == info.node and not _alive(int(other.get("pid", 0))):
            path.unlink(missing_ok=True)
            (targets / path.name).unlink(missing_ok=True)
    host = info.metrics_host
    if host in ("0.0.0.0", "::", ""):
        import ray

        host = ray.util.get_node_ip_address()
    target = {"targets": [f"{host}:{info.metrics_port}"], "labels": {"replica": info.replica}}
    written = []
    for directory, payload in ((replicas, dataclasses.asdict(info)), (targets, [target])):
        path = directory / f"{info.replica}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload), encoding="utf-8")
        os.replace(tmp, path)
        written.append(path)
    return written


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_replicas(data_dir: Path) -> list[ReplicaInfo]:
    """The replicas registered under a data directory (live ones, and crashed ones not yet
    pruned)."""
    found = []
    for path in sorted((Path(data_dir) / REPLICAS_DIR).glob("*.json")):
        try:
            found.append(ReplicaInfo(**json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError, TypeError):
            continue
    return found
