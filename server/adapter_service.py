"""Adapter management as the gRPC layer sees it: upload sessions, list, get, delete.

Ties the durable store, validation against the base model and the engine's device pages
together, so the gRPC handlers only decode, call one method and encode.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from loraserve.adapters.errors import (
    AdapterError,
    AdapterNotFoundError,
    AdapterQuotaError,
    AdapterValidationError,
)
from loraserve.adapters.names import validate_adapter_name
from loraserve.adapters.spec import BaseModelSpec
from loraserve.adapters.store import AdapterRecord, AdapterStore, UploadTransaction
from loraserve.adapters.weights import AdapterWeights, load_adapter_weights
from loraserve.server.config import ServerConfig
from loraserve.server.engine.types import AdapterKey, AdapterRef, EngineError, ErrorKind

FileKind = Literal["config", "weights"]
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FileDeclaration:
    """What the client promised to send for one file."""

    kind: FileKind
    size: int
    sha256: str


@dataclass
class UploadSession:
    """One upload in progress: enforces the declarations while bytes arrive, then commits."""

    service: AdapterService
    tenant: str
    name: str
    description: str
    declared: dict[FileKind, FileDeclaration]
    txn: UploadTransaction
    _closed: bool = field(default=False)

    def add_chunk(self, kind: FileKind, data: bytes) -> None:
        """Appends bytes to one file; refuses as soon as a file exceeds its declared size."""
        declared = self.declared[kind]
        if self.txn.bytes_written(kind) + len(data) > declared.size:
            raise AdapterValidationError(
                _file_name(kind),
                f"more bytes arrived than the {declared.size} declared in the header",
            )
        self.txn.write(kind, data)

    def finish(self) -> AdapterRecord:
        """Verifies sizes and checksums, validates against the base model, commits atomically."""
        for kind, declared in self.declared.items():
            got = self.txn.bytes_written(kind)
            if got != declared.size:
                raise AdapterValidationError(
                    _file_name(kind),
                    f"stream ended after {got} of {declared.size} declared bytes (truncated)",
                )
            if self.txn.sha256(kind) != declared.sha256:
                raise AdapterValidationError(
                    _file_name(kind), "sha256 of the received bytes does not match the header"
                )
        try:
            weights = self.service.validate(self.txn.read("config"), self.txn.read("weights"))
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            # Hostile files must get INVALID_ARGUMENT even where a check was missed.
            raise AdapterValidationError(
                "adapter", f"could not be parsed: {type(exc).__name__}: {str(exc)[:200]}"
            ) from exc
        record = self.txn.commit(
            {
                "rank": weights.config.rank,
                "alpha": weights.config.alpha,
                "use_rslora": weights.config.use_rslora,
                "target_modules": sorted(weights.modules),
                "description": self.description,
            }
        )
        self._closed = True
        self.service.on_replaced(record)
        return record

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            self.txn.abort()


class AdapterService:
    """Per-tenant adapter operations over the store; raises adapters.errors exceptions."""

    def __init__(self, config: ServerConfig, store: AdapterStore, spec: BaseModelSpec) -> None:
        self._config = config
        self.store = store
        self.spec = spec
        self._forget = lambda tenant, name, below: None

    def attach_engine(self, forget) -> None:
        """Lets deletes and re-uploads free the engine's device copies."""
        self._forget = forget

    def begin_upload(
        self, tenant: str, name: str, description: str, files: list[FileDeclaration]
    ) -> UploadSession:
        validate_adapter_name(name)
        if len(description.encode()) > 1024:
            raise AdapterValidationError("description", "must be at most 1024 bytes")
        declared: dict[FileKind, FileDeclaration] = {}
        for decl in files:
            if decl.kind in declared:
                raise AdapterValidationError("files", f"{_file_name(decl.kind)} declared twice")
            if not _SHA256.fullmatch(decl.sha256):
                raise AdapterValidationError(
                    f"files.{_file_name(decl.kind)}.sha256", "must be 64 lowercase hex digits"
                )
            limit = (
                self._config.max_adapter_config_bytes
                if decl.kind == "config"
                else self._config.max_adapter_bytes
            )
            if decl.size > limit:
                raise AdapterValidationError(
                    _file_name(decl.kind),
                    f"declared size {decl.size} exceeds the limit of {limit} bytes",
                )
            if decl.size == 0:
                raise AdapterValidationError(_file_name(decl.kind), "declared size is 0")
            declared[decl.kind] = decl
        missing = {"config", "weights"} - set(declared)
        if missing:
            raise AdapterValidationError(
                "files",
                "the header must declare both adapter_config.json and adapter_model.safetensors",
            )
        self._check_quota(tenant, name, declared["weights"].size)
        txn = self.store.begin_upload(tenant, name)
        return UploadSession(self, tenant, name, description, declared, txn)

    def _check_quota(self, tenant: str, name: str, size: int) -> None:
        """Refuses an upload that would exceed the tenant's adapter count or bytes.

        Re-uploading a name replaces it, so its current version does not count.
        """
        others = [r for r in self.store.list(tenant) if r.name != name]
        limit = self._config.tenant_max_adapters
        if len(others) + 1 > limit:
            raise AdapterQuotaError(
                f"tenant {tenant!r} already stores {len(others)} adapters "
                f"(quota {limit}); delete one first"
            )
        stored = sum(r.size_bytes for r in others)
        byte_limit = self._config.tenant_max_adapter_bytes
        if stored + size > byte_limit:
            raise AdapterQuotaError(
                f"tenant {tenant!r} would store {stored + size} bytes of adapters "
                f"(quota {byte_limit}); delete some first"
            )

    def validate(self, config_bytes: bytes, weights_bytes: bytes) -> AdapterWeights:
        return load_adapter_weights(
            config_bytes, weights_bytes, self.spec, max_rank=self._config.max_lora_rank
        )

    def on_replaced(self, record: AdapterRecord) -> None:
        self._forget(record.tenant, record.name, record.version)

    def list(self, tenant: str) -> list[AdapterRecord]:
        return self.store.list(tenant)

    def get(self, tenant: str, name: str) -> AdapterRecord:
        validate_adapter_name(name)
        return self.store.get(tenant, name)

    def delete(self, tenant: str, name: str) -> AdapterRecord:
        validate_adapter_name(name)
        record = self.store.delete(tenant, name)
        self._forget(tenant, name, None)
        return record

    # ---- the engine's view --------------------------------------------------------------------

    def resolve(self, ref: AdapterRef) -> AdapterKey:
        """The current version of a named adapter (engine resolver)."""
        try:
            record = self.store.get(ref.tenant, ref.name)
        except AdapterNotFoundError as exc:
            raise EngineError(ErrorKind.NOT_FOUND, f"adapter {ref.name!r} not found") from exc
        except AdapterError as exc:
            raise EngineError(
                ErrorKind.INTERNAL, f"adapter {ref.name!r} is unusable: {exc}"
            ) from exc
        return AdapterKey(ref.tenant, ref.name, record.version, rank=record.rank)

    def load(self, key: AdapterKey) -> AdapterWeights:
        """Reads, checksums and validates one adapter version (engine loader)."""
        try:
            record = self.store.get(key.tenant, key.name)
            if record.version != key.version:
                raise AdapterNotFoundError(key.name)
            config_bytes, weights_bytes = self.store.read_files(record)
            return self.validate(config_bytes, weights_bytes)
        except AdapterNotFoundError as exc:
            raise EngineError(
                ErrorKind.NOT_FOUND,
                f"adapter {key.name!r} version {key.version} was deleted or replaced; retry",
            ) from exc
        except AdapterError as exc:
            raise EngineError(
                ErrorKind.INTERNAL, f"stored adapter {key.name!r} is unusable: {exc}"
            ) from exc


def _file_name(kind: FileKind) -> str:
    return "adapter_config.json" if kind == "config" else "adapter_model.safetensors"
