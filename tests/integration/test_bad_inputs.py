"""Every bad input gets a specific status, nothing is stored, and the server keeps serving."""

from __future__ import annotations

import hashlib
import json
import math
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load, save
from serving_support import KEYS, AdapterShape, build_test_model, make_peft_adapter

from loraserve.client.sync import LoraServeClient
from loraserve.server.background import BackgroundServer
from loraserve.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc

CONFIG = adapters_pb2.ADAPTER_FILE_CONFIG
WEIGHTS = adapters_pb2.ADAPTER_FILE_WEIGHTS
Files = tuple[bytes, bytes]


@pytest.fixture(scope="module")
def stubs(server: BackgroundServer) -> Iterator[tuple]:
    channel = grpc.insecure_channel(server.target)
    yield adapters_pb2_grpc.AdaptersStub(channel), inference_pb2_grpc.InferenceStub(channel)
    channel.close()


METADATA = (("authorization", f"Bearer {KEYS['acme']}"),)


def _declare(kind: int, data: bytes) -> adapters_pb2.FileDeclaration:
    return adapters_pb2.FileDeclaration(
        file=kind, size=len(data), sha256=hashlib.sha256(data).hexdigest()
    )


def _requests(
    name: str,
    files: Files,
    *,
    declared: Files | None = None,
    sent: Files | None = None,
) -> Iterator[adapters_pb2.UploadAdapterRequest]:
    """A header declaring `declared` (default: files), then chunks of `sent` (default: files)."""
    config, weights = declared or files
    header = adapters_pb2.UploadHeader(
        name=name, files=[_declare(CONFIG, config), _declare(WEIGHTS, weights)]
    )
    yield adapters_pb2.UploadAdapterRequest(header=header)
    body_config, body_weights = sent or files
    yield adapters_pb2.UploadAdapterRequest(
        chunk=adapters_pb2.FileChunk(file=CONFIG, data=body_config)
    )
    for start in range(0, len(body_weights), 65536):
        chunk = adapters_pb2.FileChunk(file=WEIGHTS, data=body_weights[start : start + 65536])
        yield adapters_pb2.UploadAdapterRequest(chunk=chunk)


def _files(directory: Path) -> Files:
    return (
        (directory / "adapter_config.json").read_bytes(),
        (directory / "adapter_model.safetensors").read_bytes(),
    )


def _with_config(files: Files, **changes: object) -> Files:
    config = json.loads(files[0])
    config.update(changes)
    return json.dumps(config).encode(), files[1]


def _with_tensors(files: Files, edit: Callable[[dict[str, torch.Tensor]], None]) -> Files:
    tensors = load(files[1])
    edit(tensors)
    return files[0], save(tensors)


def _first_key(tensors: dict[str, torch.Tensor], part: str) -> str:
    return sorted(k for k in tensors if part in k)[0]


def _set_nan(t: dict[str, torch.Tensor]) -> None:
    t[_first_key(t, "lora_B")][0, 0] = math.nan


def _set_inf(t: dict[str, torch.Tensor]) -> None:
    t[_first_key(t, "lora_A")][0, 0] = math.inf


def _transpose(t: dict[str, torch.Tensor]) -> None:
    key = _first_key(t, "lora_A")
    t[key] = t[key].T.contiguous()


def _drop(t: dict[str, torch.Tensor]) -> None:
    del t[_first_key(t, "lora_B")]


def _extra(t: dict[str, torch.Tensor]) -> None:
    t["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(8, 128)


def _to_int(t: dict[str, torch.Tensor]) -> None:
    key = _first_key(t, "lora_A")
    t[key] = t[key].to(torch.int32)


def _lying_header(weights: bytes) -> bytes:
    n = int.from_bytes(weights[:8], "little")
    header = json.loads(weights[8 : 8 + n])
    first = sorted(k for k in header if k != "__metadata__")[0]
    start, end = header[first]["data_offsets"]
    header[first]["data_offsets"] = [start + 4, end + 4]
    raw = json.dumps(header).encode().ljust(n)
    return len(raw).to_bytes(8, "little") + raw + weights[8 + n :]


def _bad_upload_cases(good: Files, other_model: Files) -> dict[str, tuple[Files, dict]]:
    """name -> (files as sent, extra _requests kwargs); each must be INVALID_ARGUMENT."""
    pickled = pickle.dumps({"lora_A": [1.0, 2.0]})
    return {
        "pickle weights": ((good[0], pickled), {}),
        "checksum mismatch": (
            good,
            {"declared": good, "sent": (good[0], good[1][:-1] + bytes([good[1][-1] ^ 1]))},
        ),
        "truncated stream": (good, {"sent": (good[0], good[1][: len(good[1]) // 2])}),
        "more bytes than declared": (good, {"sent": (good[0], good[1] + b"\0" * 16)}),
        "bytes appended after data": ((good[0], good[1] + b"\0" * 16), {}),
        "header lies about offsets": ((good[0], _lying_header(good[1])), {}),
        "huge header length": ((good[0], (10**9).to_bytes(8, "little") + good[1][8:]), {}),
        "wrong shapes (other base model)": (other_model, {}),
        "transposed tensor": (_with_tensors(good, _transpose), {}),
        "NaN": (_with_tensors(good, _set_nan), {}),
        "Inf": (_with_tensors(good, _set_inf), {}),
        "missing tensor": (_with_tensors(good, _drop), {}),
        "extra tensor": (_with_tensors(good, _extra), {}),
        "integer tensor": (_with_tensors(good, _to_int), {}),
        "rank above max": (_with_config(good, r=64), {}),
        "rank does not match tensors": (_with_config(good, r=4), {}),
        "unknown target module": (_with_config(good, target_modules=["q_proj", "qq_proj"]), {}),
        "regex matches nothing": (_with_config(good, target_modules=r".*\.nothing"), {}),
        "lm_head target": (_with_config(good, target_modules=["q_proj", "v_proj", "lm_head"]), {}),
        "dora": (_with_config(good, use_dora=True), {}),
        "modules_to_save": (_with_config(good, modules_to_save=["lm_head"]), {}),
        "layer_replication": (_with_config(good, layer_replication=[[0, 2]]), {}),
        "rank_pattern": (_with_config(good, rank_pattern={"q_proj": 4}), {}),
        "not LORA": (_with_config(good, peft_type="IA3"), {}),
        "config not JSON": ((b"{not json", good[1]), {}),
        "config not an object": ((b"[1, 2]", good[1]), {}),
        "huge config": ((b" " * (64 * 1024 + 1) + good[0], good[1]), {}),
    }


@pytest.fixture(scope="module")
def good_files(adapter_dirs: dict[str, Path]) -> Files:
    return _files(adapter_dirs["qv"])


@pytest.fixture(scope="module")
def other_model_files(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Files:
    other = build_test_model("llama", model_cache)  # hidden 64: shapes differ from the default
    shape = AdapterShape(rank=8, alpha=16, targets=["q_proj", "v_proj"], seed=1)
    return _files(make_peft_adapter(other, tmp_path_factory.mktemp("other") / "a", shape))


def _assert_still_serving(acme: LoraServeClient) -> None:
    response = acme.generate("still here?", max_new_tokens=2, ignore_eos=True)
    assert len(response.token_ids) == 2


CASES = [
    "pickle weights",
    "checksum mismatch",
    "truncated stream",
    "more bytes than declared",
    "bytes appended after data",
    "header lies about offsets",
    "huge header length",
    "wrong shapes (other base model)",
    "transposed tensor",
    "NaN",
    "Inf",
    "missing tensor",
    "extra tensor",
    "integer tensor",
    "rank above max",
    "rank does not match tensors",
    "unknown target module",
    "regex matches nothing",
    "lm_head target",
    "dora",
    "modules_to_save",
    "layer_replication",
    "rank_pattern",
    "not LORA",
    "config not JSON",
    "config not an object",
    "huge config",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_upload_is_refused_and_nothing_stored(
    case: str,
    stubs: tuple,
    acme: LoraServeClient,
    good_files: Files,
    other_model_files: Files,
    server: BackgroundServer,
) -> None:
    files, kwargs = _bad_upload_cases(good_files, other_model_files)[case]
    adapters_stub, _ = stubs
    with pytest.raises(grpc.RpcError) as err:
        adapters_stub.UploadAdapter(
            _requests("bad", files, **kwargs), metadata=METADATA, timeout=30
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details()
    assert [a.name for a in acme.list_adapters()] == []
    tmp = Path(server.config.data_dir) / "adapters" / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == [], "a refused upload left files behind"
    _assert_still_serving(acme)


def test_refusals_name_the_problem(stubs: tuple, good_files: Files) -> None:
    adapters_stub, _ = stubs
    expectations = {
        "dora": (_with_config(good_files, use_dora=True), "use_dora"),
        "modules": (_with_config(good_files, modules_to_save=["x"]), "modules_to_save"),
        "rank": (_with_config(good_files, r=64), "adapter_config.json:r"),
        "nan": (_with_tensors(good_files, _set_nan), "NaN"),
    }
    for files, needle in expectations.values():
        with pytest.raises(grpc.RpcError) as err:
            adapters_stub.UploadAdapter(_requests("bad", files), metadata=METADATA, timeout=30)
        assert needle in err.value.details()


@pytest.mark.parametrize(
    "name", ["", "../evil", "a/b", "a\\b", "..", ".", ".hidden", "tab\tname", "naïve", "x" * 65]
)
def test_bad_adapter_names(
    name: str, stubs: tuple, good_files: Files, acme: LoraServeClient
) -> None:
    adapters_stub, _ = stubs
    with pytest.raises(grpc.RpcError) as err:
        adapters_stub.UploadAdapter(_requests(name, good_files), metadata=METADATA, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        acme.generate("hi", adapter=name) if name else acme.get_adapter(name)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert acme.list_adapters() == []
    _assert_still_serving(acme)


def test_upload_protocol_errors(stubs: tuple, good_files: Files, acme: LoraServeClient) -> None:
    adapters_stub, _ = stubs
    chunk = adapters_pb2.UploadAdapterRequest(chunk=adapters_pb2.FileChunk(file=CONFIG, data=b"{}"))
    header_only = adapters_pb2.UploadAdapterRequest(
        header=adapters_pb2.UploadHeader(name="x", files=[_declare(CONFIG, good_files[0])])
    )
    oversize = adapters_pb2.UploadAdapterRequest(
        header=adapters_pb2.UploadHeader(
            name="x",
            files=[
                _declare(CONFIG, good_files[0]),
                adapters_pb2.FileDeclaration(file=WEIGHTS, size=10**12, sha256="0" * 64),
            ],
        )
    )
    bad_sha = adapters_pb2.UploadAdapterRequest(
        header=adapters_pb2.UploadHeader(
            name="x",
            files=[
                _declare(CONFIG, good_files[0]),
                adapters_pb2.FileDeclaration(file=WEIGHTS, size=10, sha256="not-hex"),
            ],
        )
    )
    for stream, needle in (
        ([], "first message"),
        ([chunk], "first message"),
        ([header_only], "both"),
        ([oversize], "exceeds the limit"),
        ([bad_sha], "sha256"),
        ([next(_requests("x", good_files)), next(_requests("x", good_files))], "header"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            adapters_stub.UploadAdapter(iter(stream), metadata=METADATA, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in err.value.details(), err.value.details()
    assert acme.list_adapters() == []
    _assert_still_serving(acme)


def _request(**fields: object) -> inference_pb2.GenerateRequest:
    sampling = fields.pop("sampling", None)
    request = inference_pb2.GenerateRequest(**fields)  # type: ignore[arg-type]
    if sampling:
        request.sampling.CopyFrom(inference_pb2.SamplingParams(**sampling))  # type: ignore[arg-type]
    return request


BAD_GENERATE = {
    "no prompt": (_request(), "exactly one"),
    "prompt and messages": (
        _request(prompt="x", messages=[inference_pb2.ChatMessage(role="user", content="y")]),
        "exactly one",
    ),
    "unknown role": (
        _request(messages=[inference_pb2.ChatMessage(role="wizard", content="y")]),
        "role",
    ),
    "max_new_tokens 0": (_request(prompt="x", sampling={"max_new_tokens": 0}), "max_new_tokens"),
    "max_new_tokens over limit": (
        _request(prompt="x", sampling={"max_new_tokens": 100000}),
        "max_new_tokens",
    ),
    "negative temperature": (_request(prompt="x", sampling={"temperature": -1.0}), "temperature"),
    "NaN temperature": (_request(prompt="x", sampling={"temperature": math.nan}), "temperature"),
    "top_p zero": (_request(prompt="x", sampling={"top_p": 0.0}), "top_p"),
    "top_p above one": (_request(prompt="x", sampling={"top_p": 1.5}), "top_p"),
    "too many stops": (_request(prompt="x", sampling={"stop": ["a"] * 9}), "stop"),
    "empty stop": (_request(prompt="x", sampling={"stop": [""]}), "stop"),
    "prompt too long": (_request(prompt="word " * 5000), "exceeds the limit"),
}


@pytest.mark.parametrize("case", sorted(BAD_GENERATE))
def test_bad_generate_requests(case: str, stubs: tuple, acme: LoraServeClient) -> None:
    request, needle = BAD_GENERATE[case]
    _, inference_stub = stubs
    for call in (
        inference_stub.Generate,
        lambda r, **kw: list(inference_stub.GenerateStream(r, **kw)),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call(request, metadata=METADATA, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
        assert needle in err.value.details(), err.value.details()
    _assert_still_serving(acme)


def test_unknown_adapter_is_not_found_never_base(acme: LoraServeClient) -> None:
    for call in (
        lambda: acme.generate("hi", adapter="ghost"),
        lambda: list(acme.generate_stream("hi", adapter="ghost")),
        lambda: acme.get_adapter("ghost"),
        lambda: acme.delete_adapter("ghost"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
