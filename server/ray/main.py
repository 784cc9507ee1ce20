"""`loraserve serve-ray`: the `serve` flags plus the cluster's (`--replicas`, `--address`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from loraserve.server.config import ConfigError, ServerConfig
from loraserve.server.main import EmbeddedModel, add_serve_arguments, config_from_args
from loraserve.server.ray.launch import RayServeConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraserve serve-ray",
        description="Serve one base model on N Ray Serve replicas behind one gRPC address, "
        "with adapter-affinity routing and one shared adapter store (--data-dir).",
    )
    add_serve_arguments(parser)
    d = RayServeConfig()
    parser.add_argument(
        "--replicas", type=int, default=d.replicas, help=f"replicas (default {d.replicas})"
    )
    parser.add_argument(
        "--address",
        default=None,
        metavar="RAY_ADDRESS",
        help="join this Ray cluster (default: start a local one on loopback, stop it on exit)",
    )
    parser.add_argument(
        "--replica-cpus", type=float, default=d.replica_cpus, help="Ray CPUs per replica"
    )
    parser.add_argument(
        "--replica-gpus",
        type=float,
        default=None,
        help="Ray GPUs per replica (default: 1 on CUDA, else 0)",
    )
    parser.add_argument(
        "--threads-per-replica",
        type=int,
        default=0,
        help="torch CPU threads per replica (default: this machine's cores / replicas)",
    )
    parser.add_argument(
        "--attach",
        action="store_true",
        help="only run the ingress, for an application deployed by a KubeRay RayService "
        "(needs --address)",
    )
    return parser


def configs_from_args(
    args: argparse.Namespace, embedded_model: EmbeddedModel | None = None
) -> tuple[ServerConfig, RayServeConfig]:
    cluster = RayServeConfig(
        replicas=args.replicas,
        address=args.address,
        replica_cpus=args.replica_cpus,
        replica_gpus=args.replica_gpus,
        threads_per_replica=args.threads_per_replica,
        attach=args.attach,
    ).validate()
    # An attached ingress only forwards: the application it fronts holds the model.
    return config_from_args(args, embedded_model, needs_model=not cluster.attach), cluster


def parse_configs(argv: list[str]) -> tuple[ServerConfig, RayServeConfig]:
    """The configs a `loraserve serve-ray` command line describes (RayService's build_app)."""
    return configs_from_args(build_parser().parse_args(argv))


def main(argv: list[str] | None = None, embedded_model: EmbeddedModel | None = None) -> int:
    """`loraserve serve-ray`; the CLI passes `embedded_model`, which builds `--model embedded`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config, cluster = configs_from_args(args, embedded_model)
    except ConfigError as exc:
        print(f"loraserve serve-ray: {exc}", file=sys.stderr)
        return 2
    try:
        import ray  # noqa: F401
    except ImportError:
        print(
            "loraserve serve-ray: Ray is not installed; pip install 'loraserve[ray]'",
            file=sys.stderr,
        )
        return 1
    from loraserve.server.ray.launch import serve_ray

    asyncio.run(serve_ray(config, cluster))
    return 0
