"""A real Prometheus (Debian package `prometheus`) scrapes loraserve with deploy/prometheus.yml.

Installs nothing itself: .ci/run installs the package; without it this test FAILS (no skip).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from serving_support import client_for

from loraserve.server.background import BackgroundServer
from loraserve.server.config import ServerConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def loraserve(
    default_model: Path, tenants_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BackgroundServer]:
    config = ServerConfig(
        model_path=default_model,
        port=0,
        metrics_port=0,
        data_dir=tmp_path_factory.mktemp("prom-data"),
        tenants_file=tenants_file,
        price_per_device_hour=10.0,
        access_log="",
    )
    thread = BackgroundServer(config).start()
    yield thread
    thread.stop()


def _port_for_prometheus() -> int:
    """A free port for the Prometheus binary, which does not report a port-0 bind it made.

    loraserve's own servers bind port 0 and report it; this third-party binary is the one
    listener the tests must name in advance.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def prometheus(
    loraserve: BackgroundServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus missing: install the Debian package 'prometheus' (.ci/run does)"
    root = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    config["rule_files"] = [str(REPO / "deploy" / f) for f in config.get("rule_files", [])]
    jobs = [j for j in config["scrape_configs"] if j["job_name"] == "loraserve"]
    assert len(jobs) == 1, "deploy/prometheus.yml must have one job named loraserve"
    jobs[0]["scrape_interval"] = "1s"
    jobs[0]["static_configs"] = [{"targets": [f"127.0.0.1:{loraserve.server.metrics_port}"]}]
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _port_for_prometheus()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={root / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else "exited"
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def query(url: str, promql: str) -> dict[str, float]:
    """Instant query; {tenant label (or ""): value}."""
    q = urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return {s["metric"].get("tenant", ""): float(s["value"][1]) for s in body["data"]["result"]}


def wait_for(url: str, promql: str, expected: dict[str, float], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    got: dict[str, float] = {}
    while time.monotonic() < deadline:
        got = query(url, promql)
        if all(abs(got.get(k, -1) - v) < 1e-9 for k, v in expected.items()):
            return
        time.sleep(0.5)
    raise AssertionError(f"{promql}: expected {expected}, Prometheus has {got}")


def test_prometheus_scrapes_per_tenant_tokens_latency_and_cost(
    loraserve: BackgroundServer, prometheus: str, adapter_dirs: dict[str, Path]
) -> None:
    reported: dict[str, list] = {"acme": [], "globex": []}
    with client_for(loraserve, "acme") as acme, client_for(loraserve, "globex") as globex:
        acme.upload_adapter(adapter_dirs["mlp"], "heavy")
        for _ in range(4):
            reported["acme"].append(
                acme.generate("a heavy job", adapter="heavy", max_new_tokens=32, ignore_eos=True)
            )
        for _ in range(2):
            reported["globex"].append(globex.generate("light", max_new_tokens=2, ignore_eos=True))
    tokens = {t: float(sum(r.usage.completion_tokens for r in rs)) for t, rs in reported.items()}
    wait_for(prometheus, "sum by (tenant) (loraserve_generated_tokens_total)", tokens)
    counts = {t: float(len(rs)) for t, rs in reported.items()}
    wait_for(prometheus, "sum by (tenant) (loraserve_time_to_first_token_seconds_count)", counts)
    cost = query(prometheus, "sum by (tenant) (loraserve_tenant_cost_total)")
    assert cost["acme"] > cost["globex"] > 0
    assert query(prometheus, "up")[""] == 1
