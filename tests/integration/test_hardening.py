"""One tenant must never be able to hurt another: each class of fault the adversarial
test found, through the real gRPC server on a loopback port with the real client.

Each test here failed before its fix; SECURITY.md lists which test covers which class.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from hardening_support import (
    RawStubs,
    chunk,
    metadata,
    open_fds,
    stalled_stream,
    tmp_entries,
    upload_header,
    wait_until,
)
from safetensors.torch import load_file, save_file
from serving_support import client_for

from loraserve.server.api import adapters as adapters_api
from loraserve.server.background import BackgroundServer
from loraserve.server.config import ServerConfig
from loraserve.v1 import adapters_pb2, inference_pb2

ServerFactory = Callable[..., BackgroundServer]


@pytest.fixture
def start_server(
    default_model: Path, tenants_file: Path, tmp_path: Path
) -> Iterator[ServerFactory]:
    """Starts a real server with the given config overrides; all are stopped at the end."""
    started: list[BackgroundServer] = []

    def start(**overrides: object) -> BackgroundServer:
        settings: dict[str, object] = {
            "model_path": default_model,
            "port": 0,
            "metrics_port": None,
            "data_dir": tmp_path / f"data{len(started)}",
            "tenants_file": tenants_file,
            "max_lora_rank": 32,
            "max_adapter_bytes": 8 * 1024 * 1024,
            "max_new_tokens_limit": 64,
            "access_log": "",
        }
        settings.update(overrides)
        thread = BackgroundServer(ServerConfig(**settings)).start(120)  # type: ignore[arg-type]
        started.append(thread)
        return thread

    yield start
    for thread in started:
        thread.stop()


def data_dir(server: BackgroundServer) -> Path:
    return Path(server.config.data_dir)


def _code(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


# ---- 1. sampling faults crossing tenants ------------------------------------------------------


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 1e-45},  # a float32 denormal: passed [0, 100], then NaN in softmax
        {"temperature": 1e-3},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"temperature": -1.0},
        {"temperature": 101.0},
        {"top_p": 0.0},
        {"top_p": float("nan")},
        {"seed": 2**63},  # used to wrap onto a smaller seed
        {"seed": 2**64 - 1},
    ],
    ids=repr,
)
def test_unsafe_sampling_parameters_are_refused(
    server: BackgroundServer, sampling: dict[str, float]
) -> None:
    field = next(iter(sampling))
    with client_for(server, "acme") as acme:
        code, details = _code(
            lambda: acme.generate("hi", max_new_tokens=2, **{"temperature": 0.7, **sampling})
        )
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith(f"{field}:"), details


def test_edge_of_the_sampling_bounds_is_served(server: BackgroundServer) -> None:
    with client_for(server, "acme") as acme:
        for temperature in (0.0, 1e-2, 100.0):
            out = acme.generate("hi", max_new_tokens=3, temperature=temperature, seed=2**63 - 1)
            assert len(out.token_ids) == 3


def test_bad_sampling_from_one_tenant_never_fails_anothers_batch(server: BackgroundServer) -> None:
    barrier = threading.Barrier(12)

    def bad(i: int) -> tuple[grpc.StatusCode, str]:
        with client_for(server, "acme") as acme:
            barrier.wait(30)
            return _code(lambda: acme.generate(f"x{i}", max_new_tokens=4, temperature=1e-45))

    def good(i: int) -> tuple[grpc.StatusCode, str]:
        with client_for(server, "globex") as globex:
            barrier.wait(30)
            return _code(
                lambda: globex.generate(f"y{i}", max_new_tokens=4, temperature=0.8, seed=i)
            )

    with ThreadPoolExecutor(12) as pool:
        bads = [pool.submit(bad, i) for i in range(6)]
        goods = [pool.submit(good, i) for i in range(6)]
    assert all(f.result()[0] == grpc.StatusCode.INVALID_ARGUMENT for f in bads)
    assert all(f.result()[0] == grpc.StatusCode.OK for f in goods), [f.result() for f in goods]


def _to_max(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` scaled so its largest entry is 1e38. tensor: any shape -> same, float32."""
    tensor = tensor.float()
    return tensor / tensor.abs().max().clamp_min(1e-30) * 1e38


def _blowup_adapter(source: Path, out: Path) -> Path:
    """A finite, valid adapter whose B matrices are so large (entries up to 1e38, float32's
    maximum is 3.4e38) that the hidden states overflow to Inf and the logits become NaN."""
    out.mkdir()
    (out / "adapter_config.json").write_bytes((source / "adapter_config.json").read_bytes())
    tensors = load_file(source / "adapter_model.safetensors")
    scaled = {k: (_to_max(v) if "lora_B" in k else v).contiguous() for k, v in tensors.items()}
    assert all(bool(torch.isfinite(v).all()) for v in scaled.values())
    save_file(scaled, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


def test_a_row_whose_logits_overflow_fails_alone(
    server: BackgroundServer, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Prompts that reach one prefill step together: the overflowing row fails, the rest don't."""
    blowup = _blowup_adapter(adapter_dirs["mlp"], tmp_path / "blowup")
    with client_for(server, "acme") as acme:
        acme.upload_adapter(blowup, "blowup")

    def bad(barrier: threading.Barrier, i: int) -> tuple[grpc.StatusCode, str]:
        with client_for(server, "acme") as acme:
            barrier.wait(30)
            return _code(
                lambda: acme.generate(f"p{i}", adapter="blowup", max_new_tokens=4, temperature=1.0)
            )

    def good(barrier: threading.Barrier, i: int) -> tuple[grpc.StatusCode, str]:
        with client_for(server, "globex") as globex:
            barrier.wait(30)
            return _code(
                lambda: globex.generate(f"q{i}", max_new_tokens=4, temperature=1.0, seed=i)
            )

    try:
        for _ in range(3):
            barrier = threading.Barrier(8)
            with ThreadPoolExecutor(8) as pool:
                bads = [pool.submit(bad, barrier, i) for i in range(2)]
                goods = [pool.submit(good, barrier, i) for i in range(6)]
            for f in bads:
                code, details = f.result()
                assert code == grpc.StatusCode.INTERNAL and "sampling failed" in details, details
                assert "not finite" in details
            assert all(f.result()[0] == grpc.StatusCode.OK for f in goods), [
                f.result() for f in goods
            ]
    finally:
        with client_for(server, "acme") as acme:
            acme.delete_adapter("blowup")


# ---- 2. the event loop tokenizes --------------------------------------------------------------


class _GatedTokenizer:
    """Wraps the server's tokenizer: a prompt containing GATE blocks in the tokenizer until the
    test opens the gate, so the test controls exactly how long tokenizing takes."""

    GATE = "<<slow>>"

    def __init__(self, inner: object) -> None:
        self._inner = inner
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.longest_text = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def __call__(self, text: str, *args: object, **kwargs: object) -> object:
        self.longest_text = max(self.longest_text, len(text))
        if self.GATE in text:
            self.entered.set()
            self.gate.wait(60)
        return self._inner(text, *args, **kwargs)  # type: ignore[operator]


@pytest.fixture
def gated_tokenizer(server: BackgroundServer) -> Iterator[_GatedTokenizer]:
    loaded = server.server.runtime.engine.loaded
    original = loaded.tokenizer
    gated = _GatedTokenizer(original)
    loaded.tokenizer = gated
    try:
        yield gated
    finally:
        gated.gate.set()
        loaded.tokenizer = original


def test_tokenizing_one_tenants_prompt_never_stalls_another(
    server: BackgroundServer, gated_tokenizer: _GatedTokenizer
) -> None:
    """While acme's prompt is being tokenized (held for as long as the test likes), globex's
    calls complete: tokenizing runs off the event loop."""
    with ThreadPoolExecutor(1) as pool, client_for(server, "acme") as acme:
        slow = pool.submit(acme.generate, f"a {_GatedTokenizer.GATE} b", max_new_tokens=2)
        assert gated_tokenizer.entered.wait(30), "the slow prompt never reached the tokenizer"
        with client_for(server, "globex") as globex:
            for i in range(3):
                out = globex.generate(f"quick {i}", max_new_tokens=2, timeout_s=20)
                assert len(out.token_ids) == 2
            assert globex.server_info(timeout_s=20).tenant == "globex"
        assert not slow.done(), "acme's call must still be held in the tokenizer"
        gated_tokenizer.gate.set()
        assert len(slow.result(30).token_ids) == 2


def test_a_huge_prompt_is_refused_by_its_length_before_tokenizing(
    server: BackgroundServer, gated_tokenizer: _GatedTokenizer
) -> None:
    huge = "lorem ipsum " * 600_000  # 7.2 MB, under the 8 MiB message bound
    with client_for(server, "acme") as acme:
        for prompt in (huge, None):
            code, details = _code(
                lambda p=prompt: acme.generate(
                    p if p is not None else [("user", huge)], max_new_tokens=2
                )
            )
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert "bytes exceeds the limit" in details, details
    assert gated_tokenizer.longest_text < 1_000_000, "the huge prompt was handed to the tokenizer"


# ---- 3. stalled uploads exhausting descriptors ------------------------------------------------


def _in_progress(server: BackgroundServer) -> int:
    return server.server.runtime.adapter_service.uploads.in_progress()


def test_stalled_uploads_are_capped_per_tenant_and_time_out(
    start_server: ServerFactory, adapter_dirs: dict[str, Path]
) -> None:
    server = start_server(tenant_max_uploads=2, upload_idle_seconds=1.0)
    baseline_fds = open_fds()
    release = threading.Event()
    stalled = []
    with RawStubs(server.target) as raw:
        try:
            for i in range(2):
                sent: list[int] = []
                stream = stalled_stream([upload_header(f"stall{i}", 1000)], release, sent)
                stalled.append(
                    raw.adapters.UploadAdapter.future(stream, metadata=metadata("acme"), timeout=60)
                )
            assert wait_until(lambda: _in_progress(server) == 2)
            # A third upload of the same tenant is refused at once, naming the limit ...
            with client_for(server, "acme") as acme:
                code, details = _code(lambda: acme.upload_adapter(adapter_dirs["qv"], "third"))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
            assert "--tenant-max-uploads" in details and "limit 2" in details
            # ... while another tenant uploads as usual.
            with client_for(server, "globex") as globex:
                assert globex.upload_adapter(adapter_dirs["qv"], "fine").version == 1
            # The stalled uploads are ended by the idle timeout, and leave nothing behind.
            for future in stalled:
                with pytest.raises(grpc.RpcError) as err:
                    future.result(30)
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert "--upload-idle-seconds" in (err.value.details() or "")
                assert str(data_dir(server)) not in (err.value.details() or "")
        finally:
            release.set()
    assert wait_until(lambda: _in_progress(server) == 0)
    assert tmp_entries(data_dir(server)) == []
    assert wait_until(lambda: open_fds() <= baseline_fds + 4), (open_fds(), baseline_fds)
    with client_for(server, "acme") as acme:
        assert acme.upload_adapter(adapter_dirs["qv"], "after").version == 1


def test_an_upload_that_trickles_past_its_deadline_is_ended(start_server: ServerFactory) -> None:
    server = start_server(upload_idle_seconds=5.0, upload_deadline_seconds=1.5)
    stop = threading.Event()

    head = b'{"t":{"dtype":"F32","shape":[1000],"data_offsets":[0,4000]}}'

    def trickle() -> Iterator[object]:
        yield upload_header("slow", 8 + len(head) + 4000)
        # A plausible header, then a byte every 0.2 s: never idle, never done.
        yield chunk(len(head).to_bytes(8, "little") + head)
        while not stop.wait(0.2):
            yield chunk(b"\0")

    with RawStubs(server.target) as raw:
        try:
            with pytest.raises(grpc.RpcError) as err:
                raw.adapters.UploadAdapter(trickle(), metadata=metadata("acme"), timeout=60)
        finally:
            stop.set()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value.details()
    assert "--upload-deadline-seconds" in (err.value.details() or "")
    assert wait_until(lambda: tmp_entries(data_dir(server)) == [])


def test_an_upload_whose_deadline_passes_during_validation_is_not_stored(
    start_server: ServerFactory, adapter_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller is told DEADLINE_EXCEEDED, so the upload must not commit behind its back."""
    server = start_server(upload_deadline_seconds=1.0)
    service = server.server.runtime.adapter_service
    validate, gate = service.validate, threading.Event()

    def slow_validate(*args, **kwargs):  # type: ignore[no-untyped-def]
        gate.wait(60)
        return validate(*args, **kwargs)

    monkeypatch.setattr(service, "validate", slow_validate)
    with RawStubs(server.target) as raw:
        try:
            with pytest.raises(grpc.RpcError) as err:
                raw.adapters.UploadAdapter(
                    iter(_whole_upload(adapter_dirs["qv"], "late")),
                    metadata=metadata("acme"),
                    timeout=60,
                )
        finally:
            gate.set()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value.details()
    assert wait_until(lambda: tmp_entries(data_dir(server)) == []), tmp_entries(data_dir(server))
    assert wait_until(lambda: _in_progress(server) == 0)
    with client_for(server, "acme") as acme:
        assert acme.list_adapters() == []


def test_the_server_wide_upload_cap_names_its_flag(start_server: ServerFactory) -> None:
    server = start_server(tenant_max_uploads=2, max_uploads=2, upload_idle_seconds=30.0)
    release = threading.Event()
    with RawStubs(server.target) as raw:
        try:
            futures = [
                raw.adapters.UploadAdapter.future(
                    stalled_stream([upload_header(f"s{t}", 1000)], release, []),
                    metadata=metadata(t),
                    timeout=60,
                )
                for t in ("acme", "globex")
            ]
            assert wait_until(lambda: _in_progress(server) == 2)
            with pytest.raises(grpc.RpcError) as err:
                raw.adapters.UploadAdapter(
                    iter([upload_header("x", 1000)]), metadata=metadata("root"), timeout=30
                )
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-uploads" in (err.value.details() or "")
        finally:
            release.set()
        for future in futures:
            with pytest.raises(grpc.RpcError):
                future.result(30)  # the stream ends without a weights file: refused
    assert wait_until(lambda: _in_progress(server) == 0)
    assert wait_until(lambda: tmp_entries(data_dir(server)) == [])


# ---- 4. quota bypass with concurrent uploads --------------------------------------------------


def test_concurrent_uploads_cannot_exceed_the_adapter_quota(
    start_server: ServerFactory, adapter_dirs: dict[str, Path]
) -> None:
    server = start_server(tenant_max_adapters=3, tenant_max_uploads=16)
    barrier = threading.Barrier(10)

    def upload(i: int) -> tuple[grpc.StatusCode, str]:
        with client_for(server, "acme") as acme:
            barrier.wait(30)
            return _code(lambda: acme.upload_adapter(adapter_dirs["qv"], f"quota{i}"))

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(upload, range(10)))
    ok = [r for r in results if r[0] == grpc.StatusCode.OK]
    refused = [r for r in results if r[0] != grpc.StatusCode.OK]
    assert 1 <= len(ok) <= 3, results
    assert all(code == grpc.StatusCode.RESOURCE_EXHAUSTED for code, _ in refused), refused
    assert all("--tenant-max-adapters" in details for _, details in refused), refused
    with client_for(server, "acme") as acme:
        assert len(acme.list_adapters()) == len(ok)
    assert tmp_entries(data_dir(server)) == []


def test_bytes_of_uploads_in_progress_count_against_the_quota(
    start_server: ServerFactory, adapter_dirs: dict[str, Path]
) -> None:
    size = (adapter_dirs["qv"] / "adapter_model.safetensors").stat().st_size
    server = start_server(tenant_max_adapter_bytes=size * 3 // 2, upload_idle_seconds=30.0)
    release = threading.Event()
    with RawStubs(server.target) as raw:
        try:
            pending = raw.adapters.UploadAdapter.future(
                stalled_stream([upload_header("pending", size)], release, []),
                metadata=metadata("acme"),
                timeout=60,
            )
            assert wait_until(lambda: _in_progress(server) == 1)
            with client_for(server, "acme") as acme:
                code, details = _code(lambda: acme.upload_adapter(adapter_dirs["qv"], "second"))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
            assert "uploads in progress" in details and "--tenant-max-adapter-bytes" in details
        finally:
            release.set()
        with pytest.raises(grpc.RpcError):
            pending.result(30)
    # The reservation ends with its upload: the same upload now fits.
    assert wait_until(lambda: _in_progress(server) == 0)
    with client_for(server, "acme") as acme:
        assert acme.upload_adapter(adapter_dirs["qv"], "second").version == 1


# ---- 5. orphaned temp directories -------------------------------------------------------------


def test_cancelled_and_disconnected_uploads_leave_nothing_in_tmp(
    start_server: ServerFactory, adapter_dirs: dict[str, Path]
) -> None:
    server = start_server(tenant_max_uploads=64)
    weights = (adapter_dirs["qv"] / "adapter_model.safetensors").read_bytes()
    release = threading.Event()
    try:
        for round_ in range(4):
            with RawStubs(server.target) as raw:
                futures = []
                for i in range(10):
                    # Cancel at different points: before the header, after it, mid-weights.
                    first = [upload_header(f"c{round_}-{i}", len(weights))][: min(i, 1)]
                    if i >= 5:
                        first.append(chunk(weights[: 100 * i]))
                    futures.append(
                        raw.adapters.UploadAdapter.future(
                            stalled_stream(first, release, []),
                            metadata=metadata("acme"),
                            timeout=60,
                        )
                    )
                for future in futures[: len(futures) // 2]:
                    future.cancel()
            # Leaving the block closed the channel: the rest are disconnects.
            assert wait_until(lambda: _in_progress(server) == 0), _in_progress(server)
            assert wait_until(lambda: tmp_entries(data_dir(server)) == []), tmp_entries(
                data_dir(server)
            )
    finally:
        release.set()
    with client_for(server, "acme") as acme:
        assert acme.list_adapters() == []


def _whole_upload(adapter_dir: Path, name: str) -> list[adapters_pb2.UploadAdapterRequest]:
    """Every message of a valid upload of `adapter_dir` as `name` (a small adapter: one chunk)."""
    config = (adapter_dir / "adapter_config.json").read_bytes()
    weights = (adapter_dir / "adapter_model.safetensors").read_bytes()
    header = upload_header(name, len(weights), config=config)
    header.header.files[1].sha256 = hashlib.sha256(weights).hexdigest()
    return [header, chunk(config, weights=False), chunk(weights)]


def test_an_upload_cancelled_while_its_validation_is_queued_is_neither_stored_nor_left_in_tmp(
    start_server: ServerFactory, adapter_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every validation worker busy, a finished upload waits in their queue; its caller leaves.

    Cancelling the queued job used to skip finish(), the only cleanup left: its temp directory
    and two descriptors leaked until the next start. The job must still run, and abort.
    """
    submitted: list[int] = []

    class CountingPool(ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
            submitted.append(1)
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(
        adapters_api,
        "helper_pool",
        lambda name, workers=None: CountingPool(workers, thread_name_prefix=name),
    )
    server = start_server(tenant_max_uploads=8)
    service = server.server.runtime.adapter_service
    validate, gate, entered = service.validate, threading.Event(), []

    def gated_validate(*args, **kwargs):  # type: ignore[no-untyped-def]
        entered.append(1)
        gate.wait(60)
        return validate(*args, **kwargs)

    monkeypatch.setattr(service, "validate", gated_validate)
    workers = adapters_api.VALIDATION_WORKERS
    with RawStubs(server.target) as raw, ThreadPoolExecutor(workers) as pool:
        try:
            blockers = [
                pool.submit(
                    raw.adapters.UploadAdapter,
                    iter(_whole_upload(adapter_dirs["qv"], f"busy{i}")),
                    metadata=metadata("acme"),
                    timeout=60,
                )
                for i in range(workers)
            ]
            assert wait_until(lambda: len(entered) == workers), entered
            victim = raw.adapters.UploadAdapter.future(
                iter(_whole_upload(adapter_dirs["qv"], "victim")),
                metadata=metadata("acme"),
                timeout=60,
            )
            assert wait_until(lambda: len(submitted) == workers + 1), submitted  # queued
            victim.cancel()
        finally:
            gate.set()
        assert [b.result(60).name for b in blockers] == [f"busy{i}" for i in range(workers)]
    assert victim.cancelled()
    assert wait_until(lambda: tmp_entries(data_dir(server)) == []), tmp_entries(data_dir(server))
    assert wait_until(lambda: _in_progress(server) == 0), _in_progress(server)
    with client_for(server, "acme") as acme:  # the cancelled upload was never committed
        assert sorted(a.name for a in acme.list_adapters()) == [f"busy{i}" for i in range(workers)]
    assert len(entered) == workers  # finish() saw the cancel before validating


# ---- 6. memory after refused uploads ----------------------------------------------------------


def test_an_implausible_weights_file_is_refused_at_its_first_bytes(
    start_server: ServerFactory,
) -> None:
    """The server refuses after the first chunk, without waiting for the other 255 MiB."""
    server = start_server(max_adapter_bytes=256 << 20)
    release = threading.Event()
    sent: list[int] = []
    junk = bytes(range(256)) * 256  # 64 KiB; its first 8 bytes claim a huge header
    with RawStubs(server.target) as raw:
        try:
            stream = stalled_stream([upload_header("junk", 256 << 20), chunk(junk)], release, sent)
            with pytest.raises(grpc.RpcError) as err:
                raw.adapters.UploadAdapter(stream, metadata=metadata("acme"), timeout=30)
        finally:
            release.set()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "adapter_model.safetensors" in (err.value.details() or "")
    assert len(sent) == 2
    assert wait_until(lambda: tmp_entries(data_dir(server)) == [])


# ---- 7. unauthenticated log flooding ----------------------------------------------------------


def test_the_access_log_is_bounded_and_one_line_per_record(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    log_path = tmp_path / "access.log"
    server = start_server(access_log=str(log_path))
    huge_name = "n" * 1_000_000
    with RawStubs(server.target) as raw:
        for _ in range(5):  # no key at all, then a wrong key
            for meta in ((), (("authorization", "Bearer wrong"),)):
                with pytest.raises(grpc.RpcError) as err:
                    raw.inference.Generate(
                        inference_pb2.GenerateRequest(adapter=huge_name, prompt="x" * 100_000),
                        metadata=meta,
                        timeout=30,
                    )
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        unauthenticated_bytes = log_path.stat().st_size
        # 10 records of an unauthenticated call carry none of its free text.
        assert unauthenticated_bytes < 10 * 1024, unauthenticated_bytes
        assert "nnnn" not in log_path.read_text(encoding="utf-8")
        # An authenticated caller's adapter name is logged, clipped, with separators escaped.
        for name in (huge_name, "a\u2028b\u2029c\u0085d\ne\rf"):
            with pytest.raises(grpc.RpcError):
                raw.inference.Generate(
                    inference_pb2.GenerateRequest(adapter=name, prompt="hi"),
                    metadata=metadata("acme"),
                    timeout=30,
                )
    data = log_path.read_bytes()
    assert len(data) < 16 * 1024, len(data)
    for raw_separator in ("\u2028", "\u2029", "\u0085", "\r"):
        assert raw_separator.encode() not in data
    lines = data.decode("utf-8").split("\n")
    assert lines[-1] == "" and len(lines) - 1 == 12, lines
    records = [json.loads(line) for line in lines[:-1]]
    assert all(r["tenant"] == "-" and r["adapter"] == "" for r in records[:10])
    assert records[10]["tenant"] == "acme" and len(records[10]["adapter"]) < 400
    assert records[11]["adapter"] == "a\u2028b\u2029c\u0085d\ne\rf"


# ---- 8. the rest ------------------------------------------------------------------------------


def _raw_unary(raw: RawStubs, method: str) -> Callable[..., bytes]:
    return raw.channel.unary_unary(method)  # bytes in, bytes out


@pytest.mark.parametrize(
    ("method", "payload"),
    [
        ("/loraserve.v1.Inference/Generate", b"\x12\x02\xff\xfe"),  # prompt: invalid UTF-8
        ("/loraserve.v1.Inference/GenerateStream", b"\x0a\x03\xc3\x28\x41"),  # adapter
        ("/loraserve.v1.Adapters/ListAdapters", b"\x0a\x01\x80"),  # tenant
        ("/loraserve.v1.Adapters/GetAdapter", b"\xff\xff\xff\xff"),  # not protobuf at all
        ("/loraserve.v1.Inference/GetServerInfo", b"\x0a\x05ab"),  # truncated field
    ],
)
def test_undecodable_requests_are_invalid_argument_without_a_traceback(
    server: BackgroundServer, method: str, payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    with RawStubs(server.target) as raw, caplog.at_level(logging.WARNING):
        if method.endswith("GenerateStream"):
            call = raw.channel.unary_stream(method)
            with pytest.raises(grpc.RpcError) as err:
                list(call(payload, metadata=metadata("acme"), timeout=30))
        else:
            with pytest.raises(grpc.RpcError) as err:
                _raw_unary(raw, method)(payload, metadata=metadata("acme"), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "not a valid protobuf message" in (err.value.details() or "")
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


def test_an_undecodable_message_in_an_upload_stream_is_refused_and_cleaned_up(
    start_server: ServerFactory,
) -> None:
    server = start_server()
    header = upload_header("corrupt", 1000).SerializeToString()
    with RawStubs(server.target) as raw:
        call = raw.channel.stream_unary("/loraserve.v1.Adapters/UploadAdapter")
        with pytest.raises(grpc.RpcError) as err:
            call(iter([header, b"\x12\x03\xff\xff\xff"]), metadata=metadata("acme"), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert wait_until(lambda: tmp_entries(data_dir(server)) == [])


def test_tenants_see_the_model_name_and_never_its_path(
    server: BackgroundServer, default_model: Path
) -> None:
    from prometheus_client import generate_latest

    with client_for(server, "globex") as globex:
        info = globex.server_info()
    assert info.model_name == default_model.name and info.model_path == ""
    exposition = generate_latest(server.server.metrics.registry).decode()
    assert f'model="{default_model.name}"' in exposition
    assert str(default_model) not in exposition


def test_an_admin_cannot_create_adapters_for_tenants_not_in_the_tenants_file(
    server: BackgroundServer, adapter_dirs: dict[str, Path]
) -> None:
    with client_for(server, "root") as admin:
        code, details = _code(
            lambda: admin.upload_adapter(adapter_dirs["qv"], "typo", tenant="acmee")
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert "not a tenant" in details
        # Acting for a tenant that exists still works.
        assert admin.upload_adapter(adapter_dirs["qv"], "byadmin", tenant="globex").version == 1
        admin.delete_adapter("byadmin", tenant="globex")
    assert not (Path(server.config.data_dir) / "adapters" / "tenants" / "acmee").exists()


def test_chunks_over_4_mib_are_refused(start_server: ServerFactory) -> None:
    server = start_server()
    big = bytes(6 << 20)
    with RawStubs(server.target) as raw, pytest.raises(grpc.RpcError) as err:
        raw.adapters.UploadAdapter(
            iter([upload_header("big", len(big)), chunk(big)]),
            metadata=metadata("acme"),
            timeout=30,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 4194304 (4 MiB) per chunk" in (err.value.details() or "")
    assert wait_until(lambda: tmp_entries(data_dir(server)) == [])


# ---- Done when: a flood from one tenant leaves the others served ------------------------------


def _flood(server: BackgroundServer, stop: threading.Event, kind: str) -> int:
    """Sends one kind of abuse as acme (or anonymously) until `stop`; returns calls made."""
    calls = 0
    release = threading.Event()
    with RawStubs(server.target) as raw:
        pending = []
        try:
            while not stop.is_set() and calls < 200:
                calls += 1
                if kind == "huge prompts":
                    request = inference_pb2.GenerateRequest(prompt="z" * 7_000_000)
                    _code(lambda r=request: raw.inference.Generate(r, metadata=metadata("acme")))
                elif kind == "bad sampling":
                    request = inference_pb2.GenerateRequest(
                        prompt="hi", sampling=inference_pb2.SamplingParams(temperature=1e-45)
                    )
                    _code(lambda r=request: raw.inference.Generate(r, metadata=metadata("acme")))
                elif kind == "anonymous junk":
                    request = inference_pb2.GenerateRequest(adapter="j" * 1_000_000, prompt="x")
                    _code(lambda r=request: raw.inference.Generate(r, timeout=30))
                    _code(lambda: _raw_unary(raw, "/loraserve.v1.Inference/Generate")(b"\xff"))
                elif kind == "stalled uploads":
                    pending.append(
                        raw.adapters.UploadAdapter.future(
                            stalled_stream([upload_header(f"f{calls}", 1 << 20)], release, []),
                            metadata=metadata("acme"),
                            timeout=30,
                        )
                    )
                    stop.wait(0.05)
        finally:
            release.set()
            for future in pending:
                future.cancel()
    return calls


def test_a_tenant_flooding_every_rpc_leaves_other_tenants_served(
    start_server: ServerFactory, adapter_dirs: dict[str, Path]
) -> None:
    server = start_server(tenant_max_uploads=4, upload_idle_seconds=1.0, access_log="")
    with client_for(server, "globex") as globex:
        globex.upload_adapter(adapter_dirs["qv"], "mine")

        def timed_call(i: int) -> float:
            started = time.monotonic()
            out = globex.generate(f"steady {i}", adapter="mine", max_new_tokens=4, timeout_s=60)
            assert len(out.token_ids) == 4
            return time.monotonic() - started

        for i in range(3):
            timed_call(i)  # warm up
        baseline = [timed_call(i) for i in range(10)]
        baseline_fds = open_fds()
        stop = threading.Event()
        kinds = ["huge prompts", "bad sampling", "anonymous junk", "stalled uploads"]
        with ThreadPoolExecutor(len(kinds)) as pool:
            floods = [pool.submit(_flood, server, stop, kind) for kind in kinds]
            try:
                during = [timed_call(i) for i in range(20)]  # each must succeed
            finally:
                stop.set()
            sent = {kind: f.result(60) for kind, f in zip(kinds, floods, strict=True)}
        assert all(n > 0 for n in sent.values()), sent
        # Latency stays within a multiple of normal (medians: robust to one slow call). The
        # flood runs in this process, so it shares the server's CPU and GIL: measured 4-9x on
        # 2 shared cores. Before the fixes, each huge prompt alone held the loop for seconds.
        assert statistics.median(during) <= 20 * statistics.median(baseline) + 0.1, (
            baseline,
            during,
        )
    # Afterwards: no upload in progress, nothing in tmp/, descriptors back to the baseline.
    assert wait_until(lambda: _in_progress(server) == 0), _in_progress(server)
    assert wait_until(lambda: tmp_entries(data_dir(server)) == []), tmp_entries(data_dir(server))
    assert wait_until(lambda: open_fds() <= baseline_fds + 4), (open_fds(), baseline_fds)
    with client_for(server, "acme") as acme:
        assert acme.list_adapters() == []  # none of the flood's uploads was stored


# ---- siblings found while fixing the classes above ---------------------------------------------


def test_repeated_fields_are_bounded_before_they_are_walked(
    server: BackgroundServer, gated_tokenizer: _GatedTokenizer
) -> None:
    """Half a million chat turns, or stop sequences, are refused by their count (off the loop)."""
    turns = [inference_pb2.ChatMessage(role="user", content="x")] * 500_000
    requests = {
        "messages:": inference_pb2.GenerateRequest(messages=turns),
        "stop:": inference_pb2.GenerateRequest(
            prompt="hi", sampling=inference_pb2.SamplingParams(stop=["s"] * 500_000)
        ),
    }
    with RawStubs(server.target) as raw:
        for field, request in requests.items():
            with pytest.raises(grpc.RpcError) as err:
                raw.inference.Generate(request, metadata=metadata("acme"), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (err.value.details() or "").startswith(field), err.value.details()
        header = upload_header("many", 1000)
        header.header.files.extend([header.header.files[0]] * 100_000)
        with pytest.raises(grpc.RpcError) as err:
            raw.adapters.UploadAdapter(iter([header]), metadata=metadata("acme"), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "declarations" in (err.value.details() or "")
    assert gated_tokenizer.longest_text < 1000


def test_a_storage_error_names_no_server_path(
    start_server: ServerFactory, adapter_dirs: dict[str, Path]
) -> None:
    """Out of descriptors (simulated) is RESOURCE_EXHAUSTED with the reason, not the file."""
    import errno

    server = start_server()
    store = server.server.runtime.adapter_service.store
    secret = str(store.root / "tmp" / "upload-x")

    def out_of_descriptors(tenant: str, name: str) -> object:
        raise OSError(errno.EMFILE, "Too many open files", secret)

    store.begin_upload = out_of_descriptors
    try:
        with client_for(server, "acme") as acme:
            code, details = _code(lambda: acme.upload_adapter(adapter_dirs["qv"], "x"))
    finally:
        del store.begin_upload
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert "Too many open files" in details
    assert str(store.root) not in details and "upload-x" not in details
