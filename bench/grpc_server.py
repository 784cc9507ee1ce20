"""A real loraserve server for the through-gRPC mode: a `python -m loraserve serve` subprocess
(the default: its own interpreter, as in production) or server.app.Server on a thread of this
process (cheaper to start; used by the unit-test smoke run). Loopback only, development mode.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Protocol

from loraserve.bench.engine_runner import apply_config_overrides, device_budget_bytes

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RunningServer(Protocol):
    """What the load generator needs of a server."""

    target: str

    def stop(self) -> None: ...


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
) -> dict[str, str]:
    """`loraserve serve` flags (without --port) of a bench server; `extra` as --field-name."""
    flags = {
        "--model": str(model_dir),
        "--data-dir": str(data_dir),
        "--device": device,
        "--dtype": dtype,
        "--metrics-port": "0",
        "--max-batch-size": str(max_batch_size),
        "--adapter-device-bytes": str(
            device_budget_bytes(model_dir, device_adapters, max_rank, dtype)
        ),
        "--max-lora-rank": str(max_rank),
        "--max-new-tokens": str(max_new_tokens),
        "--max-waiting-requests": "100000",
        "--log-level": "WARNING",
    }
    for key, value in extra:
        flags["--" + key.replace("_", "-")] = value
    return flags


class ServerProcess:
    """`python -m loraserve serve` in a child process; its log goes to `log_path`."""

    def __init__(self, flags: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "loraserve", "serve", "--port", str(self.port)]
        for key, value in flags.items():
            argv += [key, value]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        env.setdefault("HF_HUB_OFFLINE", "1")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self._proc = subprocess.Popen(
            argv, cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.pid = self._proc.pid
        self.log_path = log_path

    def alive(self) -> bool:
        return self._proc.poll() is None

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self._log.close()


class ServerInThread:
    """server.app.Server on its own event loop in a background thread of this process."""

    def __init__(self, flags: dict[str, str]) -> None:
        from loraserve.server.background import BackgroundServer
        from loraserve.server.config import ServerConfig

        wanted: dict[str, object] = {
            "model_path": Path(flags["--model"]),
            "data_dir": Path(flags["--data-dir"]),
            "port": 0,
            "device": flags["--device"],
            "dtype": flags["--dtype"],
            "metrics_port": 0,
            "max_batch_size": int(flags["--max-batch-size"]),
            "max_lora_rank": int(flags["--max-lora-rank"]),
            "max_new_tokens_limit": int(flags["--max-new-tokens"]),
            "default_max_new_tokens": min(64, int(flags["--max-new-tokens"])),
            "max_waiting_requests": int(flags["--max-waiting-requests"]),
            "grace_seconds": 1.0,
        }
        wanted["adapter_device_bytes"] = int(flags["--adapter-device-bytes"])
        self.config = ServerConfig(**wanted)  # type: ignore[arg-type]
        known = {"--model", "--data-dir", "--device", "--dtype", "--metrics-port", "--log-level",
                 "--max-batch-size", "--adapter-device-bytes", "--max-lora-rank",
                 "--max-new-tokens", "--max-waiting-requests"}  # fmt: skip
        extra = tuple((k[2:].replace("-", "_"), v) for k, v in flags.items() if k not in known)
        self.config = apply_config_overrides(self.config, extra)
        self._background = BackgroundServer(self.config).start()
        self.target = self._background.target

    def stop(self) -> None:
        self._background.stop(1.0)
