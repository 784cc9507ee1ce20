"""`loraserve serve`: flags -> ServerConfig -> a running server.

SIGTERM/SIGINT stop it cleanly; SIGHUP reloads the tenants file. Once serving it prints one line,
`loraserve: serving on HOST:PORT` (plus `, metrics on HOST:PORT`), with the ports it actually
bound: `--port 0` / `--metrics-port 0` pick free ones, and launchers read them from that line.

The base model is never chosen silently: `--model PATH` or `--model embedded` (the random-weight
test model, built by the caller's `embedded_model` provider, since the server layer does not
import the test fixtures); only development mode (no --tenants) falls back to the embedded model,
with a warning that its answers are noise.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from loraserve.server.config import ConfigError, ServerConfig
from loraserve.server.engine.config import ATTENTION_BACKENDS

if TYPE_CHECKING:
    from loraserve.server.app import Server

log = logging.getLogger("loraserve")

EMBEDDED = "embedded"
"""`--model embedded`: the tiny random-weight test model (loraserve.testing.tiny_model)."""

NO_MODEL_MESSAGE = (
    "no base model: pass --model PATH (a local Hugging Face checkpoint directory with "
    "safetensors weights), or --model embedded to serve the tiny embedded test model "
    "explicitly (random weights: its answers are noise)"
)

EmbeddedModel = Callable[[], Path]
"""Builds (or finds cached) the embedded test model and returns its checkpoint directory."""


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The `serve` flags; defaults come from ServerConfig so there is one source of truth."""
    d = ServerConfig()
    parser.add_argument(
        "--model",
        default=None,
        metavar="PATH",
        help="local Hugging Face checkpoint directory, or 'embedded' for the tiny random-weight "
        "test model (required with --tenants; development mode defaults to 'embedded')",
    )
    parser.add_argument("--host", default=d.host, help=f"address to bind (default {d.host})")
    parser.add_argument("--port", type=int, default=d.port, help=f"gRPC port (default {d.port})")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=d.data_dir,
        help=f"where adapters are stored (default {d.data_dir})",
    )
    parser.add_argument(
        "--tenants",
        type=Path,
        default=None,
        metavar="FILE",
        help="TOML tenants file with hashed API keys (default: development mode)",
    )
    parser.add_argument(
        "--tls-cert",
        type=Path,
        default=None,
        metavar="PEM",
        help="server certificate chain: serve over TLS (with --tls-key)",
    )
    parser.add_argument(
        "--tls-key", type=Path, default=None, metavar="PEM", help="private key of --tls-cert"
    )
    parser.add_argument(
        "--tls-client-ca",
        type=Path,
        default=None,
        metavar="PEM",
        help="require client certificates signed by this CA (mutual TLS)",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=d.device)
    parser.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=d.dtype
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=d.metrics_port,
        help=f"Prometheus /metrics port, 0 picks a free one (default {d.metrics_port})",
    )
    parser.add_argument(
        "--no-metrics",
        action="store_true",
        help="do not serve Prometheus /metrics",
    )
    parser.add_argument("--max-lora-rank", type=int, default=d.max_lora_rank)
    parser.add_argument(
        "--adapter-device-bytes",
        type=int,
        default=d.adapter_device_bytes,
        help="device memory budget for adapter weights (default 1 GiB)",
    )
    parser.add_argument(
        "--adapter-host-bytes",
        type=int,
        default=d.adapter_host_bytes,
        help="host memory budget for validated adapters, LRU (default 4 GiB)",
    )
    parser.add_argument("--max-batch-size", type=int, default=d.max_batch_size)
    parser.add_argument(
        "--kv-cache-bytes",
        type=int,
        default=d.kv_cache_bytes,
        help="paged KV pool in bytes (Llama family); 0: --kv-cache-fraction of free GPU memory",
    )
    parser.add_argument("--kv-cache-fraction", type=float, default=d.kv_cache_fraction)
    parser.add_argument(
        "--enforce-eager", action="store_true", help="no CUDA graphs, decode or prefill (debugging)"
    )
    parser.add_argument(
        "--prefill-graph-tokens",
        type=int,
        default=d.prefill_graph_tokens,
        help="prefills of up to this many padded tokens replay CUDA graphs captured at start "
        f"(default {d.prefill_graph_tokens}; 0: every prefill eager)",
    )
    parser.add_argument(
        "--async-decode",
        action=argparse.BooleanOptionalAction,
        default=d.async_decode,
        help="launch each decode step before reading the previous one's tokens, so the host's "
        "work overlaps the device's (Llama-family forward; on by default; --no-async-decode "
        "reads every step's tokens first)",
    )
    parser.add_argument(
        "--cold-join-hold-seconds",
        type=float,
        default=d.cold_join_hold_seconds,
        help="while rows decode, how long requests whose adapters finished loading may wait for "
        "other queued requests' loads, to join the batch in one prefill (0: each at once; "
        f"default {d.cold_join_hold_seconds})",
    )
    parser.add_argument(
        "--attention",
        choices=ATTENTION_BACKENDS,
        default=d.attention,
        help="decode attention of the Llama-family forward: sdpa (default) or triton "
        "(a paged-KV Triton kernel; needs CUDA and Triton)",
    )
    parser.add_argument(
        "--lora-overlap",
        action="store_true",
        help="run each adapter shrink on a side CUDA stream beside its projection's base matmul "
        "(Llama-family forward on CUDA; off by default, not yet measured on a GPU)",
    )
    parser.add_argument("--max-waiting-requests", type=int, default=d.max_waiting_requests)
    parser.add_argument(
        "--tenant-max-requests",
        type=int,
        default=d.tenant_max_requests,
        help="requests one tenant may have waiting or running "
        "(a tenant's own max_requests in the tenants file overrides it)",
    )
    parser.add_argument(
        "--tenant-max-queued-tokens",
        type=int,
        default=d.tenant_max_queued_tokens,
        help="prompt + requested completion tokens one tenant may have waiting "
        "(a tenant's own max_queued_tokens in the tenants file overrides it)",
    )
    parser.add_argument(
        "--tenant-max-adapters",
        type=int,
        default=d.tenant_max_adapters,
        help="adapters one tenant may store "
        "(a tenant's own max_adapters in the tenants file overrides it)",
    )
    parser.add_argument(
        "--tenant-max-adapter-bytes",
        type=int,
        default=d.tenant_max_adapter_bytes,
        help="bytes of adapter weights one tenant may store, every kept version counted "
        "(a tenant's own max_adapter_bytes in the tenants file overrides it)",
    )
    parser.add_argument(
        "--adapter-versions-kept",
        type=int,
        default=d.adapter_versions_kept,
        help="versions of each adapter kept for name@N and rollback, the latest included "
        f"(default {d.adapter_versions_kept})",
    )
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=d.max_batch_tokens,
        help="tokens per engine iteration (prompt chunks + one per decoding request)",
    )
    parser.add_argument(
        "--max-seq-len",
        type=int,
        default=d.max_seq_len,
        help="longest request, prompt + completion; sizes the KV memory",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=d.max_new_tokens_limit,
        dest="max_new_tokens_limit",
        help="largest max_new_tokens a request may ask",
    )
    parser.add_argument(
        "--default-max-new-tokens",
        type=int,
        default=None,
        help=f"max_new_tokens when a request sets none (default {d.default_max_new_tokens}, "
        "capped at --max-new-tokens)",
    )
    parser.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    parser.add_argument("--max-adapter-bytes", type=int, default=d.max_adapter_bytes)
    parser.add_argument(
        "--tenant-max-uploads",
        type=int,
        default=d.tenant_max_uploads,
        help=f"uploads one tenant may have in progress at once (default {d.tenant_max_uploads}) "
        "(a tenant's own max_uploads in the tenants file overrides it)",
    )
    parser.add_argument(
        "--max-uploads",
        type=int,
        default=d.max_uploads,
        help=f"uploads in progress on the whole server (default {d.max_uploads})",
    )
    parser.add_argument(
        "--upload-idle-seconds",
        type=float,
        default=d.upload_idle_seconds,
        help=f"end an upload that sends nothing for this long (default {d.upload_idle_seconds:g})",
    )
    parser.add_argument(
        "--upload-deadline-seconds",
        type=float,
        default=d.upload_deadline_seconds,
        help=f"longest an upload may take (default {d.upload_deadline_seconds:g})",
    )
    parser.add_argument(
        "--stream-interval-seconds",
        type=float,
        default=d.stream_interval_seconds,
        help="GenerateStream: after the first tokens, at most one message per this interval, "
        "carrying every token since the last "
        f"(0: one per step; default {d.stream_interval_seconds:g})",
    )
    parser.add_argument(
        "--no-gc-freeze",
        dest="gc_freeze",
        action="store_false",
        help="leave start-up objects to Python's cyclic collector (default: frozen once "
        "started, so a full collection does not scan the model and libraries: gc.freeze)",
    )
    parser.add_argument(
        "--gil-switch-interval-seconds",
        type=float,
        default=d.gil_switch_interval_seconds,
        help="Python's thread switch interval for this process (default: Python's, 0.005): "
        "how long the gRPC event loop may keep the GIL the engine thread is waiting for",
    )
    parser.add_argument(
        "--grace-seconds",
        type=float,
        default=d.grace_seconds,
        help="time in-flight requests get to finish on SIGTERM",
    )
    parser.add_argument(
        "--price-per-device-hour",
        type=float,
        default=d.price_per_device_hour,
        help="price of one device-hour, for per-tenant cost (default 0)",
    )
    parser.add_argument(
        "--price-per-gb-hour",
        type=float,
        default=d.price_per_gb_hour,
        help="price of holding 1 GB of adapter weights on the device for an hour (default 0)",
    )
    parser.add_argument("--currency", default=d.currency, help=f"cost unit (default {d.currency})")
    parser.add_argument(
        "--access-log",
        default=d.access_log,
        metavar="PATH",
        help="JSON access log: '-' for stderr (default), a file path, or '' to disable",
    )
    parser.add_argument(
        "--access-log-content",
        action="store_true",
        help="also log prompts and completions (off by default: tenants' data stays private)",
    )
    parser.add_argument(
        "--preload",
        action="append",
        default=[],
        metavar="TENANT/NAME[@N]",
        help="load this adapter onto the device tier before serving and keep it pinned "
        "(repeatable); a missing adapter or one that does not fit fails the start (exit 2)",
    )
    parser.add_argument("--log-level", default="INFO")


def model_from_args(
    args: argparse.Namespace, embedded_model: EmbeddedModel | None, *, needs_model: bool = True
) -> Path | None:
    """The checkpoint directory to serve; raises ConfigError when none was given.

    `needs_model=False` (an ingress that only forwards, `serve-ray --attach`) allows none.
    """
    choice = args.model
    if choice is None and not needs_model:
        return None
    if choice is None:
        if args.tenants is not None:
            raise ConfigError(NO_MODEL_MESSAGE)
        log.warning(
            "no --model: development mode serves the embedded test model, whose weights are "
            "random (answers are noise); pass --model PATH to serve a real checkpoint"
        )
        choice = EMBEDDED
    if choice == EMBEDDED:
        if embedded_model is None:
            raise ConfigError(
                "--model embedded: this launcher cannot build the embedded test model; "
                "run `loraserve serve --model embedded`"
            )
        # Building it runs parallel torch operators: on a passing thread, so no OpenMP pool
        # of this (main, long-lived) thread's sits beside the engine's (compute_threads).
        from loraserve.server.engine.compute_threads import in_passing_thread

        return in_passing_thread(embedded_model, name="loraserve-embedded-model")
    return Path(choice)


def config_from_args(
    args: argparse.Namespace,
    embedded_model: EmbeddedModel | None = None,
    *,
    needs_model: bool = True,
) -> ServerConfig:
    """The validated ServerConfig of the flags; `embedded_model` builds `--model embedded`."""
    return ServerConfig(
        model_path=model_from_args(args, embedded_model, needs_model=needs_model),
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        tenants_file=args.tenants,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        device=args.device,
        dtype=args.dtype,
        metrics_port=None if args.no_metrics else args.metrics_port,
        max_lora_rank=args.max_lora_rank,
        adapter_device_bytes=args.adapter_device_bytes,
        adapter_host_bytes=args.adapter_host_bytes,
        max_batch_size=args.max_batch_size,
        kv_cache_bytes=args.kv_cache_bytes,
        kv_cache_fraction=args.kv_cache_fraction,
        enforce_eager=args.enforce_eager,
        prefill_graph_tokens=args.prefill_graph_tokens,
        attention=args.attention,
        lora_overlap=args.lora_overlap,
        async_decode=args.async_decode,
        cold_join_hold_seconds=args.cold_join_hold_seconds,
        max_waiting_requests=args.max_waiting_requests,
        tenant_max_requests=args.tenant_max_requests,
        tenant_max_queued_tokens=args.tenant_max_queued_tokens,
        tenant_max_adapters=args.tenant_max_adapters,
        tenant_max_adapter_bytes=args.tenant_max_adapter_bytes,
        adapter_versions_kept=args.adapter_versions_kept,
        max_batch_tokens=args.max_batch_tokens,
        max_seq_len=args.max_seq_len,
        max_new_tokens_limit=args.max_new_tokens_limit,
        default_max_new_tokens=(
            min(ServerConfig.default_max_new_tokens, args.max_new_tokens_limit)
            if args.default_max_new_tokens is None
            else args.default_max_new_tokens
        ),
        max_prompt_tokens=args.max_prompt_tokens,
        max_adapter_bytes=args.max_adapter_bytes,
        tenant_max_uploads=args.tenant_max_uploads,
        max_uploads=args.max_uploads,
        upload_idle_seconds=args.upload_idle_seconds,
        upload_deadline_seconds=args.upload_deadline_seconds,
        stream_interval_seconds=args.stream_interval_seconds,
        gc_freeze=args.gc_freeze,
        gil_switch_interval_seconds=args.gil_switch_interval_seconds,
        grace_seconds=args.grace_seconds,
        price_per_device_hour=args.price_per_device_hour,
        price_per_gb_hour=args.price_per_gb_hour,
        currency=args.currency,
        access_log=args.access_log,
        access_log_content=args.access_log_content,
        preload=tuple(getattr(args, "preload", None) or ()),
    ).validate()


async def serve(config: ServerConfig) -> None:
    """Runs until SIGTERM or SIGINT, then drains and returns."""
    from loraserve.server.app import Server  # heavy imports (torch) only when actually serving

    server = Server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: _reload_tenants(server))
    started = False
    try:
        port = await server.start()
        started = True
        if config.gc_freeze:
            freeze_startup_heap()
        # A line scripts and tests wait for: the ports actually bound (0 picks a free one).
        metrics = f", metrics on {config.host}:{server.metrics_port}" if server.metrics_port else ""
        print(f"loraserve: serving on {config.host}:{port}{metrics}", flush=True)
        await stop.wait()
        log.info("stopping: draining in-flight requests for up to %.1f s", config.grace_seconds)
    finally:
        # Also on a failed start (model missing, metrics port taken): never leave the port bound.
        await server.stop(None if started else 0)


def _reload_tenants(server: Server) -> None:
    """SIGHUP: re-read the tenants file; on a bad file, keep the old one and say why."""
    from loraserve.server.tenants import TenantsFileError

    try:
        server.reload_tenants()
    except TenantsFileError as exc:
        log.error("tenants reload failed, keeping the previous tenants: %s", exc)


def freeze_startup_heap() -> int:
    """Collects once, then moves every object alive into the cyclic collector's permanent
    generation (gc.freeze), which later collections skip: start-up leaves hundreds of
    thousands of long-lived objects (torch, transformers, the model, the graphs) that a full
    collection would otherwise scan, on whichever thread triggers it, the engine's included.
    Returns how many objects are frozen. `loraserve serve` only, like apply_process_settings."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("froze %d start-up objects out of the cyclic collector's scans", frozen)
    return frozen


def apply_process_settings(config: ServerConfig) -> None:
    """Settings that belong to the whole process, applied by `loraserve serve` only (a server
    started on a thread of another program leaves that program's settings alone)."""
    if config.gil_switch_interval_seconds is not None:
        sys.setswitchinterval(config.gil_switch_interval_seconds)
        log.info("thread switch interval %g s", config.gil_switch_interval_seconds)


def run_serve(args: argparse.Namespace, embedded_model: EmbeddedModel | None = None) -> int:
    """Serves until SIGTERM/SIGINT; the exit code (2: bad flags, 1: failed start)."""
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = config_from_args(args, embedded_model)
    except ConfigError as exc:
        print(f"loraserve serve: {exc}", file=sys.stderr)
        return 2
    if config.dev_mode:
        log.warning(
            "development mode: no --tenants file, so every call is tenant 'dev' with no API key; "
            "binding loopback only"
        )
    apply_process_settings(config)
    try:
        asyncio.run(serve(config))
    except ConfigError as exc:  # found only at start, e.g. a --preload adapter that is missing
        print(f"loraserve serve: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a start failure: say what, not a traceback wall
        from loraserve.server.engine.model import ModelLoadError
        from loraserve.server.tenants import TenantsFileError

        if isinstance(exc, (ModelLoadError, TenantsFileError, OSError)):
            print(f"loraserve serve: {exc}", file=sys.stderr)
            return 1
        raise
    return 0
