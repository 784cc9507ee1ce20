"""A real loraserve server for the through-gRPC mode and the soak, from `loraserve serve` flags.

"process" runs `python -m loraserve serve` as a child (its own interpreter, as in production:
loraserve.server.background.ServerProcess); "thread" runs server.app.Server on a thread of this
process (cheaper to start; the unit-test smoke run uses it: BackgroundServer). Both parse the
same flags with the server's own parser, bind port 0 and report the port. Loopback only.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Literal

from loraserve.bench.engine_runner import device_budget_bytes
from loraserve.bench.settings import BenchSettings
from loraserve.server.background import BackgroundServer, ServerProcess

BenchServer = BackgroundServer | ServerProcess


def serve_flags(
    model_dir: Path,
    data_dir: Path,
    *,
    device: str,
    dtype: str,
    max_batch_size: int,
    device_adapters: int,
    max_rank: int,
    max_new_tokens: int,
    extra: tuple[tuple[str, str], ...] = (),
) -> dict[str, str | None]:
    """`loraserve serve` flags (without --port) of a bench server; `extra` as --field-name."""
    flags: dict[str, str | None] = {
        "--model": str(model_dir),
        "--data-dir": str(data_dir),
        "--device": device,
        "--dtype": dtype,
        "--max-batch-size": str(max_batch_size),
        "--adapter-device-bytes": str(
            device_budget_bytes(model_dir, device_adapters, max_rank, dtype)
        ),
        "--max-lora-rank": str(max_rank),
        "--max-new-tokens": str(max_new_tokens),
        "--max-waiting-requests": "100000",
        "--log-level": "WARNING",
        # On a free loopback port: the gRPC part reads the engine's step counters from it.
        "--metrics-port": "0",
    }
    for key, value in extra:
        flags["--" + key.replace("_", "-")] = value
    return flags


def settings_serve_flags(
    s: BenchSettings, model_dir: Path, data_dir: Path
) -> dict[str, str | None]:
    """serve_flags() of a bench run's settings: the server every gRPC part starts."""
    return serve_flags(
        model_dir,
        data_dir,
        device=s.device,
        dtype=s.dtype,
        max_batch_size=s.batch,
        device_adapters=s.engine_device_adapters,
        max_rank=s.rank,
        max_new_tokens=max(s.output_len, 8),
        extra=s.engine_opts,
    )


def as_argv(flags: dict[str, str | None]) -> list[str]:
    """Flags as argv; a None value is a switch given alone (`--no-metrics`)."""
    argv: list[str] = []
    for key, value in flags.items():
        argv += [key] if value is None else [key, value]
    return argv


def start_server(
    kind: Literal["process", "thread"], flags: dict[str, str | None], log_path: Path
) -> BenchServer:
    """Starts a server with `flags` (which must name --model) and waits until it serves."""
    if kind == "process":
        return ServerProcess(as_argv(flags), log_path).start()
    from loraserve.server.main import add_serve_arguments, config_from_args

    parser = argparse.ArgumentParser(prog="loraserve serve")
    add_serve_arguments(parser)
    config = config_from_args(parser.parse_args(as_argv(flags)))
    return BackgroundServer(config).start()


def server_pid(server: BenchServer) -> int:
    """The process whose memory the server uses (this one for a thread)."""
    return server.pid if isinstance(server, ServerProcess) else os.getpid()
