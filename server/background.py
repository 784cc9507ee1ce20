"""A Server on its own event loop in a background thread of this process.

For embedding loraserve in another program's process: the demo, the benchmark's in-process
mode and the tests. `loraserve serve` runs the server on the main thread instead (signals).
"""

from __future__ import annotations

import asyncio
import threading

from loraserve.server.app import Server
from loraserve.server.config import ServerConfig


class BackgroundServer:
    """Starts on construction via `start()`; `stop()` drains and joins the thread."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.server: Server | None = None
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

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
        if self.server is not None and self._loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop)
            future.result(60)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(60)
