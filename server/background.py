"""Launchers for a whole server: one in a background thread, one in a child process.

The only two ways the demo, the benchmark and the tests start a server. Both bind port 0 (and,
when metrics are on, metrics port 0) and report the ports they got, so there is no
pick-a-free-port-then-bind race. `loraserve serve` itself runs the server on its main thread
(signals); `ServerProcess` runs exactly that command.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from loraserve.server.app import Server
from loraserve.server.config import ServerConfig

SERVING_LINE = re.compile(
    r"loraserve: serving on (?P<host>\S+):(?P<port>\d+)(?:, metrics on \S+:(?P<metrics>\d+))?"
)
"""The line `loraserve serve` prints once it serves (server/main.py), with the bound ports."""


class BackgroundServer:
    """A Server on its own event loop in a background thread of this process.

    The config's port (and a non-None metrics port) are replaced by 0: `port` and
    `metrics_port` hold what was bound once `start()` returns.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = dataclasses.replace(
            config,
            port=0,
            metrics_port=None if config.metrics_port is None else 0,
        )
        self.server: Server | None = None
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_port(self) -> int:
        """The bound /metrics port (0 when metrics are off)."""
        return 0 if self.server is None else self.server.metrics_port

    def alive(self) -> bool:
        """True while the server's thread runs (after start, before stop)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 300.0) -> BackgroundServer:
        """Returns once the model is loaded and the port serves (raises the start error)."""
        started = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                # grpc.aio binds a server to the loop it is created on: create it here.
                self.server = Server(self.config)
                self.port = self._loop.run_until_complete(self.server.start())
            except BaseException as exc:
                errors.append(exc)
                if self.server is not None:  # never leave a half-started server bound
                    self._loop.run_until_complete(self.server.stop(0))
                started.set()
                return
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="loraserve-server", daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise TimeoutError(f"the server did not start within {timeout} s")
        if errors:
            raise errors[0]
        return self

    def stop(self, grace: float = 1.0) -> None:
        """Drains in-flight calls for up to `grace` seconds and joins the thread."""
        if self.server is not None and self._loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop)
            future.result(60)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(60)


class ServerProcess:
    """`python -m loraserve serve --port 0 ...` in a child process; output goes to `log_path`.

    `args` are further `serve` flags (never --port: the child binds a free port and reports
    it). A `--metrics-port` given in `args` is replaced by 0 as well.
    """

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.args = _with_free_metrics_port(args)
        self.log_path = Path(log_path)
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("HF_HUB_OFFLINE", "1")
        self.port = 0
        self.metrics_port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self, timeout: float = 300.0) -> ServerProcess:
        """Starts the child; returns once it prints its serving line (raises if it exits)."""
        argv = [sys.executable, "-m", "loraserve", "serve", "--port", "0", *self.args]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            match = SERVING_LINE.search(self.output())
            if match:
                self.port = int(match["port"])
                self.metrics_port = int(match["metrics"] or 0)
                return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"loraserve serve did not start (exit {self.proc.returncode}):\n"
                    + self.output()
                )
            time.sleep(0.05)

    def output(self) -> str:
        """Everything the child printed so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None, "not started"
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None, "not started"
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (drain), then SIGKILL after `timeout`; the exit code (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: no drain (crash tests)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def _with_free_metrics_port(args: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if arg == "--port" or arg.startswith("--port="):
            raise ValueError("ServerProcess binds a free port itself: do not pass --port")
        if arg == "--metrics-port" and i + 1 < len(args):
            out += ["--metrics-port", "0"]
            skip = True
        elif arg.startswith("--metrics-port="):
            out.append("--metrics-port=0")
        else:
            out.append(arg)
    if "--no-metrics" not in out and not any(a.startswith("--metrics-port") for a in out):
        out += ["--metrics-port", "0"]
    return out
