"""`loraserve serve-ray` on a real local Ray instance: 2 replicas, CPU, the embedded tiny model.

Run by test_ray_cluster.py inside a private network namespace (Ray listens on every interface;
there the only one is loopback). One cluster for the whole module; the replica-kill case runs
last. Everything goes through the real client, against the ingress or (to check what each
replica sees) a replica's own loopback server, found under <data_dir>/replicas/.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from serving_support import KEYS, AdapterShape, make_peft_adapter

from loraserve.client.config import ClientConfig
from loraserve.client.sync import LoraServeClient
from loraserve.server.background import BackgroundServer
from loraserve.server.config import ServerConfig
from loraserve.server.ray.replica import ReplicaInfo, read_replicas
from loraserve.server.tenants import hash_key
from loraserve.testing.tiny_model import default_model_path

pytestmark = pytest.mark.skipif(
    os.environ.get("LORASERVE_PRIVATE_NETNS") != "1",
    reason="run by tests/ray/test_ray_cluster.py inside a private network namespace",
)

LIMITS = ["--max-lora-rank", "32", "--max-new-tokens", "1000", "--max-seq-len", "1024"]
TENANT_MAX_ADAPTERS = 5
PROMPTS = ["The capital of", "Once upon a time"]
# (tenant, adapter name) -> adapter shape; globex reuses a name of acme's on purpose.
ADAPTERS = {
    ("acme", "qv"): AdapterShape(rank=8, alpha=16, targets=["q_proj", "v_proj"], seed=21),
    ("acme", "mlp"): AdapterShape(rank=4, alpha=8, targets=["gate_proj", "down_proj"], seed=22),
    ("acme", "wide"): AdapterShape(rank=16, alpha=16, targets="all-linear", seed=23),
    ("globex", "qv"): AdapterShape(rank=8, alpha=8, targets=["q_proj", "o_proj"], seed=24),
    ("globex", "solo"): AdapterShape(rank=8, alpha=32, targets=["up_proj"], seed=25),
}


@dataclass
class Cluster:
    target: str
    data_dir: Path
    process: subprocess.Popen[str]

    def client(self, tenant: str | None, target: str | None = None) -> LoraServeClient:
        key = None if tenant is None else KEYS.get(tenant, tenant)
        return LoraServeClient(
            ClientConfig(target=target or self.target, api_key=key, timeout_s=120)
        )

    def replicas(self) -> list[ReplicaInfo]:
        return [r for r in read_replicas(self.data_dir) if _alive(r.pid)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def model(model_cache: Path) -> Path:
    return default_model_path(model_cache)


@pytest.fixture(scope="module")
def tenants_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tenants") / "tenants.toml"
    path.write_text(
        "".join(f'[tenants.{t}]\napi_keys = ["{hash_key(KEYS[t])}"]\n' for t in ("acme", "globex"))
    )
    return path


@pytest.fixture(scope="module")
def adapter_dirs(model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("adapters")
    return {
        key: make_peft_adapter(model, root / f"{key[0]}-{key[1]}", shape)
        for key, shape in ADAPTERS.items()
    }


@pytest.fixture(scope="module")
def reference(model: Path, tenants_file: Path, adapter_dirs: dict, tmp_path_factory) -> dict:
    """Greedy completions of every (tenant, adapter, prompt) from one ordinary server."""
    config = ServerConfig(
        model_path=model,
        port=0,
        metrics_port=None,
        data_dir=tmp_path_factory.mktemp("single"),
        tenants_file=tenants_file,
        device="cpu",
        max_lora_rank=32,
        max_new_tokens_limit=1000,
        max_seq_len=1024,
        access_log="",
    )
    server = BackgroundServer(config).start(120)
    results = {}
    try:
        for (tenant, name), directory in adapter_dirs.items():
            with LoraServeClient(ClientConfig(target=server.target, api_key=KEYS[tenant])) as c:
                c.upload_adapter(directory, name)
                for prompt in PROMPTS:
                    response = c.generate(prompt, adapter=name, max_new_tokens=12)
                    results[tenant, name, prompt] = list(response.token_ids)
                    base = c.generate(prompt, max_new_tokens=12)
                    results[tenant, "", prompt] = list(base.token_ids)
    finally:
        server.stop()
    return results


@pytest.fixture(scope="module")
def cluster(model: Path, tenants_file: Path, tmp_path_factory) -> Iterator[Cluster]:
    data_dir = tmp_path_factory.mktemp("cluster-data")
    command = [
        sys.executable,
        "-m",
        "loraserve",
        "serve-ray",
        "--replicas",
        "2",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--model",
        str(model),
        "--data-dir",
        str(data_dir),
        "--tenants",
        str(tenants_file),
        "--device",
        "cpu",
        "--access-log",
        str(data_dir / "access.log"),
        "--grace-seconds",
        "5",
        "--tenant-max-adapters",
        str(TENANT_MAX_ADAPTERS),
        *LIMITS,
    ]
    log = open(data_dir / "serve-ray.log", "w")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    line = _first_line(process, 240)
    if "serving on" not in line:
        process.kill()
        log.close()
        pytest.fail(f"serve-ray did not start:\n{(data_dir / 'serve-ray.log').read_text()[-4000:]}")
    port = int(line.split("serving on ")[1].split()[0].rsplit(":", 1)[1])
    yield Cluster(f"127.0.0.1:{port}", data_dir, process)
    process.send_signal(signal.SIGTERM)  # drains the ingress, then the replicas
    try:
        code = process.wait(90)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    finally:
        log.close()
    assert code == 0


@pytest.fixture(scope="module")
def uploaded(cluster: Cluster, adapter_dirs: dict) -> dict:
    """Every adapter uploaded through the ingress (client-streaming, forwarded)."""
    infos = {}
    for (tenant, name), directory in adapter_dirs.items():
        with cluster.client(tenant) as c:
            infos[tenant, name] = c.upload_adapter(directory, name)
    return infos


def test_health_and_two_replicas_registered(cluster: Cluster) -> None:
    with cluster.client("acme") as c:
        c.wait_until_serving(30)
        c.wait_until_serving(30, service="loraserve.v1.Inference")
        assert c.server_info().tenant == "acme"
    assert len(cluster.replicas()) == 2


def test_generations_match_the_single_server(
    cluster: Cluster, uploaded: dict, reference: dict
) -> None:
    replica_ids = {r.replica for r in cluster.replicas()}
    for tenant, name in ADAPTERS:
        assert uploaded[tenant, name].version == 1
        with cluster.client(tenant) as c:
            assert name in {a.name for a in c.list_adapters()}
            for prompt in PROMPTS:
                response = c.generate(prompt, adapter=name, max_new_tokens=12)
                assert list(response.token_ids) == reference[tenant, name, prompt]
                assert response.adapter_version == 1
                assert response.served_by in replica_ids
                base = c.generate(prompt, max_new_tokens=12)
                assert list(base.token_ids) == reference[tenant, "", prompt]
                stream = list(c.generate_stream(prompt, adapter=name, max_new_tokens=12))
                assert [t for m in stream for t in m.token_ids] == reference[tenant, name, prompt]
                assert stream[-1].served_by in replica_ids
                assert all(not m.served_by for m in stream[:-1])
    logged = [
        json.loads(line) for line in (cluster.data_dir / "access.log").read_text().splitlines()
    ]
    assert {rec["served_by"] for rec in logged if rec["rpc"] == "Generate"} <= replica_ids


def test_same_adapter_lands_on_the_same_replica(cluster: Cluster, adapter_dirs: dict) -> None:
    """Affinity, measured: after an adapter's first request, where do the next ones go?

    Fresh adapters: one that earlier tests used may already be resident on both replicas (two
    requests for an adapter nobody holds yet can both arrive before Serve learns where the
    first went), and Serve then rightly spreads it over both.
    """
    fresh = [("acme", "aff-a"), ("acme", "aff-b"), ("globex", "aff-c"), ("globex", "aff-d")]
    fresh.append(("globex", "aff-e"))
    sources = list(adapter_dirs.values())
    for i, (tenant, name) in enumerate(fresh):
        with cluster.client(tenant) as c:
            c.upload_adapter(sources[i % len(sources)], name)
    first: dict[tuple[str, str], str] = {}
    for tenant, name in fresh:
        with cluster.client(tenant) as c:
            first[tenant, name] = c.generate("warm", adapter=name, max_new_tokens=2).served_by
    time.sleep(2.0)  # replicas report the adapters they hold to Serve asynchronously
    landed: collections.Counter[bool] = collections.Counter()
    misses: list[str] = []

    def one(item: tuple[int, tuple[str, str]]) -> bool:
        round_, key = item
        with cluster.client(key[0]) as c:
            served = c.generate("again", adapter=key[1], max_new_tokens=8).served_by
        if served != first[key]:
            misses.append(f"round {round_} {key[0]}/{key[1]}")
        return served == first[key]

    with ThreadPoolExecutor(4) as pool:
        for same in pool.map(one, [(i, key) for i in range(8) for key in fresh]):
            landed[same] += 1
    share = landed[True] / sum(landed.values())
    print(
        f"affinity: {landed[True]}/{sum(landed.values())} = {share:.3f} on the first replica; "
        f"misses: {misses}"
    )
    for tenant, name in fresh:  # back under the tenant quota the later cases rely on
        with cluster.client(tenant) as c:
            c.delete_adapter(name)
    assert share >= 0.9


def test_another_tenants_adapter_is_not_found_through_the_ingress(
    cluster: Cluster, uploaded: dict
) -> None:
    with cluster.client("globex") as c:
        with pytest.raises(grpc.RpcError) as err:
            c.generate("hi", adapter="mlp", max_new_tokens=2)  # acme's
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            c.get_adapter("wide")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # The same name in two tenants: each gets its own.
        assert c.get_adapter("qv").sha256 == uploaded["globex", "qv"].sha256
    with cluster.client("not-a-key") as c, pytest.raises(grpc.RpcError) as err:
        c.generate("hi", max_new_tokens=2)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_new_versions_and_deletes_are_seen_by_every_replica(
    cluster: Cluster, adapter_dirs: dict
) -> None:
    replicas = cluster.replicas()
    assert len(replicas) == 2
    with cluster.client("acme") as ingress:
        for version in (1, 2, 3):
            info = ingress.upload_adapter(adapter_dirs["acme", "qv"], "rolling")
            assert info.version == version
            for replica in replicas:  # each replica's own server, directly
                with cluster.client("acme", f"127.0.0.1:{replica.grpc_port}") as direct:
                    response = direct.generate("hi", adapter="rolling", max_new_tokens=2)
                    assert response.adapter_version == version
                    assert response.served_by == replica.replica
        ingress.delete_adapter("rolling")
    for replica in replicas:
        with cluster.client("acme", f"127.0.0.1:{replica.grpc_port}") as direct:
            for call in (
                lambda: direct.generate("hi", adapter="rolling", max_new_tokens=2),
                lambda: direct.get_adapter("rolling"),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_rollback_and_version_deletes_are_seen_by_every_replica(
    cluster: Cluster, adapter_dirs: dict
) -> None:
    """name@N, ListAdapterVersions, RollbackAdapter and DeleteAdapter(name@N) via the ingress."""
    replicas = cluster.replicas()
    with cluster.client("acme") as ingress:
        assert ingress.upload_adapter(adapter_dirs["acme", "qv"], "pinned").version == 1
        assert ingress.upload_adapter(adapter_dirs["acme", "mlp"], "pinned").version == 2
        assert ingress.rollback_adapter("pinned", 1).latest
        versions = ingress.list_adapter_versions("pinned")
        assert [(v.version, v.latest) for v in versions] == [(1, True), (2, False)]
        assert ingress.get_adapter("pinned@2").version == 2
        pinned = ingress.generate("hi", adapter="pinned@2", max_new_tokens=2)
        assert pinned.adapter_version == 2
        for replica in replicas:  # the rollback is on the shared disk: every replica sees it
            with cluster.client("acme", f"127.0.0.1:{replica.grpc_port}") as direct:
                assert (
                    direct.generate("hi", adapter="pinned", max_new_tokens=2).adapter_version == 1
                )
                assert (
                    direct.generate("hi", adapter="pinned@2", max_new_tokens=2).adapter_version == 2
                )
        assert ingress.delete_adapter("pinned@1").latest
        for replica in replicas:
            with cluster.client("acme", f"127.0.0.1:{replica.grpc_port}") as direct:
                assert (
                    direct.generate("hi", adapter="pinned", max_new_tokens=2).adapter_version == 2
                )
                with pytest.raises(grpc.RpcError) as err:
                    direct.generate("hi", adapter="pinned@1", max_new_tokens=2)
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with cluster.client("globex") as other, pytest.raises(grpc.RpcError) as err:
        other.rollback_adapter("pinned", 2)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with cluster.client("acme") as ingress:
        ingress.delete_adapter("pinned")


def test_the_adapter_quota_holds_across_replicas(cluster: Cluster, adapter_dirs: dict) -> None:
    """Uploads land on either replica; each counts the tenant's adapters in the shared store."""
    directory = adapter_dirs["acme", "mlp"]
    with cluster.client("acme") as c:
        extra = [f"extra-{i}" for i in range(TENANT_MAX_ADAPTERS - len(c.list_adapters()))]
        for name in extra:
            c.upload_adapter(directory, name)
        for _ in range(6):  # uploads and lists go to the less loaded of the two replicas
            with pytest.raises(grpc.RpcError) as err:
                c.upload_adapter(directory, "one-too-many")
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for name in extra:
            c.delete_adapter(name)
        assert len(c.list_adapters()) == TENANT_MAX_ADAPTERS - len(extra)


def test_every_replica_exports_metrics_as_its_own_target(cluster: Cluster) -> None:
    for replica in cluster.replicas():
        target = json.loads(
            (cluster.data_dir / "metrics-targets" / f"{replica.replica}.json").read_text()
        )
        assert target == [
            {
                "targets": [f"{replica.metrics_host}:{replica.metrics_port}"],
                "labels": {"replica": replica.replica},
            }
        ]
        url = f"http://{replica.metrics_host}:{replica.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        assert "loraserve_requests_total" in text


def test_a_second_ingress_attaches_to_the_running_application(
    cluster: Cluster, tenants_file: Path, uploaded: dict
) -> None:
    """What the KubeRay manifest's ingress container does: front an app deployed elsewhere."""
    command = [
        sys.executable,
        "-m",
        "loraserve",
        "serve-ray",
        "--attach",
        "--address",
        "auto",
        "--port",
        "0",
        "--tenants",
        str(tenants_file),
        "--data-dir",
        str(cluster.data_dir),
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        line = _first_line(process, 120)
        assert line and "serving on" in line, line
        target = "127.0.0.1:" + line.split("serving on ")[1].split()[0].rsplit(":", 1)[1]
        replica_ids = {r.replica for r in cluster.replicas()}
        with cluster.client("globex", target) as c:
            response = c.generate("through the second door", adapter="solo", max_new_tokens=4)
            assert response.served_by in replica_ids
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    # Leaving did not take the application down.
    with cluster.client("globex") as c:
        assert c.generate("still here", adapter="solo", max_new_tokens=2).served_by


def _first_line(process: subprocess.Popen[str], timeout: float) -> str:
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return lines[0] if lines else ""


def test_killing_a_replica_fails_only_its_in_flight_calls(cluster: Cluster, uploaded: dict) -> None:
    """Runs last: SIGKILL one replica's process while both stream long completions."""
    replicas = cluster.replicas()
    victim = replicas[0]
    started = threading.Semaphore(0)
    keys = [key for _ in range(2) for key in ADAPTERS] + [("acme", "")] * 4

    def stream(key: tuple[str, str]) -> tuple[str, str]:
        with cluster.client(key[0]) as c:
            try:
                last = None
                for i, message in enumerate(
                    c.generate_stream("x", adapter=key[1], max_new_tokens=900, ignore_eos=True)
                ):
                    if i == 0:
                        started.release()
                    last = message
                assert last is not None
                return "OK", last.served_by
            except grpc.RpcError as exc:
                return exc.code().name, ""

    with ThreadPoolExecutor(len(keys)) as pool:
        futures = [pool.submit(stream, key) for key in keys]
        for _ in keys:
            assert started.acquire(timeout=120)
        os.kill(victim.pid, signal.SIGKILL)
        outcomes = [f.result() for f in futures]
    failed = [code for code, _ in outcomes if code != "OK"]
    print(f"after the kill: {len(failed)} of {len(outcomes)} in-flight streams failed")
    assert failed, "the killed replica had no call in flight"
    assert set(failed) == {"UNAVAILABLE"}
    assert all(served != victim.replica for code, served in outcomes if code == "OK")
    # New calls succeed on the survivor at once, whatever the adapter.
    for tenant, name in ADAPTERS:
        with cluster.client(tenant) as c:
            assert c.generate("after", adapter=name, max_new_tokens=4).served_by != victim.replica
    # Serve brings the replica back: a new one registers and answers on its own port.
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        fresh = [r for r in cluster.replicas() if r.replica not in {x.replica for x in replicas}]
        if fresh:
            break
        time.sleep(1)
    else:
        pytest.fail("Serve did not replace the killed replica")
    with cluster.client("acme", f"127.0.0.1:{fresh[0].grpc_port}") as c:
        assert c.generate("back", adapter="qv", max_new_tokens=4).served_by == fresh[0].replica
    assert len(cluster.replicas()) == 2
