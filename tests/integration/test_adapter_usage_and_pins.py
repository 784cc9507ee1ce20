"""Per-adapter usage (AdapterInfo.usage) and pins (PinAdapter, --preload) through the real server.

The server's device adapter budget is five pages: `qv` (rank 8) and `mlp` (rank 4) adapters take
one page each, `wide` (rank 32) four. Its host tier keeps only the adapter loaded last, so an
adapter pushed off the device is on disk only. Prices are 1 per device-second, so cost equals
compute seconds.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_support import KEYS, client_for, integration_config

from loraserve.cli import main as cli_main
from loraserve.client.results import adapter_info_to_dict
from loraserve.client.sync import LoraServeClient
from loraserve.server import app as app_module
from loraserve.server.background import BackgroundServer
from loraserve.server.config import ConfigError, ServerConfig
from loraserve.server.engine.model import load_base_model
from loraserve.v1 import adapters_pb2

DEVICE, HOST, DISK = (
    adapters_pb2.RESIDENCY_DEVICE,
    adapters_pb2.RESIDENCY_HOST,
    adapters_pb2.RESIDENCY_DISK,
)
PAGES = 5
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def page_bytes(default_model: Path) -> int:
    """Device bytes of one adapter page (rank 8 across every LoRA layer) of the test model."""
    loaded = load_base_model(default_model, device="cpu", dtype="auto")
    itemsize = next(iter(loaded.lora_layers.values())).base_layer.weight.element_size()
    return sum(layer.page_bytes(8, itemsize) for layer in loaded.lora_layers.values())


def config_for(
    default_model: Path, tenants_file: Path, data_dir: Path, page_bytes: int, **changes: object
) -> ServerConfig:
    config = integration_config(
        default_model,
        tenants_file,
        data_dir,
        adapter_device_bytes=PAGES * page_bytes + page_bytes - 1,
        adapter_host_bytes=1,
        price_per_device_hour=3600.0,
    )
    return dataclasses.replace(config, **changes)


@pytest.fixture(scope="module")
def pool_server(
    default_model: Path,
    tenants_file: Path,
    page_bytes: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[BackgroundServer]:
    data_dir = tmp_path_factory.mktemp("usage-data")
    thread = BackgroundServer(config_for(default_model, tenants_file, data_dir, page_bytes)).start()
    yield thread
    thread.stop()


@pytest.fixture
def clients(pool_server: BackgroundServer) -> Iterator[dict[str, LoraServeClient]]:
    with (
        client_for(pool_server, "acme") as acme,
        client_for(pool_server, "globex") as globex,
        client_for(pool_server, "root") as root,
    ):
        yield {"acme": acme, "globex": globex, "root": root}


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details() or ""


def gauge(server: BackgroundServer, name: str, labels: dict[str, str]) -> float | None:
    assert server.server is not None
    return server.server.metrics.registry.get_sample_value(name, labels)


def health_of(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status


def resident(client: LoraServeClient, name: str, tenant: str = "") -> int:
    return client.get_adapter(name, tenant=tenant).usage.resident


def generate(client: LoraServeClient, adapter: str, tokens: int = 2):
    return client.generate("hello there", adapter=adapter, max_new_tokens=tokens, ignore_eos=True)


def test_usage_counts_each_tenants_requests_and_equals_their_responses(
    clients: dict[str, LoraServeClient], adapter_dirs: dict[str, Path]
) -> None:
    acme, globex, root = clients["acme"], clients["globex"], clients["root"]
    acme.upload_adapter(adapter_dirs["qv"], "u-acme")
    globex.upload_adapter(adapter_dirs["mlp"], "u-globex")
    fresh = acme.get_adapter("u-acme").usage
    assert (fresh.requests, fresh.completion_tokens, fresh.last_used) == (0, 0, 0.0)

    before = time.time()
    responses = [generate(acme, "u-acme", n) for n in (3, 4, 5)]
    *_, last = acme.generate_stream("a streamed one", adapter="u-acme", max_new_tokens=2)
    acme_usages = [r.usage for r in responses] + [last.usage]
    generate(acme, "")  # the base model counts for no adapter
    globex_usages = [generate(globex, "u-globex", n).usage for n in (2, 6)]
    after = time.time()

    for client, name, usages in (
        (acme, "u-acme", acme_usages),
        (globex, "u-globex", globex_usages),
    ):
        usage = client.get_adapter(name).usage
        assert usage.requests == len(usages)
        assert usage.prompt_tokens == sum(u.prompt_tokens for u in usages)
        assert usage.completion_tokens == sum(u.completion_tokens for u in usages)
        expected_compute = sum(u.compute_seconds for u in usages)
        assert expected_compute > 0
        assert usage.compute_seconds == pytest.approx(expected_compute, rel=1e-9)
        assert usage.cost == pytest.approx(sum(u.cost for u in usages), rel=1e-9)
        assert usage.cost == pytest.approx(usage.compute_seconds, rel=1e-9)  # 1 per second
        assert before <= usage.last_used <= after
        assert usage.resident == DEVICE
        listed = {a.name: a for a in client.list_adapters()}
        assert listed[name].usage == usage

    # Each tenant sees only its own; an admin sees any tenant's by naming it.
    assert [a.name for a in globex.list_adapters()] == ["u-globex"]
    assert code_of(lambda: globex.get_adapter("u-acme"))[0] == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: acme.get_adapter("u-globex", tenant="globex"))[0] == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert root.get_adapter("u-acme", tenant="acme").usage == acme.get_adapter("u-acme").usage

    # A re-upload keeps the name's totals (summed over versions); a delete drops them.
    uploaded = acme.upload_adapter(adapter_dirs["qv"], "u-acme")
    assert uploaded.usage.requests == len(acme_usages)  # the upload's answer says so too
    assert uploaded.usage.resident != adapters_pb2.RESIDENCY_UNSPECIFIED
    assert acme.get_adapter("u-acme").usage.requests == len(acme_usages)
    generate(acme, "u-acme")
    assert acme.get_adapter("u-acme").usage.requests == len(acme_usages) + 1
    acme.delete_adapter("u-acme")
    acme.upload_adapter(adapter_dirs["qv"], "u-acme")
    assert acme.get_adapter("u-acme").usage.requests == 0
    acme.delete_adapter("u-acme")
    globex.delete_adapter("u-globex")


def test_residency_moves_off_the_device_under_pressure_and_pins_hold(
    pool_server: BackgroundServer,
    clients: dict[str, LoraServeClient],
    adapter_dirs: dict[str, Path],
    page_bytes: int,
) -> None:
    acme, root = clients["acme"], clients["root"]
    for name, shape in (("r1", "qv"), ("r2", "mlp"), ("big", "wide")):
        acme.upload_adapter(adapter_dirs[shape], name)
    try:
        assert resident(acme, "r1") == DISK
        generate(acme, "r1")
        assert resident(acme, "r1") == DEVICE
        generate(acme, "r2")
        generate(acme, "big")  # 4 pages: r1, least recently used, is evicted
        assert resident(acme, "r1") == DISK  # the host tier keeps only the last one loaded
        assert (resident(acme, "r2"), resident(acme, "big")) == (DEVICE, DEVICE)

        # An admin pin loads r1 and keeps it through pressure that evicts everything else.
        info = root.pin_adapter("r1", tenant="acme")
        assert info.pinned and info.usage.resident == DEVICE and info.name == "r1"
        assert gauge(pool_server, "loraserve_adapter_pinned_bytes", {"tenant": "acme"}) == (
            page_bytes
        )
        assert gauge(pool_server, "loraserve_adapter_pinned_bytes", {"tenant": "globex"}) == 0
        for name in ("r2", "big", "r2", "big"):
            generate(acme, name)
            assert resident(acme, "r1") == DEVICE
        assert resident(acme, "r2") != DEVICE, "big pushed r2 out, never the pinned r1"
        assert acme.get_adapter("r1").pinned

        # big (4 pages) fits beside r1 (1 page): the budget is then all pinned.
        root.pin_adapter("big", tenant="acme")
        code, details = code_of(lambda: root.pin_adapter("r2", tenant="acme"))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"needs {page_bytes} bytes" in details and "only 0 bytes" in details
        assert not acme.get_adapter("r2").pinned
        # A request for an adapter that cannot fit beside the pins is refused, not queued.
        code, details = code_of(lambda: generate(acme, "r2"))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "pinned" in details
        generate(acme, "big")  # pinned adapters serve as usual

        # Unpinning makes big evictable again.
        info = root.unpin_adapter("big", tenant="acme")
        assert not info.pinned and info.usage.resident == DEVICE
        generate(acme, "r2")
        assert resident(acme, "big") != DEVICE
        assert gauge(pool_server, "loraserve_adapter_pinned_bytes", {"tenant": "acme"}) == (
            page_bytes
        )
        # Unpinning what is not pinned is harmless.
        assert not root.unpin_adapter("big", tenant="acme").pinned
    finally:
        for name in ("r1", "r2", "big"):
            acme.delete_adapter(name)
    assert gauge(pool_server, "loraserve_adapter_pinned_bytes", {"tenant": "acme"}) == 0


def test_a_pin_by_name_follows_the_latest_version_and_a_version_pin_stays(
    pool_server: BackgroundServer,
    clients: dict[str, LoraServeClient],
    adapter_dirs: dict[str, Path],
    page_bytes: int,
) -> None:
    acme, root = clients["acme"], clients["root"]
    acme.upload_adapter(adapter_dirs["qv"], "follow")
    acme.upload_adapter(adapter_dirs["qv"], "fixed")
    root.pin_adapter("follow", tenant="acme")
    assert root.pin_adapter("fixed@1", tenant="acme").pinned
    pinned = gauge(pool_server, "loraserve_adapter_pinned_bytes", {"tenant": "acme"})
    assert pinned == 2 * page_bytes

    # Plain name: the new version is loaded and pinned, the old one released.
    assert acme.upload_adapter(adapter_dirs["qv"], "follow").version == 2
    info = acme.get_adapter("follow")
    assert (info.version, info.pinned, info.usage.resident) == (2, True, DEVICE)
    assert not acme.get_adapter("follow@1").pinned
    # A rollback moves it to the version that is the latest again.
    assert acme.rollback_adapter("follow", 1).pinned
    assert not acme.get_adapter("follow@2").pinned
    # name@N: the pin holds that version across uploads (it stays stored), and ends with it.
    acme.upload_adapter(adapter_dirs["qv"], "fixed")
    assert acme.get_adapter("fixed@1").pinned and not acme.get_adapter("fixed").pinned
    assert gauge(pool_server, "loraserve_adapter_pinned_bytes", {"tenant": "acme"}) == pinned
    acme.delete_adapter("fixed@1")
    assert gauge(pool_server, "loraserve_adapter_pinned_bytes", {"tenant": "acme"}) == page_bytes
    # Deleting the pinned latest version moves the name's pin to the new latest.
    acme.delete_adapter("follow@1")
    info = acme.get_adapter("follow")
    assert (info.version, info.pinned) == (2, True)
    assert gauge(pool_server, "loraserve_adapter_pinned_bytes", {"tenant": "acme"}) == page_bytes

    # A delete succeeds and drops the pin; a re-upload of the name is not pinned.
    assert acme.delete_adapter("follow").name == "follow"
    assert gauge(pool_server, "loraserve_adapter_pinned_bytes", {"tenant": "acme"}) == 0
    acme.upload_adapter(adapter_dirs["qv"], "follow")
    assert not acme.get_adapter("follow").pinned
    acme.delete_adapter("follow")
    acme.delete_adapter("fixed")


def test_pin_is_admin_only_and_names_an_existing_adapter(
    clients: dict[str, LoraServeClient], adapter_dirs: dict[str, Path]
) -> None:
    acme, root = clients["acme"], clients["root"]
    acme.upload_adapter(adapter_dirs["mlp"], "mine")
    try:
        for call in (
            lambda: acme.pin_adapter("mine", tenant="acme"),
            lambda: acme.unpin_adapter("mine", tenant="acme"),
            lambda: acme.pin_adapter("mine", tenant=""),
        ):
            code, details = code_of(call)
            assert code == grpc.StatusCode.PERMISSION_DENIED and "admin" in details
        assert not acme.get_adapter("mine").pinned
        cases = {
            ("nope", "acme"): grpc.StatusCode.NOT_FOUND,
            ("mine", "globex"): grpc.StatusCode.NOT_FOUND,
            ("mine@2", "acme"): grpc.StatusCode.NOT_FOUND,
            ("mine@x", "acme"): grpc.StatusCode.INVALID_ARGUMENT,
            ("mine", ""): grpc.StatusCode.INVALID_ARGUMENT,
            ("mine", "initech"): grpc.StatusCode.INVALID_ARGUMENT,
        }
        for (name, tenant), expected in cases.items():
            assert code_of(lambda n=name, t=tenant: root.pin_adapter(n, tenant=t))[0] == expected
        # Nothing was pinned, and the server keeps serving.
        assert not acme.get_adapter("mine").pinned
        assert generate(acme, "mine").usage.completion_tokens == 2
    finally:
        acme.delete_adapter("mine")


def test_no_metric_family_has_an_adapter_label(
    pool_server: BackgroundServer,
    clients: dict[str, LoraServeClient],
    adapter_dirs: dict[str, Path],
) -> None:
    acme, root = clients["acme"], clients["root"]
    acme.upload_adapter(adapter_dirs["qv"], "labelcheck")
    generate(acme, "labelcheck")
    root.pin_adapter("labelcheck", tenant="acme")
    try:
        assert pool_server.server is not None
        families = list(pool_server.server.metrics.registry.collect())
        assert any(f.name == "loraserve_adapter_pinned_bytes" for f in families)
        for family in families:
            for sample in family.samples:
                assert not {"adapter", "adapter_name", "name"} & set(sample.labels), sample
                assert "labelcheck" not in sample.labels.values(), sample
    finally:
        acme.delete_adapter("labelcheck")


def test_json_output_carries_usage_and_pin(
    clients: dict[str, LoraServeClient], adapter_dirs: dict[str, Path]
) -> None:
    acme, root = clients["acme"], clients["root"]
    acme.upload_adapter(adapter_dirs["qv"], "shown")
    try:
        generate(acme, "shown", 3)
        fields = adapter_info_to_dict(root.pin_adapter("shown", tenant="acme"))
        assert fields["pinned"] is True
        assert fields["usage"]["requests"] == 1
        assert fields["usage"]["completion_tokens"] == 3
        assert fields["usage"]["resident"] == "device"
    finally:
        acme.delete_adapter("shown")


# ---- --preload ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def preload_dir(
    default_model: Path,
    tenants_file: Path,
    page_bytes: int,
    adapter_dirs: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """A data directory holding acme's `pre` (one page) and `huge` (four pages)."""
    data_dir = tmp_path_factory.mktemp("preload-data")
    thread = BackgroundServer(config_for(default_model, tenants_file, data_dir, page_bytes)).start()
    try:
        with client_for(thread, "acme") as acme:
            acme.upload_adapter(adapter_dirs["qv"], "pre")
            acme.upload_adapter(adapter_dirs["wide"], "huge")
    finally:
        thread.stop()
    return data_dir


def test_preload_pins_before_serving(
    default_model: Path,
    tenants_file: Path,
    page_bytes: int,
    preload_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = config_for(
        default_model, tenants_file, preload_dir, page_bytes, preload=("acme/pre", "acme/huge@1")
    )
    thread = BackgroundServer(config)
    seen: list[object] = []
    real_preload = app_module.preload_adapters

    def watched(config, service, engine) -> None:
        assert thread.server is not None
        seen.append(health_of(thread.server.port))
        real_preload(config, service, engine)
        seen.append(sorted(k.name for k in engine.device_pool.held()))
        # Loaded (this runs off the event loop, which answers the health check meanwhile).
        seen.append(health_of(thread.server.port))

    monkeypatch.setattr(app_module, "preload_adapters", watched)
    thread.start()
    try:
        assert seen == [NOT_SERVING, ["huge", "pre"], NOT_SERVING]
        assert health_of(thread.port) == SERVING
        with client_for(thread, "acme") as acme:
            for name in ("pre", "huge"):
                info = acme.get_adapter(name)
                assert info.pinned and info.usage.resident == DEVICE
        assert gauge(thread, "loraserve_adapter_pinned_bytes", {"tenant": "acme"}) == (
            5 * page_bytes
        )
    finally:
        thread.stop()


@pytest.mark.parametrize(
    ("preload", "needle"),
    [
        (("acme/missing",), "--preload acme/missing: tenant 'acme' has no adapter 'missing'"),
        (("globex/pre",), "--preload globex/pre: tenant 'globex' has no adapter 'pre'"),
        (("acme/pre@7",), "--preload acme/pre@7"),
    ],
)
def test_a_missing_preload_fails_the_start(
    default_model: Path,
    tenants_file: Path,
    page_bytes: int,
    preload_dir: Path,
    preload: tuple[str, ...],
    needle: str,
) -> None:
    config = config_for(default_model, tenants_file, preload_dir, page_bytes, preload=preload)
    with pytest.raises(ConfigError) as caught:
        BackgroundServer(config).start()
    assert needle in str(caught.value)


def test_a_preload_that_does_not_fit_fails_the_start(
    default_model: Path, tenants_file: Path, page_bytes: int, preload_dir: Path
) -> None:
    config = config_for(
        default_model,
        tenants_file,
        preload_dir,
        page_bytes,
        adapter_device_bytes=3 * page_bytes,
        preload=("acme/huge",),
    )
    with pytest.raises(ConfigError) as caught:
        BackgroundServer(config).start()
    message = str(caught.value)
    assert "--preload acme/huge" in message and f"needs {4 * page_bytes} bytes" in message


@pytest.mark.parametrize(
    ("preload", "needle"),
    [
        ("acme/missing", "--preload acme/missing: tenant 'acme' has no adapter 'missing'"),
        ("no-slash", "preload: 'no-slash': must be TENANT/NAME"),
    ],
)
def test_serve_exits_2_on_a_bad_preload(
    model_cache: Path,
    default_model: Path,
    tenants_file: Path,
    preload_dir: Path,
    preload: str,
    needle: str,
) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "loraserve",
            "serve",
            "--model",
            str(default_model),
            "--tenants",
            str(tenants_file),
            "--data-dir",
            str(preload_dir),
            "--port",
            "0",
            "--no-metrics",
            "--preload",
            preload,
        ],
        env={"LORASERVE_CACHE": str(model_cache), "HF_HUB_OFFLINE": "1", "PATH": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr and "Traceback" not in result.stderr


def test_cli_pin_unpin_and_usage_in_get_and_list(
    pool_server: BackgroundServer,
    clients: dict[str, LoraServeClient],
    adapter_dirs: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    acme = clients["acme"]
    acme.upload_adapter(adapter_dirs["qv"], "clipin")

    def cli(tenant: str, *argv: str) -> tuple[int, str, str]:
        code = cli_main(["--target", pool_server.target, "--api-key", KEYS[tenant], *argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    try:
        generate(acme, "clipin", 3)
        code, out, _ = cli("root", "adapters", "pin", "clipin", "--tenant", "acme", "--json")
        assert code == 0
        pinned = json.loads(out)
        assert pinned["pinned"] is True and pinned["usage"]["resident"] == "device"

        code, out, _ = cli("acme", "adapters", "get", "clipin")
        assert code == 0
        assert "usage: 1 requests" in out and "3 completion tokens" in out
        assert "since server start" in out and "resident: device (pinned)" in out

        code, out, _ = cli("acme", "adapters", "list")
        header, row = out.splitlines()
        assert "REQUESTS" in header and "RESIDENT" in header
        assert row.split()[0] == "clipin" and "device (pinned)" in row

        code, _, err = cli("acme", "adapters", "pin", "clipin", "--tenant", "acme")
        assert code == 1 and "PERMISSION_DENIED" in err

        code, out, _ = cli("root", "adapters", "unpin", "clipin", "--tenant", "acme", "--json")
        assert code == 0 and json.loads(out)["pinned"] is False
        assert cli("root", "adapters", "pin", "clipin")[0] == 2, "--tenant is required"
    finally:
        acme.delete_adapter("clipin")
