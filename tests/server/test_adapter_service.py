"""AdapterService over a real AdapterStore: upload checks, sessions, list/get/delete, engine."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from serving_support import AdapterShape, build_test_model, make_peft_adapter, store_adapter

from loraserve.adapters.errors import (
    AdapterNotFoundError,
    AdapterUploadCancelledError,
    AdapterValidationError,
)
from loraserve.adapters.spec import BaseModelSpec
from loraserve.adapters.store import AdapterStore
from loraserve.server.adapter_service import AdapterService, FileDeclaration, checksum_workers
from loraserve.server.config import ServerConfig
from loraserve.server.engine.model import load_base_model
from loraserve.server.engine.types import AdapterKey, AdapterRef, EngineError, ErrorKind

TENANT = "acme"
ForgetCall = tuple[str, str, int | str | None]
"""(tenant, name, below_version), or (tenant, name, "=N") for a forget of version N only."""


@pytest.fixture(scope="module")
def model_dir(model_cache: Path) -> Path:
    return build_test_model("llama", model_cache)


@pytest.fixture(scope="module")
def spec(model_dir: Path) -> BaseModelSpec:
    loaded = load_base_model(model_dir, device="cpu", dtype="float32")
    return loaded.spec


@pytest.fixture(scope="module")
def adapter_files(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("peft") / "qv"
    make_peft_adapter(model_dir, out, AdapterShape(rank=4, alpha=8, targets=["q_proj", "v_proj"]))
    return {
        "config": (out / "adapter_config.json").read_bytes(),
        "weights": (out / "adapter_model.safetensors").read_bytes(),
    }


class Harness:
    """An AdapterService with a store in tmp_path and a recording forget callback."""

    def __init__(self, root: Path, spec: BaseModelSpec, **overrides: object) -> None:
        self.config = ServerConfig(data_dir=root, max_lora_rank=16, **overrides)  # type: ignore[arg-type]
        self.store = AdapterStore(root / "adapters", self.config.adapter_versions_kept)
        self.service = AdapterService(self.config, self.store, spec)
        self.forgotten: list[ForgetCall] = []

        def forget(t: str, n: str, below: int | None, *, version: int | None = None) -> None:
            self.forgotten.append((t, n, below if version is None else f"={version}"))

        self.service.attach_engine(forget)

    def tmp_entries(self) -> list[Path]:
        return list((self.store.root / "tmp").iterdir())

    def assert_nothing_stored(self) -> None:
        assert self.service.list(TENANT) == []
        assert self.tmp_entries() == [], "a refused upload left files in the store's tmp dir"
        assert list((self.store.root / "tenants").iterdir()) == []


@pytest.fixture
def h(tmp_path: Path, spec: BaseModelSpec) -> Harness:
    return Harness(tmp_path, spec)


def _decl(kind: str, data: bytes) -> FileDeclaration:
    return FileDeclaration(kind, len(data), hashlib.sha256(data).hexdigest())  # type: ignore[arg-type]


def _decls(files: dict[str, bytes]) -> list[FileDeclaration]:
    return [_decl(kind, data) for kind, data in files.items()]


def _upload(h: Harness, files: dict[str, bytes], name: str = "qv", description: str = ""):
    session = h.service.begin_upload(TENANT, name, description, _decls(files))
    for kind, data in files.items():
        session.add_chunk(kind, data)  # type: ignore[arg-type]
    return session.finish()


# ---- begin_upload: declaration checks ----------------------------------------------------------


def _bad_declarations(files: dict[str, bytes]) -> dict[str, tuple[str, str, list[FileDeclaration]]]:
    config, weights = _decl("config", files["config"]), _decl("weights", files["weights"])
    return {
        "missing weights": ("qv", "", [config]),
        "missing config": ("qv", "", [weights]),
        "nothing declared": ("qv", "", []),
        "duplicate kind": ("qv", "", [config, weights, config]),
        "sha not hex": ("qv", "", [config, FileDeclaration("weights", weights.size, "z" * 64)]),
        "sha uppercase": (
            "qv",
            "",
            [config, FileDeclaration("weights", weights.size, weights.sha256.upper())],
        ),
        "sha short": ("qv", "", [config, FileDeclaration("weights", weights.size, "ab" * 31)]),
        "weights over limit": (
            "qv",
            "",
            [config, FileDeclaration("weights", weights.size + 1, weights.sha256)],
        ),
        "config over limit": (
            "qv",
            "",
            [FileDeclaration("config", config.size + 1, config.sha256), weights],
        ),
        "zero size": ("qv", "", [config, FileDeclaration("weights", 0, weights.sha256)]),
        "bad name": ("../evil", "", [config, weights]),
        "empty name": ("", "", [config, weights]),
        "long description": ("qv", "é" * 513, [config, weights]),
    }


BAD_CASES = [
    "missing weights",
    "missing config",
    "nothing declared",
    "duplicate kind",
    "sha not hex",
    "sha uppercase",
    "sha short",
    "weights over limit",
    "config over limit",
    "zero size",
    "bad name",
    "empty name",
    "long description",
]


def _exact_limits(files: dict[str, bytes]) -> dict[str, object]:
    return {
        "max_adapter_bytes": len(files["weights"]),
        "max_adapter_config_bytes": len(files["config"]),
    }


def test_files_of_exactly_the_limit_are_accepted(
    tmp_path: Path, spec: BaseModelSpec, adapter_files: dict[str, bytes]
) -> None:
    h = Harness(tmp_path, spec, **_exact_limits(adapter_files))
    assert _upload(h, adapter_files).version == 1


@pytest.mark.parametrize("case", BAD_CASES)
def test_begin_upload_refuses_bad_declarations(
    case: str, tmp_path: Path, spec: BaseModelSpec, adapter_files: dict[str, bytes]
) -> None:
    # Limits at exactly the real sizes: each case fails for its own reason only.
    h = Harness(tmp_path, spec, **_exact_limits(adapter_files))
    name, description, declarations = _bad_declarations(adapter_files)[case]
    with pytest.raises(AdapterValidationError) as err:
        h.service.begin_upload(TENANT, name, description, declarations)
    assert err.value.field and err.value.message
    h.assert_nothing_stored()
    assert h.forgotten == []


def test_refusal_messages_name_the_problem(h: Harness, adapter_files: dict[str, bytes]) -> None:
    config, weights = (
        _decl("config", adapter_files["config"]),
        _decl("weights", adapter_files["weights"]),
    )
    cases = [
        ([config], "files", "both"),
        ([config, config, weights], "files", "declared twice"),
        (
            [config, FileDeclaration("weights", 10, "0" * 63)],
            "files.adapter_model.safetensors.sha256",
            "64 lowercase hex",
        ),
        (
            [config, FileDeclaration("weights", 10**12, weights.sha256)],
            "adapter_model.safetensors",
            "exceeds the limit",
        ),
        ([FileDeclaration("config", 0, config.sha256), weights], "adapter_config.json", "0"),
    ]
    for declarations, field, needle in cases:
        with pytest.raises(AdapterValidationError) as err:
            h.service.begin_upload(TENANT, "qv", "", declarations)
        assert err.value.field == field and needle in err.value.message, str(err.value)
    with pytest.raises(AdapterValidationError) as err:
        h.service.begin_upload(TENANT, "qv", "x" * 1025, _decls(adapter_files))
    assert err.value.field == "description"
    h.assert_nothing_stored()


def test_description_of_exactly_1024_bytes_is_accepted(
    h: Harness, adapter_files: dict[str, bytes]
) -> None:
    record = _upload(h, adapter_files, description="d" * 1024)
    assert record.description == "d" * 1024


# ---- upload session: chunks and finish ---------------------------------------------------------


def test_add_chunk_refuses_bytes_beyond_the_declared_size(
    h: Harness, adapter_files: dict[str, bytes]
) -> None:
    config = adapter_files["config"]
    session = h.service.begin_upload(TENANT, "qv", "", _decls(adapter_files))
    session.add_chunk("config", config[:10])
    with pytest.raises(AdapterValidationError) as err:
        session.add_chunk("config", config[10:] + b" ")
    assert err.value.field == "adapter_config.json"
    assert str(len(config)) in err.value.message
    assert session.txn.bytes_written("config") == 10, "the refused chunk was written"
    # The exact remainder still fits.
    session.add_chunk("config", config[10:])
    with pytest.raises(AdapterValidationError):
        session.add_chunk("config", b"x")
    session.abort()
    h.assert_nothing_stored()


def test_finish_refuses_a_truncated_stream(h: Harness, adapter_files: dict[str, bytes]) -> None:
    weights = adapter_files["weights"]
    session = h.service.begin_upload(TENANT, "qv", "", _decls(adapter_files))
    session.add_chunk("config", adapter_files["config"])
    session.add_chunk("weights", weights[:-1])
    with pytest.raises(AdapterValidationError) as err:
        session.finish()
    assert err.value.field == "adapter_model.safetensors"
    assert "truncated" in err.value.message and f"{len(weights) - 1} of {len(weights)}" in str(
        err.value
    )
    assert h.service.list(TENANT) == []
    session.abort()
    h.assert_nothing_stored()
    assert h.forgotten == []


def test_finish_refuses_a_checksum_mismatch(h: Harness, adapter_files: dict[str, bytes]) -> None:
    config = adapter_files["config"]
    session = h.service.begin_upload(TENANT, "qv", "", _decls(adapter_files))
    tampered = bytearray(config)
    tampered[-2] ^= 0x01
    session.add_chunk("config", bytes(tampered))
    session.add_chunk("weights", adapter_files["weights"])
    with pytest.raises(AdapterValidationError) as err:
        session.finish()
    assert err.value.field == "adapter_config.json" and "sha256" in err.value.message
    assert h.service.list(TENANT) == []
    session.abort()
    h.assert_nothing_stored()
    assert h.forgotten == []


def test_finish_refuses_an_adapter_that_does_not_fit_the_base(
    h: Harness, adapter_files: dict[str, bytes]
) -> None:
    files = {**adapter_files, "config": adapter_files["config"].replace(b'"r": 4', b'"r": 5')}
    assert files["config"] != adapter_files["config"]
    with pytest.raises(AdapterValidationError):
        _upload(h, files)
    assert h.service.list(TENANT) == []


def test_abort_is_idempotent_and_a_no_op_after_commit(
    h: Harness, adapter_files: dict[str, bytes]
) -> None:
    session = h.service.begin_upload(TENANT, "qv", "", _decls(adapter_files))
    session.abort()
    session.abort()
    h.assert_nothing_stored()
    session = h.service.begin_upload(TENANT, "qv", "", _decls(adapter_files))
    for kind, data in adapter_files.items():
        session.add_chunk(kind, data)  # type: ignore[arg-type]
    record = session.finish()
    session.abort()
    assert h.service.get(TENANT, "qv") == record


@pytest.mark.parametrize("when", ["before finish", "during validation"])
def test_a_cancelled_session_aborts_instead_of_committing(
    h: Harness, adapter_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """cancel() (the caller went away) before finish() or while it validates: no commit."""
    session = h.service.begin_upload(TENANT, "qv", "", _decls(adapter_files))
    for kind, data in adapter_files.items():
        session.add_chunk(kind, data)  # type: ignore[arg-type]
    if when == "before finish":
        session.cancel()
    else:
        validate = h.service.validate

        def cancel_midway(*args, **kwargs):  # type: ignore[no-untyped-def]
            session.cancel()
            return validate(*args, **kwargs)

        monkeypatch.setattr(h.service, "validate", cancel_midway)
    with pytest.raises(AdapterUploadCancelledError, match="'qv' was cancelled"):
        session.finish()
    h.assert_nothing_stored()
    assert h.forgotten == []
    # The quota reservation ended with it: the same upload now commits.
    assert _upload(h, adapter_files).version == 1


def test_good_upload_commits_and_tells_the_engine(
    h: Harness, adapter_files: dict[str, bytes]
) -> None:
    session = h.service.begin_upload(TENANT, "qv", "my adapter", _decls(adapter_files))
    # Chunked, interleaved arrival.
    for start in range(0, max(len(d) for d in adapter_files.values()), 997):
        for kind, data in adapter_files.items():
            if start < len(data):
                session.add_chunk(kind, data[start : start + 997])  # type: ignore[arg-type]
    assert h.service.list(TENANT) == [], "visible before finish()"
    record = session.finish()
    assert (record.tenant, record.name, record.version) == (TENANT, "qv", 1)
    assert record.rank == 4 and record.alpha == 8.0 and not record.use_rslora
    assert record.description == "my adapter"
    assert record.size_bytes == len(adapter_files["weights"])
    assert record.sha256 == hashlib.sha256(adapter_files["weights"]).hexdigest()
    assert set(record.target_modules) == {
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")
    }
    assert list(record.target_modules) == sorted(record.target_modules)
    assert h.forgotten == [(TENANT, "qv", 1)]
    assert h.service.list(TENANT) == [record]
    assert h.service.get(TENANT, "qv") == record
    assert h.service.list("globex") == []
    assert h.tmp_entries() == []


def test_reupload_is_a_new_version_and_forgets_only_pruned_versions(
    tmp_path: Path, spec: BaseModelSpec, adapter_files: dict[str, bytes]
) -> None:
    h = Harness(tmp_path, spec, adapter_versions_kept=2)
    first = _upload(h, adapter_files)
    second = _upload(h, adapter_files)
    assert (first.version, second.version) == (1, 2)
    # Both kept: the engine may keep both cached (forget below 1 drops nothing).
    assert h.forgotten == [(TENANT, "qv", 1), (TENANT, "qv", 1)]
    assert h.service.list(TENANT) == [second]
    third = _upload(h, adapter_files)
    assert third.version == 3
    assert h.forgotten[-1] == (TENANT, "qv", 2)  # v1 was pruned, v2 stays cached
    assert [r.version for r in h.service.list_versions(TENANT, "qv")] == [2, 3]


def test_get_and_delete_take_name_at_version(h: Harness, adapter_files: dict[str, bytes]) -> None:
    for _ in range(3):
        _upload(h, adapter_files)
    h.forgotten.clear()
    old = h.service.get(TENANT, "qv@1")
    assert (old.version, old.latest) == (1, False)
    assert h.service.get(TENANT, "qv").latest and h.service.get(TENANT, "qv@3").latest
    deleted = h.service.delete(TENANT, "qv@2")
    assert (deleted.version, deleted.latest) == (2, False)
    assert h.forgotten == [(TENANT, "qv", "=2")]  # only that version leaves the engine
    with pytest.raises(AdapterNotFoundError, match=r"'qv@2' not found"):
        h.service.get(TENANT, "qv@2")
    with pytest.raises(AdapterNotFoundError, match=r"'qv@2' not found"):
        h.service.delete(TENANT, "qv@2")
    for bad in ("qv@", "qv@0", "qv@02", "qv@x", "qv@-1", "@1"):
        with pytest.raises(AdapterValidationError):
            h.service.get(TENANT, bad)
        with pytest.raises(AdapterValidationError):
            h.service.delete(TENANT, bad)
    assert [r.version for r in h.service.list_versions(TENANT, "qv")] == [1, 3]


def test_rollback_changes_what_plain_names_resolve_to_and_forgets_nothing(
    h: Harness, adapter_files: dict[str, bytes]
) -> None:
    _upload(h, adapter_files)
    _upload(h, adapter_files)
    h.forgotten.clear()
    assert h.service.resolve(AdapterRef(TENANT, "qv")).version == 2
    record = h.service.rollback(TENANT, "qv", 1)
    assert (record.version, record.latest) == (1, True)
    assert h.service.resolve(AdapterRef(TENANT, "qv")).version == 1
    assert h.service.resolve(AdapterRef(TENANT, "qv", 2)).version == 2
    assert h.forgotten == []  # every kept version stays valid under its own number
    assert [(r.version, r.latest) for r in h.service.list_versions(TENANT, "qv")] == [
        (1, True),
        (2, False),
    ]
    with pytest.raises(AdapterNotFoundError, match=r"'qv@5' not found"):
        h.service.rollback(TENANT, "qv", 5)
    with pytest.raises(AdapterValidationError, match="to_version"):
        h.service.rollback(TENANT, "qv", 0)
    for call in (
        lambda: h.service.rollback(TENANT, "qv@1", 1),
        lambda: h.service.list_versions(TENANT, "qv@1"),
    ):
        with pytest.raises(AdapterValidationError, match="without a version"):
            call()
    with pytest.raises(AdapterNotFoundError):
        h.service.rollback("globex", "qv", 1)  # another tenant's namespace


def test_resolve_and_load_a_pinned_older_version(
    h: Harness, adapter_files: dict[str, bytes]
) -> None:
    _upload(h, adapter_files)
    _upload(h, adapter_files)
    key = h.service.resolve(AdapterRef(TENANT, "qv", 1))
    assert (key.version, key.rank) == (1, 4)
    assert h.service.load(key).config.rank == 4  # an older version loads, not only the latest
    with pytest.raises(EngineError) as info:
        h.service.resolve(AdapterRef(TENANT, "qv", 9))
    assert info.value.kind == ErrorKind.NOT_FOUND and "'qv@9' not found" in info.value.message
    h.service.delete(TENANT, "qv@1")
    with pytest.raises(EngineError) as info:
        h.service.load(key)
    assert info.value.kind == ErrorKind.NOT_FOUND


def test_delete_forgets_every_version(h: Harness, adapter_files: dict[str, bytes]) -> None:
    record = _upload(h, adapter_files)
    h.forgotten.clear()
    assert h.service.delete(TENANT, "qv") == record
    assert h.forgotten == [(TENANT, "qv", None)]
    assert h.service.list(TENANT) == []
    with pytest.raises(AdapterNotFoundError):
        h.service.get(TENANT, "qv")
    with pytest.raises(AdapterNotFoundError):
        h.service.delete(TENANT, "qv")
    assert h.forgotten == [(TENANT, "qv", None)], "a failed delete still told the engine"


@pytest.mark.parametrize("name", ["../x", "", "a/b"])
def test_get_and_delete_validate_names(h: Harness, name: str) -> None:
    with pytest.raises(AdapterValidationError):
        h.service.get(TENANT, name)
    with pytest.raises(AdapterValidationError):
        h.service.delete(TENANT, name)
    assert h.forgotten == []


def test_tenants_are_isolated(h: Harness, adapter_files: dict[str, bytes]) -> None:
    _upload(h, adapter_files)
    with pytest.raises(AdapterNotFoundError):
        h.service.get("globex", "qv")
    with pytest.raises(EngineError) as err:
        h.service.resolve(AdapterRef("globex", "qv"))
    assert err.value.kind == ErrorKind.NOT_FOUND


# ---- the engine's view: resolve and load -------------------------------------------------------


def test_resolve_returns_the_current_version(h: Harness, adapter_files: dict[str, bytes]) -> None:
    _upload(h, adapter_files)
    assert h.service.resolve(AdapterRef(TENANT, "qv")) == AdapterKey(TENANT, "qv", 1)
    _upload(h, adapter_files)
    assert h.service.resolve(AdapterRef(TENANT, "qv")) == AdapterKey(TENANT, "qv", 2)


def test_resolve_unknown_is_not_found(h: Harness) -> None:
    with pytest.raises(EngineError) as err:
        h.service.resolve(AdapterRef(TENANT, "nope"))
    assert err.value.kind == ErrorKind.NOT_FOUND
    assert "'nope'" in err.value.message


def test_load_returns_validated_weights(
    h: Harness, adapter_files: dict[str, bytes], spec: BaseModelSpec
) -> None:
    record = _upload(h, adapter_files)
    weights = h.service.load(h.service.resolve(AdapterRef(TENANT, "qv")))
    assert weights.config.rank == 4 and weights.config.alpha == 8
    assert set(weights.modules) == set(record.target_modules)
    for name, (a, b) in weights.modules.items():
        target = spec.modules[name]
        assert a.shape == (4, target.in_features) and b.shape == (target.out_features, 4)
        assert a.dtype == b.dtype == torch.float32
        assert bool(torch.isfinite(a).all()) and bool(b.abs().sum() > 0)


def test_loads_of_one_shape_check_its_structure_once_and_every_file_s_values(
    h: Harness, adapter_files: dict[str, bytes]
) -> None:
    """The upload checks the structure; later loads of that shape (another tenant's too) only
    the values: a stored file whose values went bad is still refused on load."""
    _upload(h, adapter_files)
    _upload(h, adapter_files, name="again")
    cache = h.service.structure_cache
    assert (cache.hits, cache.misses) == (1, 1)
    key = h.service.resolve(AdapterRef(TENANT, "qv"))
    h.service.load(key)
    assert (cache.hits, cache.misses) == (2, 1)
    # Same header, one value turned into NaN on disk (the checksum recorded to match, as if
    # the upload had carried it): refused by the values check on a structure hit.
    record = h.store.get_version(TENANT, "again", 1)
    path = record.path / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-4:] = torch.tensor([float("nan")]).numpy().tobytes()
    path.write_bytes(bytes(data))
    meta_path = record.path / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["weights_sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(EngineError) as err:
        h.service.load(h.service.resolve(AdapterRef(TENANT, "again")))
    assert err.value.kind == ErrorKind.INTERNAL and "unusable" in err.value.message
    assert (cache.hits, cache.misses) == (3, 1)


def test_load_of_a_pruned_version_is_not_found(
    tmp_path: Path, spec: BaseModelSpec, adapter_files: dict[str, bytes]
) -> None:
    h = Harness(tmp_path, spec, adapter_versions_kept=1)
    _upload(h, adapter_files)
    old = h.service.resolve(AdapterRef(TENANT, "qv"))
    _upload(h, adapter_files)
    with pytest.raises(EngineError) as err:
        h.service.load(old)
    assert err.value.kind == ErrorKind.NOT_FOUND and "replaced" in err.value.message
    new = h.service.resolve(AdapterRef(TENANT, "qv"))
    assert new.version == 2 and h.service.load(new).config.rank == 4
    # A version from the future (never uploaded) is not found either.
    with pytest.raises(EngineError) as err:
        h.service.load(AdapterKey(TENANT, "qv", 3))
    assert err.value.kind == ErrorKind.NOT_FOUND


def test_load_of_a_deleted_adapter_is_not_found(
    h: Harness, adapter_files: dict[str, bytes]
) -> None:
    _upload(h, adapter_files)
    key = h.service.resolve(AdapterRef(TENANT, "qv"))
    h.service.delete(TENANT, "qv")
    with pytest.raises(EngineError) as err:
        h.service.load(key)
    assert err.value.kind == ErrorKind.NOT_FOUND
    with pytest.raises(EngineError) as err:
        h.service.load(AdapterKey(TENANT, "never", 1))
    assert err.value.kind == ErrorKind.NOT_FOUND


def test_load_of_corrupted_files_is_internal(h: Harness, adapter_files: dict[str, bytes]) -> None:
    record = _upload(h, adapter_files)
    weights_path = record.path / "adapter_model.safetensors"
    data = bytearray(weights_path.read_bytes())
    data[-1] ^= 0xFF
    weights_path.write_bytes(bytes(data))
    with pytest.raises(EngineError) as err:
        h.service.load(AdapterKey(TENANT, "qv", record.version))
    assert err.value.kind == ErrorKind.INTERNAL and "'qv'" in err.value.message


def test_load_reports_corruption_over_the_validation_error_it_causes(
    h: Harness, adapter_files: dict[str, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    """Validation and the checksum run side by side; when the stored bytes are damaged so
    that validation fails too, the log names the checksum mismatch, the cause."""
    record = _upload(h, adapter_files)
    weights_path = record.path / "adapter_model.safetensors"
    weights_path.write_bytes(weights_path.read_bytes()[:-7])  # truncated: invalid safetensors
    with caplog.at_level("ERROR"), pytest.raises(EngineError) as err:
        h.service.load(AdapterKey(TENANT, "qv", record.version))
    assert err.value.kind == ErrorKind.INTERNAL and "'qv'" in err.value.message
    assert "does not match" in caplog.text and "recorded at upload" in caplog.text


def test_load_hashes_on_a_helper_thread_while_the_caller_validates(
    h: Harness, adapter_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from loraserve.adapters.store import StoredFiles
    from loraserve.adapters.weights import AdapterWeights

    record = _upload(h, adapter_files)
    verified_on: list[str] = []
    validated_on: list[str] = []
    jobs, validate = StoredFiles.checksum_jobs, h.service.validate

    def recording_jobs(files: StoredFiles) -> list:
        def recorded(job):  # type: ignore[no-untyped-def]
            def run() -> None:
                verified_on.append(threading.current_thread().name)
                job()

            return run

        return [recorded(job) for job in jobs(files)]

    def recording_validate(
        config: bytes, weights: bytes, *, as_stored: bool = False
    ) -> AdapterWeights:
        validated_on.append(threading.current_thread().name)
        assert as_stored, "a load keeps the file's dtype: no float32 copy"
        return validate(config, weights, as_stored=as_stored)

    monkeypatch.setattr(StoredFiles, "checksum_jobs", recording_jobs)
    monkeypatch.setattr(h.service, "validate", recording_validate)
    weights = h.service.load(AdapterKey(TENANT, "qv", record.version))
    assert weights.config.rank == 4
    assert validated_on == [threading.current_thread().name]
    # The config's sum and one per weights piece (this tiny adapter is one piece).
    assert len(verified_on) == 2
    assert all(name.startswith("adapter-checksum") for name in verified_on)


def test_load_runs_the_beside_work_while_the_checksum_is_still_computed(
    h: Harness, adapter_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cold loader lays pages out beside the checksum: the hash here waits until the
    beside work has run, which only an overlapping load lets happen."""
    import threading

    from loraserve.adapters.store import StoredFiles

    record = _upload(h, adapter_files)
    beside_ran = threading.Event()
    jobs = StoredFiles.checksum_jobs

    def jobs_after_the_beside_work(files: StoredFiles) -> list:
        def after(job):  # type: ignore[no-untyped-def]
            def run() -> None:
                assert beside_ran.wait(30), "the beside work did not run while hashes pended"
                job()

            return run

        return [after(job) for job in jobs(files)]

    monkeypatch.setattr(StoredFiles, "checksum_jobs", jobs_after_the_beside_work)
    seen = []

    def beside(weights) -> None:  # type: ignore[no-untyped-def]
        seen.append(weights)
        beside_ran.set()

    weights = h.service.load(AdapterKey(TENANT, "qv", record.version), beside_checksum=beside)
    assert seen == [weights]


def test_a_checksum_mismatch_fails_the_load_after_the_beside_work(
    h: Harness, adapter_files: dict[str, bytes]
) -> None:
    """Damaged stored bytes that still validate: the beside work has run on them, and the load
    must still fail, so that its caller discards what that work made."""
    record = _upload(h, adapter_files)
    weights_path = record.path / "adapter_model.safetensors"
    data = bytearray(weights_path.read_bytes())
    data[-4] ^= 0x01  # the last float32's lowest mantissa bit: still finite, still valid
    weights_path.write_bytes(bytes(data))
    seen = []
    with pytest.raises(EngineError) as err:
        h.service.load(AdapterKey(TENANT, "qv", record.version), beside_checksum=seen.append)
    assert err.value.kind == ErrorKind.INTERNAL
    assert len(seen) == 1, "validation passed, so the beside work ran before the mismatch"


def test_store_adapter_helper_agrees_with_the_service(
    h: Harness, adapter_files: dict[str, bytes], tmp_path: Path
) -> None:
    # serving_support.store_adapter drives the same session; other suites depend on it.
    peft_dir = tmp_path / "peft-copy"
    peft_dir.mkdir()
    (peft_dir / "adapter_config.json").write_bytes(adapter_files["config"])
    (peft_dir / "adapter_model.safetensors").write_bytes(adapter_files["weights"])
    record = store_adapter(h.service, TENANT, "helper", peft_dir)
    assert h.service.get(TENANT, "helper") == record
    assert h.forgotten == [(TENANT, "helper", 1)]


def test_name_deletes_tell_usage_the_highest_version_and_pins_the_new_latest(
    h: Harness, adapter_files: dict[str, bytes]
) -> None:
    """Usage forgets every version of a deleted name (after a rollback the latest is not the
    highest); deleting the latest version moves a name's pin to the new latest instead."""
    deleted: list[tuple[str, str, int]] = []
    new_latest: list[int] = []
    h.service.attach_usage_and_pins(
        lambda t, n, v: deleted.append((t, n, v)), lambda key: new_latest.append(key.version)
    )
    for _ in range(3):
        _upload(h, adapter_files)
    assert new_latest == [1, 2, 3]
    h.service.rollback(TENANT, "qv", 2)
    h.service.delete(TENANT, "qv@2")  # the latest: version 3 takes over, usage stays
    assert new_latest[-1] == 3 and deleted == []
    h.service.rollback(TENANT, "qv", 1)
    h.service.delete(TENANT, "qv")
    assert deleted == [(TENANT, "qv", 3)]


def test_checksum_threads_follow_the_cores_from_four_to_eight() -> None:
    assert [checksum_workers(c) for c in (1, 2, 8, 10, 16, 64)] == [4, 4, 4, 5, 8, 8]
    assert 4 <= checksum_workers() <= 8  # this machine's
