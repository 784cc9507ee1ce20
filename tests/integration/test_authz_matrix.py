"""Authorization matrix: every RPC x every kind of caller gets exactly the documented outcome.

The owner is tenant `acme`, the other tenant is `globex`, the admin is `root`. Each case
starts from a known state: the owner's adapter is (re-)uploaded under a name unique to the
case with the real client, then one raw-stub call is made with explicit metadata, and
afterwards the owner's adapter is checked to be untouched unless an allowed call deleted or
replaced it. A final test checks the whole module's leftovers against a ledger of the cases.

Outcomes:
  * no key / wrong key: UNAUTHENTICATED, for every RPC;
  * own tenant: OK;
  * other tenant naming the owner's adapter (Generate/GenerateStream/Get/Delete/
    ListAdapterVersions/RollbackAdapter by name, and the `name@N` forms): NOT_FOUND, with a
    message that neither names the owner nor differs from the message for a name nobody has;
  * other tenant setting `tenant` to the owner (Upload/List/Get/Delete/versions/rollback):
    PERMISSION_DENIED;
  * admin setting `tenant` to the owner (Upload/List/Get/Delete/versions/rollback): OK.
    Generate has no tenant field and runs as the caller, so an admin naming the owner's
    adapter gets NOT_FOUND, as does an admin's Get/Delete/versions/rollback without the
    tenant field.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from serving_support import KEYS, client_for

from loraserve.client.sync import LoraServeClient
from loraserve.client.upload import plan_upload, upload_requests
from loraserve.server.background import BackgroundServer
from loraserve.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc

OWNER, OTHER, ADMIN = "acme", "globex", "root"
PREFIX = "authz-"
TIMEOUT_S = 30.0
Code = grpc.StatusCode

Metadata = tuple[tuple[str, str], ...]


def _bearer(key: str) -> Metadata:
    return (("authorization", f"Bearer {key}"),)


@dataclass(frozen=True)
class Caller:
    """Who calls, with which key, and what the `tenant` field of the request says."""

    metadata: Metadata
    tenant_field: str
    """Value of the request's `tenant` field (where the RPC has one)."""
    acts_as: str | None
    """The tenant the server should act for when the call is allowed."""
    key_tenant: str | None
    """The tenant the key authenticates as (what RPCs without a tenant field act for)."""


CALLERS: dict[str, Caller] = {
    "no_key": Caller((), OWNER, None, None),
    "wrong_key": Caller(_bearer("not-a-real-key"), OWNER, None, None),
    "other_tenant": Caller(_bearer(KEYS[OTHER]), "", OTHER, OTHER),
    "other_tenant_as_owner": Caller(_bearer(KEYS[OTHER]), OWNER, None, OTHER),
    "own_tenant": Caller(_bearer(KEYS[OWNER]), "", OWNER, OWNER),
    "admin": Caller(_bearer(KEYS[ADMIN]), OWNER, OWNER, ADMIN),
    "admin_without_tenant": Caller(_bearer(KEYS[ADMIN]), "", ADMIN, ADMIN),
}


@dataclass(frozen=True)
class Stubs:
    adapters: adapters_pb2_grpc.AdaptersStub
    inference: inference_pb2_grpc.InferenceStub


@dataclass(frozen=True)
class Call:
    """Everything one RPC call needs."""

    stubs: Stubs
    name: str
    """The owner's adapter, named by the request."""
    caller: Caller
    adapter_dir: Path


def _generate(call: Call) -> Any:
    return call.stubs.inference.Generate(
        _generate_request(call.name), metadata=call.caller.metadata, timeout=TIMEOUT_S
    )


def _generate_stream(call: Call) -> Any:
    messages = list(
        call.stubs.inference.GenerateStream(
            _generate_request(call.name), metadata=call.caller.metadata, timeout=TIMEOUT_S
        )
    )
    assert messages, "the stream ended without a message"
    return messages[-1]


def _generate_request(adapter: str) -> inference_pb2.GenerateRequest:
    sampling = inference_pb2.SamplingParams(max_new_tokens=2, ignore_eos=True)
    return inference_pb2.GenerateRequest(adapter=adapter, prompt="hello", sampling=sampling)


def _server_info(call: Call) -> Any:
    return call.stubs.inference.GetServerInfo(
        inference_pb2.GetServerInfoRequest(), metadata=call.caller.metadata, timeout=TIMEOUT_S
    )


def _upload(call: Call) -> Any:
    plan = plan_upload(call.adapter_dir, call.name, tenant=call.caller.tenant_field)
    return call.stubs.adapters.UploadAdapter(
        upload_requests(plan), metadata=call.caller.metadata, timeout=TIMEOUT_S
    )


def _list(call: Call) -> Any:
    return call.stubs.adapters.ListAdapters(
        adapters_pb2.ListAdaptersRequest(tenant=call.caller.tenant_field),
        metadata=call.caller.metadata,
        timeout=TIMEOUT_S,
    )


def _get(call: Call) -> Any:
    return call.stubs.adapters.GetAdapter(
        adapters_pb2.GetAdapterRequest(name=call.name, tenant=call.caller.tenant_field),
        metadata=call.caller.metadata,
        timeout=TIMEOUT_S,
    )


def _delete(call: Call) -> Any:
    return call.stubs.adapters.DeleteAdapter(
        adapters_pb2.DeleteAdapterRequest(name=call.name, tenant=call.caller.tenant_field),
        metadata=call.caller.metadata,
        timeout=TIMEOUT_S,
    )


def _list_versions(call: Call) -> Any:
    return call.stubs.adapters.ListAdapterVersions(
        adapters_pb2.ListAdapterVersionsRequest(name=call.name, tenant=call.caller.tenant_field),
        metadata=call.caller.metadata,
        timeout=TIMEOUT_S,
    )


def _rollback(call: Call) -> Any:
    # To version 1, the only one: allowed calls are a durable no-op, the rest must refuse.
    return call.stubs.adapters.RollbackAdapter(
        adapters_pb2.RollbackAdapterRequest(
            name=call.name, to_version=1, tenant=call.caller.tenant_field
        ),
        metadata=call.caller.metadata,
        timeout=TIMEOUT_S,
    )


def _at_version(rpc: Callable[[Call], Any]) -> Callable[[Call], Any]:
    """The same RPC naming `name@1` (the owner's only version) instead of `name`."""

    def call_at_version(call: Call) -> Any:
        return rpc(Call(call.stubs, f"{call.name}@1", call.caller, call.adapter_dir))

    return call_at_version


RPCS: dict[str, Callable[[Call], Any]] = {
    "Generate": _generate,
    "GenerateStream": _generate_stream,
    "GetServerInfo": _server_info,
    "UploadAdapter": _upload,
    "ListAdapters": _list,
    "GetAdapter": _get,
    "DeleteAdapter": _delete,
    "ListAdapterVersions": _list_versions,
    "RollbackAdapter": _rollback,
    "Generate@N": _at_version(_generate),
    "GenerateStream@N": _at_version(_generate_stream),
    "GetAdapter@N": _at_version(_get),
    "DeleteAdapter@N": _at_version(_delete),
}

UNAUTH = {"no_key": Code.UNAUTHENTICATED, "wrong_key": Code.UNAUTHENTICATED}

# (rpc, caller) -> expected status. Callers absent for an RPC do not apply to it (no tenant
# field, or no adapter named).
MATRIX: dict[str, dict[str, Code]] = {
    "Generate": {
        **UNAUTH,
        "other_tenant": Code.NOT_FOUND,
        "own_tenant": Code.OK,
        "admin": Code.NOT_FOUND,
    },
    "GenerateStream": {
        **UNAUTH,
        "other_tenant": Code.NOT_FOUND,
        "own_tenant": Code.OK,
        "admin": Code.NOT_FOUND,
    },
    "GetServerInfo": {
        **UNAUTH,
        "other_tenant": Code.OK,
        "own_tenant": Code.OK,
        "admin": Code.OK,
    },
    "UploadAdapter": {
        **UNAUTH,
        "other_tenant": Code.OK,  # lands in the other tenant's own namespace
        "other_tenant_as_owner": Code.PERMISSION_DENIED,
        "own_tenant": Code.OK,
        "admin": Code.OK,
    },
    "ListAdapters": {
        **UNAUTH,
        "other_tenant": Code.OK,  # its own (empty) list
        "other_tenant_as_owner": Code.PERMISSION_DENIED,
        "own_tenant": Code.OK,
        "admin": Code.OK,
    },
    "GetAdapter": {
        **UNAUTH,
        "other_tenant": Code.NOT_FOUND,
        "other_tenant_as_owner": Code.PERMISSION_DENIED,
        "own_tenant": Code.OK,
        "admin": Code.OK,
        "admin_without_tenant": Code.NOT_FOUND,
    },
    "DeleteAdapter": {
        **UNAUTH,
        "other_tenant": Code.NOT_FOUND,
        "other_tenant_as_owner": Code.PERMISSION_DENIED,
        "own_tenant": Code.OK,
        "admin": Code.OK,
        "admin_without_tenant": Code.NOT_FOUND,
    },
}
# The new RPCs and the `name@N` forms are authorized exactly as the plain-name ones.
for _rpc, _like in (
    ("ListAdapterVersions", "GetAdapter"),
    ("RollbackAdapter", "GetAdapter"),
    ("Generate@N", "Generate"),
    ("GenerateStream@N", "GenerateStream"),
    ("GetAdapter@N", "GetAdapter"),
    ("DeleteAdapter@N", "DeleteAdapter"),
):
    MATRIX[_rpc] = dict(MATRIX[_like])

CASES = [(rpc, caller, code) for rpc, row in MATRIX.items() for caller, code in row.items()]

LEDGER: dict[str, bool] = {}
"""Owner adapter name -> whether it should still exist after its case ran."""


@pytest.fixture(scope="module")
def stubs(server: BackgroundServer) -> Iterator[Stubs]:
    channel = grpc.insecure_channel(server.target)
    yield Stubs(adapters_pb2_grpc.AdaptersStub(channel), inference_pb2_grpc.InferenceStub(channel))
    channel.close()


@pytest.fixture(scope="module")
def clients(server: BackgroundServer) -> Iterator[dict[str, LoraServeClient]]:
    opened = {tenant: client_for(server, tenant) for tenant in (OWNER, OTHER, ADMIN)}
    yield opened
    for client in opened.values():
        client.close()


def _adapter_names(client: LoraServeClient) -> set[str]:
    return {a.name for a in client.list_adapters() if a.name.startswith(PREFIX)}


def _status(fn: Callable[[], Any]) -> tuple[Code, str, Any]:
    try:
        result = fn()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", None
    return Code.OK, "", result


@pytest.mark.parametrize(
    ("rpc", "caller_name", "expected"),
    CASES,
    ids=[f"{rpc}-{caller}" for rpc, caller, _ in CASES],
)
def test_authz(
    rpc: str,
    caller_name: str,
    expected: Code,
    stubs: Stubs,
    clients: dict[str, LoraServeClient],
    adapter_dirs: dict[str, Path],
) -> None:
    owner = clients[OWNER]
    name = f"{PREFIX}{rpc.replace('@N', '-at-n')}-{caller_name}".lower()
    before = owner.upload_adapter(adapter_dirs["qv"], name)
    LEDGER[name] = True
    caller = CALLERS[caller_name]
    call = Call(stubs, name, caller, adapter_dirs["mlp"])

    code, details, result = _status(lambda: RPCS[rpc](call))
    try:
        assert code == expected, f"{rpc} by {caller_name}: {code.name} ({details!r})"

        if code == Code.NOT_FOUND:
            # Indistinguishable from a name that exists nowhere, and never names the owner.
            assert OWNER not in details
            missing = Call(stubs, f"{name}-nobody", caller, call.adapter_dir)
            missing_code, missing_details, _ = _status(lambda: RPCS[rpc](missing))
            assert missing_code == Code.NOT_FOUND
            assert details.replace(name, "<name>") == missing_details.replace(
                missing.name, "<name>"
            )
        elif code == Code.OK:
            _check_ok(rpc, caller, name, before, result)
        elif code == Code.UNAUTHENTICATED:
            assert OWNER not in details and name not in details
    finally:
        # The other tenant's own upload under the same name must not linger.
        if rpc == "UploadAdapter" and caller.acts_as == OTHER and code == Code.OK:
            clients[OTHER].delete_adapter(name)

    # The owner's adapter is untouched unless an allowed call deleted or replaced it.
    deleted = rpc in ("DeleteAdapter", "DeleteAdapter@N") and code == Code.OK
    replaced = rpc == "UploadAdapter" and code == Code.OK and caller.acts_as == OWNER
    LEDGER[name] = not deleted
    if deleted:
        assert name not in _adapter_names(owner)
        code_after, _, _ = _status(lambda: owner.get_adapter(name))
        assert code_after == Code.NOT_FOUND
        return
    after = owner.get_adapter(name)
    assert after.tenant == OWNER
    if replaced:
        assert after.version == before.version + 1
        assert after.sha256 != before.sha256
    else:
        assert (after.version, after.sha256) == (before.version, before.sha256)
    assert name not in _adapter_names(clients[OTHER])
    assert name not in _adapter_names(clients[ADMIN])


def _check_ok(
    rpc: str, caller: Caller, name: str, before: adapters_pb2.AdapterInfo, result: Any
) -> None:
    """What an allowed call must have returned."""
    if rpc in ("Generate", "GenerateStream", "Generate@N", "GenerateStream@N"):
        assert caller.key_tenant == OWNER
        assert result.adapter_version == before.version
        assert result.finish_reason == inference_pb2.FINISH_REASON_LENGTH
    elif rpc == "GetServerInfo":
        assert result.tenant == caller.key_tenant
    elif rpc == "UploadAdapter":
        assert (result.name, result.tenant) == (name, caller.acts_as)
        expected_version = before.version + 1 if caller.acts_as == OWNER else 1
        assert result.version == expected_version
    elif rpc == "ListAdapters":
        names = [a.name for a in result.adapters]
        assert {a.tenant for a in result.adapters} <= {caller.acts_as}
        assert (name in names) == (caller.acts_as == OWNER)
    elif rpc in (
        "GetAdapter",
        "DeleteAdapter",
        "GetAdapter@N",
        "DeleteAdapter@N",
        "RollbackAdapter",
    ):
        info = result.deleted if rpc.startswith("DeleteAdapter") else result
        assert (info.name, info.tenant, info.version) == (name, OWNER, before.version)
        assert info.sha256 == before.sha256 and info.latest
    elif rpc == "ListAdapterVersions":
        assert [(v.name, v.tenant, v.version, v.latest) for v in result.versions] == [
            (name, OWNER, before.version, True)
        ]
    else:  # pragma: no cover - every RPC is handled above
        raise AssertionError(rpc)


def test_matrix_left_exactly_the_expected_adapters(clients: dict[str, LoraServeClient]) -> None:
    """After the whole matrix: the owner keeps every adapter no allowed call deleted."""
    expected = {name for name, exists in LEDGER.items() if exists}
    assert _adapter_names(clients[OWNER]) == expected
    assert _adapter_names(clients[OTHER]) == set()
    assert _adapter_names(clients[ADMIN]) == set()
    allowed_deletes = {
        f"{PREFIX}{rpc}-{caller}"
        for rpc in ("deleteadapter", "deleteadapter-at-n")
        for caller in ("own_tenant", "admin")
    }
    deleted = {name for name, exists in LEDGER.items() if not exists}
    assert deleted == allowed_deletes & LEDGER.keys()
