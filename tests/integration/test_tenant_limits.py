"""Per-tenant limits in the tenants file (issue 12 item 5), through the real server and client.

A tenant's `max_requests`, `max_queued_tokens`, `max_adapters`, `max_adapter_bytes` and
`max_uploads` override the server-wide `--tenant-max-*` defaults for that tenant only, are
named in the refusal, and are reloaded with the file (Server.reload_tenants or SIGHUP): new
calls get the new limits, calls already admitted keep running, a bad file keeps the old ones.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from hardening_support import RawStubs, metadata, stalled_stream, upload_header, wait_until
from serving_support import KEYS, client_for

from loraserve.server.background import BackgroundServer, ServerProcess
from loraserve.server.config import ServerConfig
from loraserve.server.tenants import TenantsFileError, hash_key


def _write(path: Path, limits: dict[str, str]) -> Path:
    """A tenants file of acme, globex and root (admin) with extra lines per tenant."""
    path.write_text(
        "".join(
            f'[tenants.{t}]\napi_keys = ["{hash_key(KEYS[t])}"]\n'
            + ("admin = true\n" if t == "root" else "")
            + limits.get(t, "")
            + "\n\n"
            for t in ("acme", "globex", "root")
        )
    )
    return path


def _code(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.fixture
def start(default_model: Path, tmp_path: Path) -> Iterator[Callable[..., BackgroundServer]]:
    started: list[BackgroundServer] = []

    def run(tenants: Path, **overrides: object) -> BackgroundServer:
        config = ServerConfig(
            model_path=default_model,
            port=0,
            metrics_port=None,
            data_dir=tmp_path / f"data{len(started)}",
            tenants_file=tenants,
            max_lora_rank=32,
            max_adapter_bytes=8 * 1024 * 1024,
            access_log="",
            **overrides,  # type: ignore[arg-type]
        )
        server = BackgroundServer(config).start()
        started.append(server)
        return server

    yield run
    for server in started:
        server.stop()


class _EngineGate:
    """Holds the engine thread inside its next forward until opened, so the requests the test
    sent stay admitted (in flight) for exactly as long as it needs."""

    def __init__(self, server: BackgroundServer) -> None:
        assert server.server is not None and server.server.runtime.engine is not None
        executor = server.server.runtime.engine.scheduler.executor
        self.entered = threading.Event()
        self.open = threading.Event()
        self.open.set()
        forward = executor.execute

        def gated(plan):  # type: ignore[no-untyped-def]
            self.entered.set()
            assert self.open.wait(60), "the test never opened the engine gate"
            return forward(plan)

        executor.execute = gated  # type: ignore[method-assign]

    def close(self) -> None:
        self.entered.clear()
        self.open.clear()


def _generate(server: BackgroundServer, tenant: str) -> Callable[[], object]:
    def call() -> object:
        with client_for(server, tenant) as client:
            return client.generate("hello there", max_new_tokens=3)

    return call


def test_a_tenants_own_max_requests_refuses_it_while_others_are_served(
    start: Callable[..., BackgroundServer], tmp_path: Path
) -> None:
    tenants = _write(tmp_path / "tenants.toml", {"acme": "max_requests = 1\n"})
    server = start(tenants, tenant_max_requests=4)
    gate = _EngineGate(server)
    gate.close()
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(_generate(server, "acme"))
        assert gate.entered.wait(30), "acme's first request never reached the engine"
        code, details = _code(_generate(server, "acme"))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "limit 1, this tenant's max_requests in the tenants file" in details, details
        # globex has no limit of its own: the default (4) applies, and its calls are taken.
        others = [pool.submit(_generate(server, "globex")) for _ in range(3)]
        gate.open.set()
        assert first.result(60).finish_reason  # the admitted request was never disturbed
        for other in others:
            assert other.result(60).finish_reason
    # Once acme's request is done, its next one is served.
    assert _generate(server, "acme")().finish_reason  # type: ignore[attr-defined]


def test_reload_changes_the_limits_for_new_calls_and_never_kills_admitted_ones(
    start: Callable[..., BackgroundServer], tmp_path: Path
) -> None:
    tenants = _write(tmp_path / "tenants.toml", {"acme": "max_requests = 1\n"})
    server = start(tenants)
    assert server.server is not None
    gate = _EngineGate(server)
    gate.close()
    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(_generate(server, "acme"))]
        assert gate.entered.wait(30)
        assert _code(_generate(server, "acme"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Raised to 2: a second request is taken, a third refused naming the new limit.
        _write(tenants, {"acme": "max_requests = 2\n"})
        server.server.reload_tenants()
        running.append(pool.submit(_generate(server, "acme")))
        assert wait_until(lambda: server.server.runtime.engine.scheduler.waiting_count() == 1)
        code, details = _code(_generate(server, "acme"))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit 2, this tenant's max_requests" in details, details
        # Lowered to 1 with two in flight: both keep running; new calls are refused.
        _write(tenants, {"acme": "max_requests = 1\n"})
        server.server.reload_tenants()
        code, details = _code(_generate(server, "acme"))
        assert "limit 1, this tenant's max_requests" in details, details
        # A bad file is refused; the limits in force (1) stay, not the default.
        _write(tenants, {"acme": "max_requests = true\n"})
        with pytest.raises(TenantsFileError, match="max_requests must be a whole number"):
            server.server.reload_tenants()
        code, details = _code(_generate(server, "acme"))
        assert "limit 1, this tenant's max_requests" in details, details
        # Dropping the override falls back to the server default for new calls.
        _write(tenants, {})
        server.server.reload_tenants()
        running.append(pool.submit(_generate(server, "acme")))
        assert wait_until(lambda: server.server.runtime.engine.scheduler.waiting_count() == 2)
        gate.open.set()
        for call in running:
            assert call.result(60).finish_reason


def test_adapter_quota_and_upload_overrides(
    start: Callable[..., BackgroundServer], tmp_path: Path, adapter_dirs: dict[str, Path]
) -> None:
    qv = adapter_dirs["qv"]
    size = (qv / "adapter_model.safetensors").stat().st_size
    tenants = _write(
        tmp_path / "tenants.toml",
        {
            "acme": "max_adapters = 1\nmax_uploads = 1\n",
            "globex": f"max_adapter_bytes = {size * 3 // 2}\n",
        },
    )
    server = start(tenants, tenant_max_adapters=3, upload_idle_seconds=30.0)
    with client_for(server, "acme") as acme, client_for(server, "globex") as globex:
        # max_uploads: one stalled upload takes acme's only slot; globex (default 4) uploads.
        release = threading.Event()
        with RawStubs(server.target) as raw:
            try:
                stalled = raw.adapters.UploadAdapter.future(
                    stalled_stream([upload_header("stall", 1000)], release, []),
                    metadata=metadata("acme"),
                    timeout=60,
                )
                uploads = server.server.runtime.adapter_service.uploads  # type: ignore[union-attr]
                assert wait_until(lambda: uploads.in_progress() == 1)
                code, details = _code(lambda: acme.upload_adapter(qv, "blocked"))
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
                assert "limit 1, this tenant's max_uploads in the tenants file" in details
                assert globex.upload_adapter(qv, "one").version == 1
            finally:
                release.set()
            with pytest.raises(grpc.RpcError):
                stalled.result(30)
        assert wait_until(lambda: uploads.in_progress() == 0)
        # max_adapters: acme may store one.
        assert acme.upload_adapter(qv, "one").version == 1
        code, details = _code(lambda: acme.upload_adapter(qv, "two"))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "limit 1, this tenant's max_adapters in the tenants file" in details
        assert acme.upload_adapter(qv, "one").version == 2  # a re-upload replaces: allowed
        # max_adapter_bytes: globex stores one adapter's bytes, not two.
        code, details = _code(lambda: globex.upload_adapter(qv, "two"))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert f"limit {size * 3 // 2}, this tenant's max_adapter_bytes" in details
        assert [a.name for a in acme.list_adapters()] == ["one"]
        assert [a.name for a in globex.list_adapters()] == ["one"]
        # Refused uploads are still served from what is stored.
        assert acme.generate("hi", adapter="one", max_new_tokens=2).finish_reason
    # root sets nothing: the server default (3 adapters) applies.
    with client_for(server, "root") as root:
        for name in ("a", "b", "c"):
            assert root.upload_adapter(qv, name).version == 1
        code, details = _code(lambda: root.upload_adapter(qv, "d"))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit 3, the server default --tenant-max-adapters" in details, details


def test_sighup_reloads_the_limits_of_a_running_process(
    model_cache: Path, default_model: Path, tmp_path: Path, adapter_dirs: dict[str, Path]
) -> None:
    qv = adapter_dirs["qv"]
    tenants = _write(tmp_path / "tenants.toml", {"acme": "max_adapters = 1\n"})
    server = ServerProcess(
        ["--model", str(default_model), "--no-metrics", "--data-dir", str(tmp_path / "d"),
         "--tenants", str(tenants), "--access-log", "", "--max-lora-rank", "32"],
        tmp_path / "serve.log",
        {"LORASERVE_CACHE": str(model_cache)},
    )  # fmt: skip
    try:
        server.start(120)
        with client_for(server, "acme") as acme:
            assert acme.upload_adapter(qv, "one").version == 1
            code, details = _code(lambda: acme.upload_adapter(qv, "two"))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
            assert "limit 1, this tenant's max_adapters" in details
            _write(tenants, {"acme": "max_adapters = 2\n"})
            server.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            while _code(lambda: acme.upload_adapter(qv, "two"))[0] != grpc.StatusCode.OK:
                assert time.monotonic() < deadline, "SIGHUP did not reload the limits"
                time.sleep(0.1)
            # A bad file (a boolean limit) is refused with a log line; the limit 2 stays.
            _write(tenants, {"acme": "max_adapters = true\n"})
            server.send_signal(signal.SIGHUP)
            assert wait_until(lambda: "tenants reload failed" in server.output(), 20)
            assert "[tenants.acme]: max_adapters must be a whole number" in server.output()
            code, details = _code(lambda: acme.upload_adapter(qv, "three"))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
            assert "limit 2, this tenant's max_adapters" in details
            assert sorted(a.name for a in acme.list_adapters()) == ["one", "two"]
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0, server.output()
    finally:
        server.kill()
