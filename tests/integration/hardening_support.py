"""Helpers for the hardening tests: raw stubs, hand-made upload streams, fd and tmp/ probes."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
from serving_support import KEYS

from loraserve.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2_grpc


def metadata(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {KEYS[tenant]}"),)


class RawStubs:
    """Generated stubs on their own channel, for streams the typed client never sends."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", 16 << 20),
                ("grpc.max_receive_message_length", 16 << 20),
            ],
        )
        self.inference = inference_pb2_grpc.InferenceStub(self.channel)
        self.adapters = adapters_pb2_grpc.AdaptersStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RawStubs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def upload_header(
    name: str, weights_size: int, config: bytes = b"{}", tenant: str = ""
) -> adapters_pb2.UploadAdapterRequest:
    """A header declaring `config` and a weights file of `weights_size` bytes."""
    return adapters_pb2.UploadAdapterRequest(
        header=adapters_pb2.UploadHeader(
            name=name,
            tenant=tenant,
            files=[
                adapters_pb2.FileDeclaration(
                    file=adapters_pb2.ADAPTER_FILE_CONFIG,
                    size=len(config),
                    sha256=hashlib.sha256(config).hexdigest(),
                ),
                adapters_pb2.FileDeclaration(
                    file=adapters_pb2.ADAPTER_FILE_WEIGHTS, size=weights_size, sha256="0" * 64
                ),
            ],
        )
    )


def chunk(data: bytes, weights: bool = True) -> adapters_pb2.UploadAdapterRequest:
    kind = adapters_pb2.ADAPTER_FILE_WEIGHTS if weights else adapters_pb2.ADAPTER_FILE_CONFIG
    return adapters_pb2.UploadAdapterRequest(chunk=adapters_pb2.FileChunk(file=kind, data=data))


def stalled_stream(
    first: list[adapters_pb2.UploadAdapterRequest], release: threading.Event, sent: list[int]
) -> Iterator[adapters_pb2.UploadAdapterRequest]:
    """Sends `first`, then sends nothing until `release` is set (at most 60 s)."""
    for message in first:
        sent.append(1)
        yield message
    release.wait(60)


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Polls `condition` until it holds or `timeout` (a generous bound, not a measurement)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def open_fds() -> int:
    """Descriptors this process (server and test client alike) holds."""
    return len(os.listdir("/proc/self/fd"))


def tmp_entries(data_dir: Path) -> list[str]:
    """What is left under the store's tmp/ directory."""
    tmp = data_dir / "adapters" / "tmp"
    return sorted(p.name for p in tmp.iterdir()) if tmp.exists() else []
