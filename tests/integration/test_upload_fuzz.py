"""Fuzzing uploads: mutants of a valid PEFT adapter never crash the server or get stored broken.

Each example takes the valid "qv" adapter (adapter_config.json and adapter_model.safetensors),
applies one or two random mutations (byte flips, truncations, insertions, edits of the
safetensors header JSON or of the config JSON) and uploads the result through the real gRPC
server with a correct header (sizes and sha256 of the mutated bytes), so every mutant reaches
validation. For every example the server must answer OK (the mutant happened to stay valid) or a
specific non-INTERNAL, non-UNKNOWN status; a refused name must not be listed, an accepted one
must be describable and usable for generation; and the server must keep answering.

The hypothesis profile is fixed (derandomize=True, no example database) so CI runs the same
examples every time.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_support import KEYS

from loraserve.client.sync import LoraServeClient
from loraserve.server.background import BackgroundServer
from loraserve.v1 import adapters_pb2, adapters_pb2_grpc

CONFIG = adapters_pb2.ADAPTER_FILE_CONFIG
WEIGHTS = adapters_pb2.ADAPTER_FILE_WEIGHTS
METADATA = (("authorization", f"Bearer {KEYS['acme']}"),)
Files = tuple[bytes, bytes]


class GoodFiles:
    """The valid adapter's two files, with a short repr for hypothesis' failure reports."""

    def __init__(self, config: bytes, weights: bytes) -> None:
        self.files: Files = (config, weights)

    def __repr__(self) -> str:
        config, weights = self.files
        return f"<valid qv adapter: config {len(config)} B, weights {len(weights)} B>"


_HUGE_NUMERAL = "1" + "0" * 5000
"""An integer literal longer than Python's default int/str conversion limit (4300 digits)."""
_HUGE_PLACEHOLDER = "\x00huge-numeral\x00"

_names = itertools.count()


class Mutation:
    """One edit of the adapter's files, with a readable repr for hypothesis' failure reports.

    A JSON edit that no longer applies (an earlier mutation broke the JSON, removed the entry,
    changed a type) leaves the files unchanged.
    """

    def __init__(self, label: str, apply: Callable[[Files], Files]) -> None:
        self.label = label
        self.apply = apply

    def __call__(self, files: Files) -> Files:
        try:
            return self.apply(files)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, ArithmeticError):
            return files

    def __repr__(self) -> str:
        return self.label.replace(repr(_HUGE_PLACEHOLDER), f"<{len(_HUGE_NUMERAL)}-digit integer>")


# ---- JSON values ------------------------------------------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2, 4, 8, 16, 32, 33, 64, 128, 2**31, 2**63, 2**64, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["F32", "F16", "BF16", "F64", "I32", "U8", "BOOL", "", "LORA", "none"]),
    st.just(_HUGE_PLACEHOLDER),
)
json_values = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=6), children, max_size=3),
    ),
    max_leaves=8,
)
"""Any JSON value, biased towards values that matter to adapters (ranks, dtypes, huge numbers)."""


def _dumps(value: Any) -> str:
    """json.dumps that writes _HUGE_PLACEHOLDER strings as a 5000-digit integer literal."""
    return json.dumps(value).replace(json.dumps(_HUGE_PLACEHOLDER), _HUGE_NUMERAL)


# ---- mutations --------------------------------------------------------------------------------


def _split_weights(weights: bytes) -> tuple[dict[str, Any], bytes]:
    n = int.from_bytes(weights[:8], "little")
    return json.loads(weights[8 : 8 + n]), weights[8 + n :]


def _join_weights(header_text: str, buffer: bytes, pad_to: int | None) -> bytes:
    raw = header_text.encode()
    if pad_to is not None and len(raw) < pad_to:
        raw = raw.ljust(pad_to)  # the reference writer pads the header with spaces
    return len(raw).to_bytes(8, "little") + raw + buffer


@st.composite
def byte_mutations(draw: st.DrawFn, which: int) -> Mutation:
    """Flip, truncate, insert or delete bytes of file `which` (0: config, 1: weights)."""
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite"]))
    # Positions are fractions, biased to the start (the safetensors length and header).
    in_header = draw(st.booleans())
    fraction = draw(st.floats(min_value=0.0, max_value=1.0))
    xor = draw(st.integers(min_value=1, max_value=255))
    blob = draw(st.binary(min_size=1, max_size=16))

    def apply(files: Files) -> Files:
        data = files[which]
        span = len(data)
        if which == 1 and in_header:
            span = min(span, 8 + int.from_bytes(data[:8], "little"))
        pos = min(int(fraction * span), len(data) - 1)
        if kind == "flip":
            data = data[:pos] + bytes([data[pos] ^ xor]) + data[pos + 1 :]
        elif kind == "truncate":
            data = data[: max(pos, 1)]
        elif kind == "insert":
            data = data[:pos] + blob + data[pos:]
        elif kind == "delete":
            data = (data[:pos] + data[pos + len(blob) :]) or data[:1]
        else:
            data = data[:pos] + blob + data[pos + len(blob) :]
        return (data, files[1]) if which == 0 else (files[0], data)

    return Mutation(f"bytes[{which}].{kind}@{fraction:.3f}(xor={xor}, blob={blob!r})", apply)


@st.composite
def header_edits(draw: st.DrawFn) -> Mutation:
    """Edit the safetensors header JSON: one entry's dtype/shape/data_offsets, keys, entries."""
    kind = draw(
        st.sampled_from(
            [
                "set_field",
                "shift_offsets",
                "del_field",
                "add_field",
                "del_entry",
                "add_entry",
                "rename_entry",
                "metadata",
                "swap_offsets",
            ]
        )
    )
    index = draw(st.integers(min_value=0, max_value=1000))
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
    value = draw(json_values)
    delta = draw(st.integers(min_value=-64, max_value=64))
    key = draw(st.sampled_from(["extra", "offsets", "__metadata__", ""]) | st.text(max_size=8))
    keep_length = draw(st.booleans())

    def apply(files: Files) -> Files:
        header, buffer = _split_weights(files[1])
        names = sorted(k for k in header if k != "__metadata__")
        name = names[index % len(names)]
        entry = header[name]
        if kind == "set_field":
            entry[field] = value
        elif kind == "shift_offsets":
            pos = index % 2
            entry["data_offsets"][pos] = entry["data_offsets"][pos] + delta
        elif kind == "del_field":
            del entry[field]
        elif kind == "add_field":
            entry[key or "x"] = value
        elif kind == "del_entry":
            del header[name]
        elif kind == "add_entry":
            header[key or "x"] = value
        elif kind == "rename_entry":
            header[name + (key or ".x")] = header.pop(name)
        elif kind == "metadata":
            header["__metadata__"] = value
        else:
            other = header[names[(index + 1) % len(names)]]
            entry["data_offsets"], other["data_offsets"] = (
                other["data_offsets"],
                entry["data_offsets"],
            )
        n = int.from_bytes(files[1][:8], "little")
        return files[0], _join_weights(_dumps(header), buffer, n if keep_length else None)

    return Mutation(
        f"header.{kind}(index={index}, field={field}, value={value!r}, delta={delta}, key={key!r})",
        apply,
    )


_CONFIG_KEYS = [
    "r",
    "lora_alpha",
    "target_modules",
    "use_rslora",
    "peft_type",
    "bias",
    "task_type",
    "init_lora_weights",
    "use_dora",
    "modules_to_save",
    "rank_pattern",
    "layers_to_transform",
    "lora_dropout",
    "fan_in_fan_out",
    "base_model_name_or_path",
    "unknown_key",
]

_config_values = st.one_of(
    json_values,
    st.lists(
        st.sampled_from(["q_proj", "v_proj", "k_proj", "o_proj", "lm_head", "embed_tokens", ""]),
        max_size=3,
    ),
    st.sampled_from(["all-linear", ".*q_proj", ".*", "(", "[", "a{99999999999}", "(a+)+$"]),
)


@st.composite
def config_edits(draw: st.DrawFn) -> Mutation:
    """Set or delete config keys (r, lora_alpha, target_modules, unsupported or unknown keys)."""
    edits = draw(
        st.lists(
            st.tuples(
                st.sampled_from(_CONFIG_KEYS) | st.text(max_size=8),
                st.booleans(),  # True: delete the key
                _config_values,
            ),
            min_size=1,
            max_size=3,
        )
    )
    whole = draw(st.none() | json_values.filter(lambda v: not isinstance(v, dict)))

    def apply(files: Files) -> Files:
        if whole is not None:
            return _dumps(whole).encode() or b" ", files[1]
        config = json.loads(files[0])
        for key, delete, value in edits:
            if delete:
                config.pop(key, None)
            else:
                config[key] = value
        return _dumps(config).encode(), files[1]

    return Mutation(f"config(edits={edits!r}, whole={whole!r})", apply)


mutations = st.one_of(
    byte_mutations(0),
    byte_mutations(1),
    header_edits(),
    config_edits(),
)


# ---- the test ---------------------------------------------------------------------------------


def _declare(kind: int, data: bytes) -> adapters_pb2.FileDeclaration:
    return adapters_pb2.FileDeclaration(
        file=kind, size=len(data), sha256=hashlib.sha256(data).hexdigest()
    )


def _requests(name: str, files: Files) -> Iterator[adapters_pb2.UploadAdapterRequest]:
    config, weights = files
    header = adapters_pb2.UploadHeader(
        name=name, files=[_declare(CONFIG, config), _declare(WEIGHTS, weights)]
    )
    yield adapters_pb2.UploadAdapterRequest(header=header)
    yield adapters_pb2.UploadAdapterRequest(chunk=adapters_pb2.FileChunk(file=CONFIG, data=config))
    for start in range(0, len(weights), 65536):
        chunk = adapters_pb2.FileChunk(file=WEIGHTS, data=weights[start : start + 65536])
        yield adapters_pb2.UploadAdapterRequest(chunk=chunk)


@pytest.fixture(scope="module")
def upload_stub(server: BackgroundServer) -> Iterator[adapters_pb2_grpc.AdaptersStub]:
    channel = grpc.insecure_channel(server.target)
    yield adapters_pb2_grpc.AdaptersStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def good_files(adapter_dirs: dict[str, Path]) -> GoodFiles:
    qv = adapter_dirs["qv"]
    config = (qv / "adapter_config.json").read_bytes()
    return GoodFiles(config, (qv / "adapter_model.safetensors").read_bytes())


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=st.lists(mutations, min_size=1, max_size=2))
def test_mutated_upload_is_refused_cleanly_or_works(
    steps: list[Mutation],
    upload_stub: adapters_pb2_grpc.AdaptersStub,
    acme: LoraServeClient,
    good_files: GoodFiles,
) -> None:
    files = good_files.files
    for mutate in steps:
        files = mutate(files)
    name = f"fuzz-{next(_names)}"
    try:
        upload_stub.UploadAdapter(_requests(name, files), metadata=METADATA, timeout=30)
    except grpc.RpcError as err:
        code = err.code()
        assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
            f"{code.name}: {err.details()}"
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{code.name}: {err.details()}"
        assert err.details(), "a refusal must say what is wrong"
        # Nothing stored, and the server still answers.
        assert name not in [a.name for a in acme.list_adapters()]
        return
    # Accepted: the mutant was still a valid adapter; it must be fully usable.
    info = acme.get_adapter(name)
    assert info.name == name
    response = acme.generate("fuzz", adapter=name, max_new_tokens=2, ignore_eos=True)
    assert len(response.token_ids) == 2
    acme.delete_adapter(name)
    assert name not in [a.name for a in acme.list_adapters()]


def test_server_still_serves_after_fuzzing(acme: LoraServeClient) -> None:
    response = acme.generate("still here?", max_new_tokens=2, ignore_eos=True)
    assert len(response.token_ids) == 2
    assert not [a for a in acme.list_adapters() if a.name.startswith("fuzz-")]
