"""Reading a PEFT adapter directory and turning it into an UploadAdapter request stream.

The stream is one UploadHeader (both files' sizes and sha256) followed by the config's
chunks and then the weights' chunks, each at most CHUNK_SIZE bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from loraserve.v1 import adapters_pb2

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CHUNK_SIZE = 1 << 20
"""1 MiB: well under the server's 4 MiB chunk limit and grpc's default message cap."""

# Pickle-based checkpoints that PEFT or torch may have written instead of safetensors.
_PICKLE_WEIGHTS = ("adapter_model.bin", "pytorch_model.bin", "adapter_model.pt")


class AdapterDirectoryError(ValueError):
    """The directory is not an uploadable PEFT adapter; raised before anything is sent."""


@dataclass(frozen=True)
class UploadPlan:
    """Everything an upload sends, with checksums computed up front for the header."""

    name: str
    """Adapter name."""
    tenant: str
    """Admin only: the owning tenant; empty means the caller."""
    description: str
    """Free-form description."""
    config: bytes
    """adapter_config.json, held in memory: small, and then it cannot change mid-upload."""
    weights_path: Path
    """adapter_model.safetensors, streamed from disk."""
    weights_size: int
    """Bytes of the weights file when it was hashed; exactly this many are sent."""
    weights_sha256: str
    """Lowercase hex sha256 of the weights file."""

    def header(self) -> adapters_pb2.UploadAdapterRequest:
        """The first message of the stream, declaring both files."""
        files = [
            adapters_pb2.FileDeclaration(
                file=adapters_pb2.ADAPTER_FILE_CONFIG,
                size=len(self.config),
                sha256=hashlib.sha256(self.config).hexdigest(),
            ),
            adapters_pb2.FileDeclaration(
                file=adapters_pb2.ADAPTER_FILE_WEIGHTS,
                size=self.weights_size,
                sha256=self.weights_sha256,
            ),
        ]
        header = adapters_pb2.UploadHeader(
            name=self.name, files=files, tenant=self.tenant, description=self.description
        )
        return adapters_pb2.UploadAdapterRequest(header=header)


def plan_upload(
    directory: Path | str, name: str, description: str = "", tenant: str = ""
) -> UploadPlan:
    """Checks the directory locally and hashes its files; reads every weight byte once."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterDirectoryError(f"{directory}: not a directory")
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise AdapterDirectoryError(_missing_weights_message(directory))
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterDirectoryError(f"{directory}: {CONFIG_FILE} is missing")
    config = config_path.read_bytes()
    _check_config_json(config_path, config)
    size, sha256 = _hash_file(weights_path)
    return UploadPlan(
        name=name,
        tenant=tenant,
        description=description,
        config=config,
        weights_path=weights_path,
        weights_size=size,
        weights_sha256=sha256,
    )


def upload_requests(
    plan: UploadPlan, chunk_size: int = CHUNK_SIZE
) -> Iterator[adapters_pb2.UploadAdapterRequest]:
    """The request stream for a blocking stub: header, config chunks, weights chunks."""
    yield plan.header()
    yield from _chunks(adapters_pb2.ADAPTER_FILE_CONFIG, plan.config, chunk_size)
    with plan.weights_path.open("rb") as f:
        for data in _read_blocks(f, plan.weights_size, chunk_size):
            yield _chunk(adapters_pb2.ADAPTER_FILE_WEIGHTS, data)


async def upload_requests_async(
    plan: UploadPlan, chunk_size: int = CHUNK_SIZE
) -> AsyncIterator[adapters_pb2.UploadAdapterRequest]:
    """The same stream for an asyncio stub; disk reads run in a worker thread."""
    yield plan.header()
    for request in _chunks(adapters_pb2.ADAPTER_FILE_CONFIG, plan.config, chunk_size):
        yield request
    f = await asyncio.to_thread(plan.weights_path.open, "rb")
    try:
        remaining = plan.weights_size
        while remaining > 0:
            data = await asyncio.to_thread(f.read, min(chunk_size, remaining))
            if not data:
                break  # File shrank since hashing: the server's size check reports it.
            remaining -= len(data)
            yield _chunk(adapters_pb2.ADAPTER_FILE_WEIGHTS, data)
    finally:
        f.close()


def _missing_weights_message(directory: Path) -> str:
    pickled = [n for n in _PICKLE_WEIGHTS if (directory / n).is_file()]
    if pickled:
        # Pickle can run code when loaded, so the server never accepts it; say how to fix it.
        return (
            f"{directory}: found {pickled[0]} but no {WEIGHTS_FILE}; only safetensors is "
            "accepted (pickle .bin files are refused). Re-save the adapter with PEFT's "
            "save_pretrained(..., safe_serialization=True)."
        )
    return f"{directory}: {WEIGHTS_FILE} is missing"


def _check_config_json(path: Path, config: bytes) -> None:
    # A cheap local check that saves uploading megabytes of weights only to be refused.
    try:
        parsed = json.loads(config)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterDirectoryError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(parsed, dict):
        raise AdapterDirectoryError(f"{path}: expected a JSON object")


def _hash_file(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while block := f.read(CHUNK_SIZE):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def _read_blocks(f: BinaryIO, size: int, chunk_size: int) -> Iterator[bytes]:
    # Send exactly the bytes that were hashed, never more, even if the file grew since.
    remaining = size
    while remaining > 0:
        data = f.read(min(chunk_size, remaining))
        if not data:
            return  # File shrank since hashing: the server's size check reports it.
        remaining -= len(data)
        yield data


def _chunks(
    file: adapters_pb2.AdapterFile, data: bytes, chunk_size: int
) -> Iterator[adapters_pb2.UploadAdapterRequest]:
    for start in range(0, len(data), chunk_size):
        yield _chunk(file, data[start : start + chunk_size])


def _chunk(file: adapters_pb2.AdapterFile, data: bytes) -> adapters_pb2.UploadAdapterRequest:
    return adapters_pb2.UploadAdapterRequest(chunk=adapters_pb2.FileChunk(file=file, data=data))
