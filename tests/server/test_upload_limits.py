"""AdapterService's upload limits: slots per tenant and in all, quota reservations held by
uploads in progress and re-checked at commit, the 4 MiB chunk bound, refusal of an implausible
safetensors header at its first bytes, and cleanup on every failed finish."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from serving_support import AdapterShape, build_test_model, make_peft_adapter

from loraserve.adapters.errors import AdapterQuotaError, AdapterValidationError
from loraserve.adapters.spec import BaseModelSpec
from loraserve.adapters.store import AdapterStore
from loraserve.server.adapter_service import MAX_CHUNK_BYTES, AdapterService, FileDeclaration
from loraserve.server.config import ServerConfig
from loraserve.server.engine.model import load_base_model
from loraserve.server.limits import TenantLimitTable

TENANT = "acme"


@pytest.fixture(scope="module")
def spec(model_cache: Path) -> BaseModelSpec:
    return load_base_model(
        build_test_model("llama", model_cache), device="cpu", dtype="float32"
    ).spec


@pytest.fixture(scope="module")
def files(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("peft") / "qv"
    make_peft_adapter(
        build_test_model("llama", model_cache),
        out,
        AdapterShape(rank=4, alpha=8, targets=["q_proj", "v_proj"]),
    )
    return {
        "config": (out / "adapter_config.json").read_bytes(),
        "weights": (out / "adapter_model.safetensors").read_bytes(),
    }


def _service(root: Path, spec: BaseModelSpec, **overrides: object) -> AdapterService:
    config = ServerConfig(data_dir=root, max_lora_rank=16, **overrides)  # type: ignore[arg-type]
    return AdapterService(config, AdapterStore(root / "adapters"), spec)


def _decls(files: dict[str, bytes]) -> list[FileDeclaration]:
    return [
        FileDeclaration(kind, len(data), hashlib.sha256(data).hexdigest())  # type: ignore[arg-type]
        for kind, data in files.items()
    ]


def _tmp(service: AdapterService) -> list[Path]:
    return list((service.store.root / "tmp").iterdir())


def test_upload_slots_cap_each_tenant_and_the_server(tmp_path: Path, spec: BaseModelSpec) -> None:
    service = _service(tmp_path, spec, tenant_max_uploads=2, max_uploads=3)
    a1, a2 = service.uploads.acquire("a"), service.uploads.acquire("a")
    with pytest.raises(AdapterQuotaError, match="limit 2, the server default --tenant-max-uploads"):
        service.uploads.acquire("a")
    b1 = service.uploads.acquire("b")
    with pytest.raises(AdapterQuotaError, match="limit 3, --max-uploads"):
        service.uploads.acquire("c")
    a1.release()
    a1.release()  # idempotent: frees one slot, not two
    assert service.uploads.in_progress() == 2
    service.uploads.acquire("c").release()
    for slot in (a2, b1):
        slot.release()
    assert service.uploads.in_progress() == 0


def test_uploads_in_progress_hold_their_quota(
    tmp_path: Path, spec: BaseModelSpec, files: dict[str, bytes]
) -> None:
    service = _service(tmp_path, spec, tenant_max_adapters=2)
    first = service.begin_upload(TENANT, "one", "", _decls(files))
    second = service.begin_upload(TENANT, "two", "", _decls(files))
    with pytest.raises(AdapterQuotaError, match="--tenant-max-adapters"):
        service.begin_upload(TENANT, "three", "", _decls(files))
    # Another upload of a name already in progress is not a new adapter.
    again = service.begin_upload(TENANT, "two", "", _decls(files))
    again.abort()
    second.abort()  # frees its reservation
    third = service.begin_upload(TENANT, "three", "", _decls(files))
    for session in (first, third):
        session.abort()
    assert _tmp(service) == []


def test_byte_quota_counts_uploads_in_progress(
    tmp_path: Path, spec: BaseModelSpec, files: dict[str, bytes]
) -> None:
    size = len(files["weights"])
    service = _service(tmp_path, spec, tenant_max_adapter_bytes=size * 3 // 2)
    pending = service.begin_upload(TENANT, "one", "", _decls(files))
    with pytest.raises(AdapterQuotaError, match="uploads in progress"):
        service.begin_upload(TENANT, "two", "", _decls(files))
    pending.abort()
    service.begin_upload(TENANT, "two", "", _decls(files)).abort()


def test_commit_rechecks_the_quota_under_the_store_lock(
    tmp_path: Path, spec: BaseModelSpec, files: dict[str, bytes]
) -> None:
    """A commit that would exceed the quota by what was committed meanwhile is refused."""
    service = _service(tmp_path, spec, tenant_max_adapters=1)
    session = service.begin_upload(TENANT, "late", "", _decls(files))
    for kind, data in files.items():
        session.add_chunk(kind, data)  # type: ignore[arg-type]
    # Another commit slips in without seeing this upload's reservation (as if it had been
    # reserved under a higher quota): the check at commit still holds the line.
    service.end_reservation(session.reservation)
    sneaky = service.begin_upload(TENANT, "sneaky", "", _decls(files))
    for kind, data in files.items():
        sneaky.add_chunk(kind, data)  # type: ignore[arg-type]
    sneaky.finish()
    with pytest.raises(AdapterQuotaError):
        session.finish()
    assert [r.name for r in service.list(TENANT)] == ["sneaky"]
    assert _tmp(service) == []


def test_a_chunk_over_4_mib_is_refused(tmp_path: Path, spec: BaseModelSpec) -> None:
    service = _service(tmp_path, spec, max_adapter_bytes=16 << 20)
    big = bytes(MAX_CHUNK_BYTES + 1)
    session = service.begin_upload(
        TENANT,
        "big",
        "",
        [FileDeclaration("config", 2, "0" * 64), FileDeclaration("weights", len(big), "0" * 64)],
    )
    with pytest.raises(AdapterValidationError, match="4 MiB"):
        session.add_chunk("weights", big)
    session.abort()
    assert MAX_CHUNK_BYTES == 4 * 1024 * 1024


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (b"\xff" * 9, "header is"),  # a header length of 2^64 - 1
        (b"PK\x03\x04", "pickle"),
        ((100).to_bytes(8, "little") + b"[", "start with '{'"),
        ((2000).to_bytes(8, "little") + b"{", "exceeds"),  # longer than the declared file
    ],
)
def test_an_implausible_header_is_refused_at_its_first_bytes(
    tmp_path: Path, spec: BaseModelSpec, head: bytes, message: str
) -> None:
    service = _service(tmp_path, spec)
    session = service.begin_upload(
        TENANT,
        "junk",
        "",
        [FileDeclaration("config", 2, "0" * 64), FileDeclaration("weights", 1000, "0" * 64)],
    )
    with pytest.raises(AdapterValidationError, match=message):
        for i in range(len(head)):  # one byte at a time: refused as soon as it can be
            session.add_chunk("weights", head[i : i + 1])
        session.add_chunk("weights", b"\0" * 200)  # a plausible head completes here
    session.abort()
    assert _tmp(service) == []


def test_a_real_adapter_streamed_byte_by_byte_passes_the_early_check(
    tmp_path: Path, spec: BaseModelSpec, files: dict[str, bytes]
) -> None:
    service = _service(tmp_path, spec)
    session = service.begin_upload(TENANT, "qv", "", _decls(files))
    session.add_chunk("config", files["config"])
    weights = files["weights"]
    for i in range(0, len(weights), 7):
        session.add_chunk("weights", weights[i : i + 7])
    assert session.finish().version == 1


def test_a_failed_finish_removes_its_temp_directory(
    tmp_path: Path, spec: BaseModelSpec, files: dict[str, bytes]
) -> None:
    service = _service(tmp_path, spec, tenant_max_adapters=1)
    session = service.begin_upload(TENANT, "qv", "", _decls(files))
    session.add_chunk("config", files["config"])  # weights never sent: truncated
    with pytest.raises(AdapterValidationError, match="truncated"):
        session.finish()
    assert _tmp(service) == []
    # ... and its reservation is gone: the quota of 1 is free again.
    service.begin_upload(TENANT, "other", "", _decls(files)).abort()


def test_reading_an_adapter_out_of_descriptors_is_retryable_and_names_no_path(
    tmp_path: Path, spec: BaseModelSpec, files: dict[str, bytes]
) -> None:
    import errno

    from loraserve.server.engine.types import AdapterKey, EngineError, ErrorKind

    service = _service(tmp_path, spec)
    session = service.begin_upload(TENANT, "qv", "", _decls(files))
    for kind, data in files.items():
        session.add_chunk(kind, data)  # type: ignore[arg-type]
    record = session.finish()

    def out_of_descriptors(rec: object) -> object:
        raise OSError(errno.EMFILE, "Too many open files", str(record.path))

    service.store.read_unverified = out_of_descriptors  # type: ignore[method-assign]
    with pytest.raises(EngineError) as err:
        service.load(AdapterKey(TENANT, "qv", record.version))
    assert err.value.kind == ErrorKind.RESOURCE_EXHAUSTED
    assert "Too many open files" in err.value.message and str(tmp_path) not in err.value.message


# ---- per-tenant overrides from the tenants file (issue 12 item 5) -----------------------------


def _service_with(
    root: Path, spec: BaseModelSpec, overrides: dict[str, dict[str, int]], **config: object
) -> tuple[AdapterService, TenantLimitTable]:
    server_config = ServerConfig(data_dir=root, max_lora_rank=16, **config)  # type: ignore[arg-type]
    table = TenantLimitTable(server_config.limit_defaults(), overrides)
    return AdapterService(server_config, AdapterStore(root / "adapters"), spec, table), table


def test_a_tenants_own_upload_cap_overrides_the_default(
    tmp_path: Path, spec: BaseModelSpec
) -> None:
    service, table = _service_with(
        tmp_path, spec, {"small": {"max_uploads": 1}}, tenant_max_uploads=3
    )
    small = service.uploads.acquire("small")
    with pytest.raises(
        AdapterQuotaError, match="limit 1, this tenant's max_uploads in the tenants"
    ):
        service.uploads.acquire("small")
    others = [service.uploads.acquire("big") for _ in range(3)]  # the default, 3
    with pytest.raises(AdapterQuotaError, match="limit 3, the server default --tenant-max-uploads"):
        service.uploads.acquire("big")
    # A reload lifts the override: new uploads see it, the one in progress is untouched.
    table.update({"small": {"max_uploads": 2}})
    second = service.uploads.acquire("small")
    assert service.uploads.in_progress() == 5
    # Lowered below what is in progress: nothing is ended, new ones wait until under it.
    table.update({"small": {"max_uploads": 1}})
    with pytest.raises(AdapterQuotaError, match="limit 1, this tenant's"):
        service.uploads.acquire("small")
    for slot in (small, second, *others):
        slot.release()
    service.uploads.acquire("small").release()
    assert service.uploads.in_progress() == 0


def test_a_tenants_own_adapter_quotas_override_the_defaults(
    tmp_path: Path, spec: BaseModelSpec, files: dict[str, bytes]
) -> None:
    size = len(files["weights"])
    service, _ = _service_with(
        tmp_path,
        spec,
        {"few": {"max_adapters": 1}, "small": {"max_adapter_bytes": size * 3 // 2}},
        tenant_max_adapters=3,
    )
    one = service.begin_upload("few", "one", "", _decls(files))
    with pytest.raises(AdapterQuotaError) as err:
        service.begin_upload("few", "two", "", _decls(files))
    assert "quota: limit 1, this tenant's max_adapters in the tenants file" in str(err.value)
    first = service.begin_upload("small", "one", "", _decls(files))
    with pytest.raises(AdapterQuotaError) as err:
        service.begin_upload("small", "two", "", _decls(files))
    assert f"quota: limit {size * 3 // 2}, this tenant's max_adapter_bytes" in str(err.value)
    # A tenant without overrides gets the defaults: 3 adapters.
    sessions = [service.begin_upload("other", f"n{i}", "", _decls(files)) for i in range(3)]
    with pytest.raises(AdapterQuotaError) as err:
        service.begin_upload("other", "n3", "", _decls(files))
    assert "quota: limit 3, the server default --tenant-max-adapters" in str(err.value)
    for session in (one, first, *sessions):
        session.abort()
    assert _tmp(service) == []
