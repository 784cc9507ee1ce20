"""`loraserve serve-ray`: start or join Ray, deploy N replicas, serve the ingress until SIGTERM.

Without an address it starts a local Ray instance (no dashboard, node address 127.0.0.1) and
stops it on exit; with one it joins that cluster. Serve's HTTP and gRPC proxies are disabled: the
loraserve ingress (server.ray.ingress) is the only front door. SIGTERM drains the whole
application: the ingress stops taking calls and lets in-flight ones finish within the grace
period, then Serve shuts the replicas down, each draining its own server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraserve.server.config import ServerConfig

log = logging.getLogger(__name__)

APP_NAME = "loraserve"
DEPLOYMENT_NAME = "LoraserveReplica"


@dataclass(frozen=True)
class RayServeConfig:
    """How the cluster is laid out; the per-replica server comes from ServerConfig."""

    replicas: int = 2
    """Replicas of the base model, one device each."""
    address: str | None = None
    """Ray cluster to join (`ray://...` or `host:port`); None starts a local instance."""
    replica_cpus: float = 1.0
    """Ray CPUs reserved per replica."""
    replica_gpus: float | None = None
    """Ray GPUs per replica; None means 1 when the device is CUDA, else 0."""
    threads_per_replica: int = 0
    """Torch CPU threads per replica; 0 divides this machine's cores among the replicas."""
    attach: bool = False
    """Front an application deployed by someone else (a KubeRay RayService): run only the
    ingress, and leave the application running on exit."""

    def validate(self) -> RayServeConfig:
        from loraserve.server.config import ConfigError

        if self.replicas < 1:
            raise ConfigError(f"replicas: must be at least 1, got {self.replicas}")
        if self.replica_cpus < 0 or (self.replica_gpus is not None and self.replica_gpus < 0):
            raise ConfigError("replica_cpus/replica_gpus: must not be negative")
        if self.threads_per_replica < 0:
            raise ConfigError("threads_per_replica: must not be negative")
        if self.attach and self.address is None:
            raise ConfigError("attach: fronting a deployed application needs --address")
        return self


def absolute_paths(config: ServerConfig) -> ServerConfig:
    """Replicas run in other working directories (and on other nodes): no relative paths."""

    def absolute(path: Path | None) -> Path | None:
        return None if path is None else Path(path).expanduser().resolve()

    return dataclasses.replace(
        config,
        model_path=absolute(config.model_path),
        data_dir=absolute(config.data_dir),
        tenants_file=absolute(config.tenants_file),
    )


def _wants_gpu(config: ServerConfig) -> bool:
    if config.device == "cuda":
        return True
    if config.device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


def application(config: ServerConfig, cluster: RayServeConfig):
    """The Serve application: `cluster.replicas` LoraserveReplica replicas."""
    from ray import serve

    from loraserve.server.ray.replica import LoraserveReplica

    config = absolute_paths(config)
    gpus = cluster.replica_gpus
    if gpus is None:
        gpus = 1.0 if _wants_gpu(config) else 0.0
    threads = cluster.threads_per_replica or max(1, (os.cpu_count() or 1) // cluster.replicas)
    deployment = serve.deployment(
        LoraserveReplica,
        name=DEPLOYMENT_NAME,
        num_replicas=cluster.replicas,
        # Requests queue in each replica's engine (continuous batching), not in Serve.
        max_ongoing_requests=config.max_batch_size + config.max_waiting_requests,
        ray_actor_options={
            "num_cpus": cluster.replica_cpus,
            "num_gpus": gpus,
            "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads)}},
        },
        graceful_shutdown_timeout_s=config.grace_seconds,
        health_check_period_s=2.0,
        health_check_timeout_s=30.0,
    )
    return deployment.bind(config, config.host)


def build_app(args: dict[str, Any]):
    """Serve's application builder, for a RayService's serveConfigV2 or `serve run`.

    `args["flags"]` is the `loraserve serve-ray` command line (the serve flags plus
    --replicas ...), e.g. `import_path: loraserve.server.ray.launch:build_app` with
    `args: {flags: ["--replicas", "2", "--data-dir", "/data"]}`.
    """
    from loraserve.server.ray.main import parse_configs

    config, cluster = parse_configs([str(flag) for flag in args.get("flags", [])])
    return application(config, cluster)


def deploy(config: ServerConfig, cluster: RayServeConfig):
    """Deploys the replicas (Ray must be initialized); returns the deployment handle."""
    from ray import serve

    serve.start(proxy_location="Disabled", http_options={"host": "127.0.0.1"})
    if cluster.attach:
        # The application is managed elsewhere (a RayService): only front it.
        return serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP_NAME)
    return serve.run(application(config, cluster), name=APP_NAME, route_prefix=None, blocking=False)


def init_ray(cluster: RayServeConfig) -> bool:
    """Connects to the cluster or starts a local one; True when this process started it."""
    import ray

    if cluster.address is not None:
        ray.init(address=cluster.address, log_to_driver=True)
        return False
    # Ray runs its workers at nice 15 by default; here the replicas are the service itself.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        num_cpus=max(os.cpu_count() or 1, int(cluster.replicas * cluster.replica_cpus) + 1),
    )
    return True


async def serve_ray(config: ServerConfig, cluster: RayServeConfig) -> None:
    """Runs until SIGTERM or SIGINT, then drains the ingress and the replicas and returns."""
    # The ingress's router asks a replica for its queue length before sending it a request; if
    # the answer is late it routes away, even from the replica holding the request's adapter.
    # Wait up to 1 s (Ray's default is 0.1 s): on a busy host, affinity is worth the wait.
    # Read when ray.serve is first imported, so set before that.
    os.environ.setdefault("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "1.0")
    # Likewise, keep trying the replicas that hold the adapter for 5 s (Ray's default: 1 to 2 s)
    # before falling back to the replicas holding the fewest adapters.
    os.environ.setdefault("RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S", "5.0")
    import ray
    from ray import serve

    from loraserve.server.ray.ingress import Ingress

    config = absolute_paths(config)
    started_ray = await asyncio.to_thread(init_ray, cluster)
    ingress: Ingress | None = None
    try:
        handle = await asyncio.to_thread(deploy, config, cluster)
        ingress = Ingress(config, handle)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        port = await ingress.start()
        print(
            f"loraserve: serving on {config.host}:{port} ({cluster.replicas} Ray Serve replicas)",
            flush=True,
        )
        await stop.wait()
        log.info("stopping: draining in-flight requests for up to %.1f s", config.grace_seconds)
    finally:
        if ingress is not None:
            await ingress.stop(config.grace_seconds)
        if not cluster.attach:
            await asyncio.to_thread(serve.delete, APP_NAME)
        if started_ray:
            await asyncio.to_thread(serve.shutdown)
            await asyncio.to_thread(ray.shutdown)
