"""Client cancellation, deadlines and graceful drain, end to end.

The first tests run a real server in a thread and look inside its engine: a request whose client
goes away (closed stream, expired deadline) must leave the running batch promptly, free its KV
row and adapter pin, and stop producing tokens, while other requests in the batch finish whole.
The last test runs `loraserve serve` as a subprocess and SIGTERMs it mid-stream: health turns
NOT_SERVING (or the port closes), new calls are refused with UNAVAILABLE, the in-flight stream
completes within the grace period, and the process exits 0.
"""

from __future__ import annotations

import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from serving_support import client_for

from loraserve.client.config import ClientConfig
from loraserve.client.sync import LoraServeClient
from loraserve.server.background import BackgroundServer, ServerProcess
from loraserve.server.config import ServerConfig
from loraserve.v1 import inference_pb2

LONG = 1000
"""max_new_tokens of requests meant to be cut short: seconds of work on the tiny model."""

ADAPTER = "drain-qv"


@pytest.fixture(scope="module")
def srv(
    default_model: Path,
    tenants_file: Path,
    adapter_dirs: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[BackgroundServer]:
    config = ServerConfig(
        model_path=default_model,
        port=0,
        metrics_port=0,
        data_dir=tmp_path_factory.mktemp("drain-data"),
        tenants_file=tenants_file,
        access_log="",
    )
    thread = BackgroundServer(config).start()
    try:
        with client_for(thread, "acme") as acme:
            acme.upload_adapter(adapter_dirs["qv"], ADAPTER)
        yield thread
    finally:
        thread.stop()


def _samples(server: BackgroundServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    port = server.server.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _metric(server: BackgroundServer, name: str, **labels: str) -> float:
    return _samples(server).get((name, tuple(sorted(labels.items()))), 0.0)


def _wait_until(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.02)


def _tenant_running(server: BackgroundServer, tenant: str) -> int:
    return sum(1 for s in server.server.runtime.engine.scheduler.running if s.tenant == tenant)


def _pins(server: BackgroundServer) -> dict[object, int]:
    return server.server.runtime.engine.device_pool.resident()


def _assert_gone(server: BackgroundServer, tenant: str, *, batch_empty: bool) -> None:
    """`tenant`'s requests left the batch, released their pins and stopped making tokens."""
    _wait_until(lambda: _tenant_running(server, tenant) == 0, f"{tenant} to leave the batch")
    _wait_until(lambda: all(p == 0 for p in _pins(server).values()), "adapter pins to drop")
    if batch_empty:
        assert server.server.runtime.engine.scheduler.running == []
        _wait_until(
            lambda: _metric(server, "loraserve_requests_running") == 0, "requests_running == 0"
        )
    first = _metric(server, "loraserve_generated_tokens_total", tenant=tenant)
    time.sleep(0.5)
    assert _metric(server, "loraserve_generated_tokens_total", tenant=tenant) == first


def _start_stream(server: BackgroundServer, client: LoraServeClient) -> Iterator[object]:
    """A long adapter stream, read until it is decoding and holds its adapter pin."""
    stream = client.generate_stream(
        "tell me", adapter=ADAPTER, max_new_tokens=LONG, ignore_eos=True
    )
    for _ in range(3):
        next(stream)
    assert _tenant_running(server, "acme") == 1
    assert sum(_pins(server).values()) == 1
    return stream


def test_closed_stream_leaves_the_batch(srv: BackgroundServer) -> None:
    before = _metric(srv, "loraserve_requests_total", tenant="acme", outcome="cancelled")
    with client_for(srv, "acme") as acme:
        stream = _start_stream(srv, acme)
        stream.close()  # type: ignore[attr-defined]  # the client goes away mid-generation
        _assert_gone(srv, "acme", batch_empty=True)
    _wait_until(
        lambda: (
            _metric(srv, "loraserve_requests_total", tenant="acme", outcome="cancelled")
            == before + 1
        ),
        "the cancelled outcome",
    )


def test_deadline_exceeded_leaves_the_batch(srv: BackgroundServer) -> None:
    before = _metric(srv, "loraserve_requests_total", tenant="acme", outcome="deadline")
    with client_for(srv, "acme") as acme:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            acme.generate(
                "tell me", adapter=ADAPTER, max_new_tokens=LONG, ignore_eos=True, timeout_s=0.3
            )
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 5
        _assert_gone(srv, "acme", batch_empty=True)
    _wait_until(
        lambda: (
            _metric(srv, "loraserve_requests_total", tenant="acme", outcome="deadline")
            == before + 1
        ),
        "the deadline outcome",
    )


def test_batch_neighbours_are_unaffected(srv: BackgroundServer) -> None:
    results: list[inference_pb2.GenerateResponse] = []
    errors: list[BaseException] = []

    def neighbour() -> None:
        try:
            with client_for(srv, "globex") as globex:
                results.append(globex.generate("keep going", max_new_tokens=LONG, ignore_eos=True))
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=neighbour, daemon=True)
    worker.start()
    try:
        _wait_until(lambda: _tenant_running(srv, "globex") == 1, "the neighbour to run")
        with client_for(srv, "acme") as acme:
            stream = _start_stream(srv, acme)
            assert len(srv.server.runtime.engine.scheduler.running) == 2  # one batch
            stream.close()  # type: ignore[attr-defined]
            with pytest.raises(grpc.RpcError) as err:
                acme.generate(
                    "tell me", adapter=ADAPTER, max_new_tokens=LONG, ignore_eos=True, timeout_s=0.3
                )
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            _assert_gone(srv, "acme", batch_empty=False)
        # The cuts happened while the neighbour was still generating in the same batch.
        assert worker.is_alive() and _tenant_running(srv, "globex") == 1
    finally:
        worker.join(60)
    assert not worker.is_alive() and not errors, errors
    (response,) = results
    assert len(response.token_ids) == LONG and response.usage.completion_tokens == LONG
    assert response.finish_reason == inference_pb2.FINISH_REASON_LENGTH
    _wait_until(lambda: srv.server.runtime.engine.scheduler.running == [], "an empty batch")


# ---- graceful drain of a real process ------------------------------------------------------

DRAIN_TOKENS = 300
"""About 1 s on the tiny default model on an idle machine: still running at SIGTERM."""

GRACE = 30.0
"""Far longer than the stream needs even on a machine shared by several test runs (with 5 s, a
2-core machine running four suites at once cut it short). The server stops as soon as the
stream ends, so the margin costs nothing; what is tested is that the stream ends whole."""


def _health(target: str) -> str:
    """The overall health status, or the gRPC code name when the call itself fails."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2
            )
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_sigterm_drains_in_flight_stream(model_cache: Path, tmp_path: Path) -> None:
    server = ServerProcess(
        ["--model", "embedded", "--no-metrics", "--data-dir", str(tmp_path / "d"),
         "--grace-seconds", str(GRACE), "--access-log", ""],
        tmp_path / "serve.log",
        {"LORASERVE_CACHE": str(model_cache)},
    )  # fmt: skip
    try:
        target = server.start(120).target
        messages: list[inference_pb2.GenerateStreamResponse] = []
        times: list[float] = []
        failures: list[BaseException] = []
        first = threading.Event()
        with LoraServeClient(ClientConfig(target=target, timeout_s=60)) as client:
            client.generate("warm up", max_new_tokens=4, ignore_eos=True)

            def read() -> None:
                try:
                    stream = client.generate_stream(
                        "drain me", max_new_tokens=DRAIN_TOKENS, ignore_eos=True
                    )
                    for message in stream:
                        messages.append(message)
                        times.append(time.monotonic())
                        first.set()
                except BaseException as exc:
                    failures.append(exc)
                finally:
                    first.set()

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            assert first.wait(30) and not failures, failures
            sigterm_at = time.monotonic()
            server.send_signal(signal.SIGTERM)

            # Health stops saying SERVING at once: NOT_SERVING, or (the port stops taking new
            # calls at once) the probe is refused or cut off. (The deadline only bounds the
            # wait: on a busy machine the signal itself may take a moment to be handled.)
            deadline = time.monotonic() + 10
            while (status := _health(target)) == "SERVING":
                assert time.monotonic() < deadline, "still SERVING after SIGTERM"
                time.sleep(0.02)
            assert status in ("NOT_SERVING", "UNAVAILABLE", "CANCELLED"), status

            # A new call is refused, on a fresh channel and on the draining one: UNAVAILABLE,
            # where a call left waiting would end DEADLINE_EXCEEDED.
            for caller in ("fresh", "draining"):
                with pytest.raises(grpc.RpcError) as err:
                    if caller == "fresh":
                        with LoraServeClient(ClientConfig(target=target, timeout_s=5)) as other:
                            other.generate("too late", max_new_tokens=4)
                    else:
                        client.generate("too late", max_new_tokens=4, timeout_s=5)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (caller, err.value)
            refused_at = time.monotonic()

            reader.join(GRACE + 5)
            assert not reader.is_alive(), "the in-flight stream did not finish"
        assert not failures, failures
        tokens = [t for m in messages for t in m.token_ids]
        assert len(tokens) == DRAIN_TOKENS
        assert messages[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
        assert messages[-1].usage.completion_tokens == DRAIN_TOKENS
        # The stream really was in flight across SIGTERM (new calls were refused meanwhile; on a
        # busy machine the stream may end before the second refusal is checked), ended in grace.
        assert times[0] < sigterm_at < times[-1]
        assert refused_at > sigterm_at
        assert times[-1] - sigterm_at < GRACE
        assert server.wait(timeout=GRACE + 15) == 0, server.output()
    finally:
        server.kill()
