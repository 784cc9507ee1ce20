"""Per-tenant latency and cost metrics on a real scrape, per-response usage, the access log."""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving_support import client_for

from loraserve.server.background import BackgroundServer
from loraserve.server.config import ServerConfig

PRICE_PER_DEVICE_HOUR = 36.0  # 0.01 per second: easy to check by hand


@pytest.fixture(scope="module")
def metered(
    default_model: Path, tenants_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BackgroundServer]:
    root = tmp_path_factory.mktemp("metered")
    config = ServerConfig(
        model_path=default_model,
        port=0,
        metrics_port=0,
        data_dir=root / "data",
        tenants_file=tenants_file,
        price_per_device_hour=PRICE_PER_DEVICE_HOUR,
        price_per_gb_hour=1000.0,
        access_log=str(root / "access.log"),
    )
    thread = BackgroundServer(config).start()
    yield thread
    thread.stop()


def scrape(server: BackgroundServer) -> str:
    port = server.server.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(data: dict, name: str, **labels: str) -> float:
    return data.get((name, tuple(sorted(labels.items()))), 0.0)


def test_tenant_metrics_usage_and_access_log(
    metered: BackgroundServer, adapter_dirs: dict[str, Path]
) -> None:
    with client_for(metered, "acme") as acme, client_for(metered, "globex") as globex:
        acme.upload_adapter(adapter_dirs["qv"], "billing")
        responses = {"acme": [], "globex": []}
        for _ in range(3):
            responses["acme"].append(
                acme.generate("count me", adapter="billing", max_new_tokens=20, ignore_eos=True)
            )
        responses["globex"].append(globex.generate("me too", max_new_tokens=4, ignore_eos=True))
        with pytest.raises(grpc.RpcError):
            globex.generate("x", adapter="billing")  # NOT_FOUND for globex
    with client_for(metered, "wrong-key") as stranger, pytest.raises(grpc.RpcError):
        stranger.generate("x")

    data = samples(scrape(metered))
    for tenant, got in responses.items():
        completion = sum(r.usage.completion_tokens for r in got)
        prompt = sum(r.usage.prompt_tokens for r in got)
        assert value(data, "loraserve_generated_tokens_total", tenant=tenant) == completion
        assert value(data, "loraserve_prompt_tokens_total", tenant=tenant) == prompt
        assert value(data, "loraserve_time_to_first_token_seconds_count", tenant=tenant) == len(got)
        assert value(data, "loraserve_requests_total", tenant=tenant, outcome="ok") == len(got)
        # Per-response usage carries compute and its price; they add up to the tenant's counters.
        compute = math.fsum(r.usage.compute_seconds for r in got)
        assert all(r.usage.compute_seconds > 0 for r in got)
        assert value(data, "loraserve_tenant_compute_seconds_total", tenant=tenant) == (
            pytest.approx(compute, rel=1e-6)
        )
        for r in got:
            assert r.usage.cost == pytest.approx(r.usage.compute_seconds * 0.01)
    assert value(data, "loraserve_requests_total", tenant="globex", outcome="not_found") == 1
    assert value(data, "loraserve_requests_total", tenant="-", outcome="unauthenticated") == 1
    # Attributed compute of all tenants equals the engine's busy time.
    busy = value(data, "loraserve_engine_busy_seconds_total")
    tenants = ("acme", "globex", "root")
    attributed = math.fsum(
        value(data, "loraserve_tenant_compute_seconds_total", tenant=t) for t in tenants
    )
    assert attributed == pytest.approx(busy, rel=1e-6)
    # The heavier tenant costs more; adapter memory is billed to its owner only.
    cost = {t: value(data, "loraserve_tenant_cost_total", tenant=t) for t in tenants}
    assert cost["acme"] > cost["globex"] > 0
    assert value(data, "loraserve_tenant_adapter_byte_seconds_total", tenant="acme") > 0
    assert value(data, "loraserve_tenant_adapter_byte_seconds_total", tenant="globex") == 0
    assert value(data, "loraserve_adapter_uploads_total", tenant="acme", outcome="ok") == 1
    assert value(data, "loraserve_adapters_stored", tenant="acme") == 1
    assert value(data, "loraserve_adapters_resident", tier="device") == 1
    assert value(data, "loraserve_adapter_cache_lookups_total", tier="device", result="miss") == 1
    assert value(data, "loraserve_adapter_cache_lookups_total", tier="device", result="hit") == 2
    info = [k for k in data if k[0] == "loraserve_build_info"]
    assert len(info) == 1 and ("currency", "USD") in info[0][1]

    lines = [json.loads(x) for x in Path(metered.config.access_log).read_text().splitlines()]
    ok = [x for x in lines if x["status"] == "ok"]
    assert len(ok) == 4 and {x["tenant"] for x in ok} == {"acme", "globex"}
    for line in ok:
        assert {"request_id", "adapter", "completion_tokens", "ttft_seconds", "cost"} <= set(line)
        assert "prompt" not in line and "completion" not in line
    assert "count me" not in Path(metered.config.access_log).read_text()
    assert {x["status"] for x in lines} == {"ok", "not_found", "unauthenticated"}


def test_promtool_accepts_a_real_scrape(metered: BackgroundServer) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: install the Debian package 'prometheus' (.ci/run does)"
    text = scrape(metered)
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr


def test_cancelled_and_deadline_outcomes_are_counted(metered: BackgroundServer) -> None:
    def outcome(tenant: str, name: str) -> float:
        return value(
            samples(scrape(metered)), "loraserve_requests_total", tenant=tenant, outcome=name
        )

    before_cancel, before_deadline = outcome("globex", "cancelled"), outcome("globex", "deadline")
    with client_for(metered, "globex") as globex:
        stream = globex.generate_stream("long", max_new_tokens=1000, ignore_eos=True)
        next(stream)
        stream.close()  # the client goes away mid-generation
        with pytest.raises(grpc.RpcError) as err:
            globex.generate("long", max_new_tokens=1000, ignore_eos=True, timeout_s=0.2)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 10
    while (outcome("globex", "cancelled"), outcome("globex", "deadline")) != (
        before_cancel + 1,
        before_deadline + 1,
    ):
        assert time.monotonic() < deadline, "cancel/deadline outcomes were not recorded"
        time.sleep(0.05)


def test_served_by_names_this_server_in_responses_and_access_log(metered: BackgroundServer) -> None:
    with client_for(metered, "acme") as c:
        response = c.generate("who served me", max_new_tokens=3)
        stream = list(c.generate_stream("who served me", max_new_tokens=3))
    assert response.served_by == socket.gethostname()  # no replica_id configured
    assert stream[-1].served_by == socket.gethostname()
    assert all(not m.served_by for m in stream[:-1])
    lines = [json.loads(x) for x in Path(metered.config.access_log).read_text().splitlines()]
    mine = [x for x in lines if x["request_id"] == response.request_id]
    assert len(mine) == 1 and mine[0]["served_by"] == socket.gethostname()
