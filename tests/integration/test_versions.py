"""Adapter versions through the real server and client: name@N, versions, rollback, deletes.

Two different adapters are uploaded under one name, so each version generates its own tokens
and a test can tell from the output which version served it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import grpc
import pytest
from serving_support import KEYS, client_for

from loraserve.cli import main as cli_main
from loraserve.client.aio import AsyncLoraServeClient
from loraserve.client.config import ClientConfig
from loraserve.client.sync import LoraServeClient
from loraserve.server.background import BackgroundServer
from loraserve.server.config import ServerConfig
from loraserve.v1 import adapters_pb2, adapters_pb2_grpc

PROMPT = "versions"
TOKENS = 8
_names = itertools.count()


def _tokens(client: LoraServeClient, adapter: str, n: int = TOKENS) -> list[int]:
    return list(
        client.generate(PROMPT, adapter=adapter, max_new_tokens=n, ignore_eos=True).token_ids
    )


def _code(fn) -> tuple[grpc.StatusCode, str]:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _drain(client: LoraServeClient, adapter: str) -> None:
    list(client.generate_stream(PROMPT, adapter=adapter, max_new_tokens=1))


@pytest.fixture
def two_versions(acme: LoraServeClient, adapter_dirs: dict[str, Path]) -> Iterator[str]:
    """A fresh name with v1 = the qv adapter and v2 = the mlp adapter (the latest)."""
    name = f"ver-{next(_names)}"
    assert acme.upload_adapter(adapter_dirs["qv"], name).version == 1
    assert acme.upload_adapter(adapter_dirs["mlp"], name).version == 2
    yield name
    _code(lambda: acme.delete_adapter(name))


def test_name_at_version_pins_an_older_version(acme: LoraServeClient, two_versions: str) -> None:
    name = two_versions
    latest = acme.generate(PROMPT, adapter=name, max_new_tokens=TOKENS, ignore_eos=True)
    pinned = acme.generate(PROMPT, adapter=f"{name}@1", max_new_tokens=TOKENS, ignore_eos=True)
    assert (latest.adapter_version, pinned.adapter_version) == (2, 1)
    assert list(pinned.token_ids) != list(latest.token_ids), "the two versions are different"
    assert _tokens(acme, f"{name}@2") == list(latest.token_ids)
    stream = list(
        acme.generate_stream(PROMPT, adapter=f"{name}@1", max_new_tokens=TOKENS, ignore_eos=True)
    )
    assert [t for m in stream for t in m.token_ids] == list(pinned.token_ids)
    assert stream[-1].adapter_version == 1
    # GetAdapter and ListAdapterVersions agree on which is the latest.
    old, new = acme.get_adapter(f"{name}@1"), acme.get_adapter(name)
    assert (old.version, old.latest, new.version, new.latest) == (1, False, 2, True)
    versions = acme.list_adapter_versions(name)
    assert [(v.version, v.latest) for v in versions] == [(1, False), (2, True)]
    assert [v.rank for v in versions] == [8, 4] and all(len(v.sha256) == 64 for v in versions)
    assert [a.version for a in acme.list_adapters() if a.name == name] == [2]


def test_rollback_changes_what_the_plain_name_serves(
    acme: LoraServeClient, two_versions: str, adapter_dirs: dict[str, Path]
) -> None:
    name = two_versions
    v1_tokens, v2_tokens = _tokens(acme, f"{name}@1"), _tokens(acme, name)  # both now cached
    info = acme.rollback_adapter(name, 1)
    assert (info.name, info.version, info.latest) == (name, 1, True)
    response = acme.generate(PROMPT, adapter=name, max_new_tokens=TOKENS, ignore_eos=True)
    assert response.adapter_version == 1 and list(response.token_ids) == v1_tokens
    assert _tokens(acme, f"{name}@2") == v2_tokens  # still stored and servable
    assert acme.get_adapter(name).version == 1
    assert [v.latest for v in acme.list_adapter_versions(name)] == [True, False]
    assert acme.rollback_adapter(name, 1).version == 1  # idempotent
    # A later upload is max+1 and the latest.
    assert acme.upload_adapter(adapter_dirs["qv"], name).version == 3
    assert acme.generate(PROMPT, adapter=name, max_new_tokens=2).adapter_version == 3
    acme.rollback_adapter(name, 2)
    assert _tokens(acme, name) == v2_tokens


def test_a_running_stream_keeps_its_version_across_rollback_and_delete(
    server: BackgroundServer, acme: LoraServeClient, two_versions: str
) -> None:
    name = two_versions
    wanted = 240  # long enough to still be decoding after the rollback and delete return
    alone = _tokens(acme, name, wanted)
    stream = acme.generate_stream(PROMPT, adapter=name, max_new_tokens=wanted, ignore_eos=True)
    first = next(stream)
    assert first.adapter_version == 2
    acme.rollback_adapter(name, 1)
    deleted = acme.delete_adapter(f"{name}@2")
    assert (deleted.version, deleted.latest) == (2, False)
    metrics = server.server.metrics  # type: ignore[union-attr]
    assert metrics.registry.get_sample_value("loraserve_requests_running") == 1, (
        "the stream finished before the rollback and delete, so this test proves nothing"
    )
    rest = list(stream)
    assert [t for m in (first, *rest) for t in m.token_ids] == alone
    assert rest[-1].adapter_version == 2
    # New requests see the rollback and the delete.
    assert acme.generate(PROMPT, adapter=name, max_new_tokens=2).adapter_version == 1
    code, _ = _code(lambda: acme.generate(PROMPT, adapter=f"{name}@2", max_new_tokens=2))
    assert code == grpc.StatusCode.NOT_FOUND
    engine = server.server.runtime.engine  # type: ignore[union-attr]
    assert not any(k.name == name and k.version == 2 for k in engine.host_cache.resident())


def test_deleting_the_latest_version_promotes_the_newest_remaining(
    acme: LoraServeClient, two_versions: str, adapter_dirs: dict[str, Path]
) -> None:
    name = two_versions
    assert acme.upload_adapter(adapter_dirs["qv"], name).version == 3
    acme.rollback_adapter(name, 2)
    deleted = acme.delete_adapter(f"{name}@2")
    assert (deleted.version, deleted.latest) == (2, True)
    assert acme.get_adapter(name).version == 3
    assert [v.version for v in acme.list_adapter_versions(name)] == [1, 3]
    acme.delete_adapter(f"{name}@3")
    acme.delete_adapter(f"{name}@1")  # the only one left: the adapter is gone
    assert _code(lambda: acme.get_adapter(name))[0] == grpc.StatusCode.NOT_FOUND
    assert name not in {a.name for a in acme.list_adapters()}
    assert acme.upload_adapter(adapter_dirs["qv"], name).version == 4  # never reused


BAD_FORMS = ["@", "@0", "@01", "@+1", "@-1", "@x", "@1@2", "@1.0", "@ 1", "@" + "9" * 19]


def test_malformed_versions_are_invalid_argument(acme: LoraServeClient, two_versions: str) -> None:
    name = two_versions
    for suffix in BAD_FORMS:
        text = name + suffix
        for call in (
            partial(acme.generate, PROMPT, adapter=text, max_new_tokens=1),
            partial(_drain, acme, text),
            partial(acme.get_adapter, text),
            partial(acme.delete_adapter, text),
        ):
            code, details = _code(call)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (text, code, details)
            assert "version" in details or "must not be empty" in details, details
    for call in (
        lambda: acme.list_adapter_versions(f"{name}@1"),
        lambda: acme.rollback_adapter(f"{name}@1", 1),
        lambda: acme.rollback_adapter(name, 0),
    ):
        assert _code(call)[0] == grpc.StatusCode.INVALID_ARGUMENT
    # Nothing was deleted or changed, and the server keeps serving.
    assert [(v.version, v.latest) for v in acme.list_adapter_versions(name)] == [
        (1, False),
        (2, True),
    ]
    assert acme.generate(PROMPT, adapter=name, max_new_tokens=1).adapter_version == 2


def test_missing_versions_and_other_tenants_are_not_found_alike(
    acme: LoraServeClient, globex: LoraServeClient, two_versions: str
) -> None:
    name = two_versions
    nobody = "nobody-has-this"
    for client, adapter in ((acme, f"{name}@9"), (globex, f"{name}@1"), (acme, f"{nobody}@1")):
        calls = {
            "generate": partial(client.generate, PROMPT, adapter=adapter, max_new_tokens=1),
            "stream": partial(_drain, client, adapter),
            "get": partial(client.get_adapter, adapter),
            "delete": partial(client.delete_adapter, adapter),
        }
        for what, call in calls.items():
            code, details = _code(call)
            assert code == grpc.StatusCode.NOT_FOUND, (what, adapter, details)
            assert details == f"adapter {adapter!r} not found", details
            assert "acme" not in details
    for client, adapter, version in ((acme, name, 9), (globex, name, 1), (acme, nobody, 1)):
        code, details = _code(partial(client.rollback_adapter, adapter, version))
        assert (code, details) == (
            grpc.StatusCode.NOT_FOUND,
            f"adapter {adapter + '@' + str(version)!r} not found",
        )
    for client, adapter in ((globex, name), (acme, nobody)):
        code, details = _code(partial(client.list_adapter_versions, adapter))
        assert (code, details) == (grpc.StatusCode.NOT_FOUND, f"adapter {adapter!r} not found")
    assert [v.version for v in acme.list_adapter_versions(name)] == [1, 2]


def test_admin_acts_only_for_configured_tenants(
    admin: LoraServeClient, acme: LoraServeClient, two_versions: str
) -> None:
    name = two_versions
    assert [v.version for v in admin.list_adapter_versions(name, tenant="acme")] == [1, 2]
    assert admin.rollback_adapter(name, 1, tenant="acme").version == 1
    assert acme.get_adapter(name).version == 1
    for call in (
        lambda: admin.list_adapter_versions(name, tenant="initech"),
        lambda: admin.rollback_adapter(name, 1, tenant="initech"),
    ):
        code, details = _code(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "tenants file" in details


def test_cli_versions_rollback_get_delete_and_generate(
    server: BackgroundServer,
    acme: LoraServeClient,
    two_versions: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name = two_versions
    base = ["--target", server.target, "--api-key", KEYS["acme"]]

    def cli(*argv: str) -> dict:
        assert cli_main([*base, *argv, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    listed = cli("adapters", "versions", name)["versions"]
    assert [(v["version"], v["latest"]) for v in listed] == [(1, False), (2, True)]
    assert cli("adapters", "rollback", name, "--to", "1")["latest"]
    assert cli("adapters", "get", name)["version"] == 1
    assert cli("adapters", "get", f"{name}@2")["latest"] is False
    out = cli("generate", "--adapter", f"{name}@2", "--max-new-tokens", "2", PROMPT)
    assert out["adapter_version"] == 2
    assert cli("adapters", "delete", f"{name}@2")["version"] == 2
    assert cli_main([*base, "adapters", "versions", name]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["VERSION", "LATEST"] and table[1].split()[:2] == ["1", "*"]
    assert cli_main([*base, "adapters", "rollback", name, "--to", "2"]) == 1  # NOT_FOUND
    assert "NOT_FOUND" in capsys.readouterr().err
    assert cli_main([*base, "adapters", "rollback", name, "--to", "0"]) == 2  # usage error
    assert "not a version number" in capsys.readouterr().err


def test_the_asyncio_client_lists_versions_and_rolls_back(
    server: BackgroundServer, two_versions: str
) -> None:
    name = two_versions

    async def run() -> tuple[list[tuple[int, bool]], int, int]:
        config = ClientConfig(target=server.target, api_key=KEYS["acme"], timeout_s=60)
        async with AsyncLoraServeClient(config) as client:
            rolled = await client.rollback_adapter(name, 1)
            versions = await client.list_adapter_versions(name)
            pinned = await client.get_adapter(f"{name}@2")
            return [(v.version, v.latest) for v in versions], rolled.version, pinned.version

    assert asyncio.run(run()) == ([(1, True), (2, False)], 1, 2)


def test_raw_rpcs_need_a_key(server: BackgroundServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = adapters_pb2_grpc.AdaptersStub(channel)
        for call in (
            lambda: stub.ListAdapterVersions(adapters_pb2.ListAdapterVersionsRequest(name="a")),
            lambda: stub.RollbackAdapter(adapters_pb2.RollbackAdapterRequest(name="a")),
        ):
            assert _code(call)[0] == grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture
def quota_server(
    default_model: Path, tenants_file: Path, tmp_path: Path, adapter_dirs: dict[str, Path]
) -> Iterator[tuple[ServerConfig, int]]:
    size = (adapter_dirs["qv"] / "adapter_model.safetensors").stat().st_size
    config = ServerConfig(
        model_path=default_model,
        port=0,
        metrics_port=None,
        data_dir=tmp_path / "data",
        tenants_file=tenants_file,
        max_lora_rank=32,
        max_adapter_bytes=4 * 1024 * 1024,
        adapter_versions_kept=2,
        tenant_max_adapter_bytes=size * 5 // 2,  # two versions fit, three do not
    )
    yield config, size


def test_quota_counts_kept_versions_and_rollback_survives_a_restart(
    quota_server: tuple[ServerConfig, int], adapter_dirs: dict[str, Path]
) -> None:
    config, _ = quota_server
    server = BackgroundServer(config).start()
    try:
        with client_for(server, "acme") as acme:
            for expected in (1, 2, 3):  # the third prunes v1: two kept versions, still fits
                assert acme.upload_adapter(adapter_dirs["qv"], "a").version == expected
            assert [v.version for v in acme.list_adapter_versions("a")] == [2, 3]
            # A second name would make three kept versions' bytes on disk.
            code, details = _code(lambda: acme.upload_adapter(adapter_dirs["qv"], "b"))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--tenant-max-adapter-bytes" in details
            assert [a.name for a in acme.list_adapters()] == ["a"]
            acme.rollback_adapter("a", 2)
    finally:
        server.stop()
    # The rollback is on disk: a restarted server serves v2 for plain "a".
    restarted = BackgroundServer(dataclasses.replace(config)).start()
    try:
        with client_for(restarted, "acme") as acme:
            assert acme.get_adapter("a").version == 2
            assert acme.generate(PROMPT, adapter="a", max_new_tokens=2).adapter_version == 2
            assert [(v.version, v.latest) for v in acme.list_adapter_versions("a")] == [
                (2, True),
                (3, False),
            ]
            # Deleting a version frees its bytes: now a second name fits.
            acme.delete_adapter("a@3")
            assert acme.upload_adapter(adapter_dirs["qv"], "b").version == 1
            # A new version of "a" would keep a@2 (two kept) beside b: three versions' bytes.
            code, _ = _code(lambda: acme.upload_adapter(adapter_dirs["qv"], "a"))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert [(v.version, v.latest) for v in acme.list_adapter_versions("a")] == [(2, True)]
    finally:
        restarted.stop()
