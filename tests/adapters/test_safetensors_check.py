"""Strict safetensors structure check: valid files pass, each kind of malformed file is refused."""

from __future__ import annotations

import pickle
import struct
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import save as save_safetensors_bytes

from loraserve.adapters.errors import AdapterTooLargeError, AdapterValidationError
from loraserve.adapters.safetensors_check import TensorHeader, check_safetensors

Build = Callable[[dict, bytes], bytes]


def refused(data: bytes, **kwargs: int) -> AdapterValidationError:
    with pytest.raises(AdapterValidationError) as info:
        check_safetensors(data, **kwargs)
    assert info.value.field.startswith("adapter_model.safetensors")
    return info.value


def two_tensors(build: Build, **entry_changes: dict) -> bytes:
    """a: F32 (2, 3) at [0, 24); b: F16 (4,) at [24, 32); entries optionally overridden."""
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]},
    }
    for name, changes in entry_changes.items():
        header[name] = {**header[name], **changes}
    return build(header, bytes(32))


def test_library_written_file_passes() -> None:
    tensors = {
        "x": torch.zeros(4, 8),  # (4, 8) float32
        "y": torch.ones(3, dtype=torch.bfloat16),  # (3,) bfloat16
        "z": torch.ones(2, 2, dtype=torch.float16),  # (2, 2) float16
        "empty": torch.zeros(0, 5),  # (0, 5) float32
    }
    data = save_safetensors_bytes(tensors, metadata={"format": "pt"})
    headers = check_safetensors(data)
    assert set(headers) == set(tensors)
    assert headers["x"] == TensorHeader("F32", (4, 8), headers["x"].start, headers["x"].start + 128)
    assert headers["empty"].shape == (0, 5)
    assert check_safetensors(memoryview(data)) == headers


def test_hand_built_file_passes(build_safetensors: Build) -> None:
    headers = check_safetensors(two_tensors(build_safetensors))
    assert headers == {
        "a": TensorHeader("F32", (2, 3), 0, 24),
        "b": TensorHeader("F16", (4,), 24, 32),
    }


def test_pickle_bytes_are_refused_with_a_specific_message() -> None:
    # Only pickle.dumps: the bytes are generated, never loaded.
    for payload in (pickle.dumps({"w": [1.0, 2.0]}), pickle.dumps(1), pickle.dumps(1, protocol=2)):
        assert "looks like a pickle/PyTorch .bin file" in refused(payload).message


def test_zip_checkpoint_is_refused_as_pickle() -> None:
    assert "looks like a pickle/PyTorch .bin file" in refused(b"PK\x03\x04" + bytes(60)).message


def test_header_length_starting_with_0x80_is_not_mistaken_for_pickle(
    build_safetensors: Build,
) -> None:
    # A header of exactly 128 bytes makes the first byte 0x80, like a pickle protocol marker.
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    header["__metadata__"] = {"pad": ""}
    raw_len = len(build_safetensors(header, b"")) - 8
    header["__metadata__"]["pad"] = "x" * (128 - raw_len)
    data = build_safetensors(header, bytes(4))
    assert data[0] == 0x80
    assert check_safetensors(data)["a"].shape == (1,)


@pytest.mark.parametrize("data", [b"", b"\x00", bytes(7)])
def test_shorter_than_eight_bytes_is_refused(data: bytes) -> None:
    assert "shorter than the 8-byte header length" in refused(data).message


def test_header_length_beyond_the_file_is_refused(build_safetensors: Build) -> None:
    data = two_tensors(build_safetensors)
    assert "exceeds" in refused(data[:20]).message  # truncated inside the header


def test_truncated_data_is_refused(build_safetensors: Build) -> None:
    data = two_tensors(build_safetensors)
    assert "truncated" in refused(data[:-1]).message


def test_trailing_bytes_are_refused(build_safetensors: Build) -> None:
    data = two_tensors(build_safetensors)
    assert "1 trailing bytes" in refused(data + b"\x00").message


def test_header_too_large_is_refused_before_reading_it() -> None:
    data = struct.pack("<Q", 2_000_000) + b"{" + bytes(10)
    with pytest.raises(AdapterTooLargeError) as info:
        check_safetensors(data)
    assert "at most 1048576" in info.value.message
    assert "at most 16" in refused(struct.pack("<Q", 17) + b"{}", max_header_bytes=16).message


@pytest.mark.parametrize(
    ("header_bytes", "message"),
    [
        (b"[]", "does not start with '{'"),
        (b" {}", "does not start with '{'"),
        (b"{not json}", "not valid JSON"),
        (b"{\xff}", "not UTF-8"),
        (b'{"a": NaN}', "NaN"),
        (
            b'{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}, "a": {}}',
            "more than once",
        ),
        (b'{"__metadata__": {"format": 1}}', "__metadata__ must map strings to strings"),
        (b'{"__metadata__": ["pt"]}', "__metadata__ must map strings to strings"),
    ],
)
def test_bad_headers_are_refused(header_bytes: bytes, message: str) -> None:
    data = struct.pack("<Q", len(header_bytes)) + header_bytes
    assert message in refused(data).message


@pytest.mark.parametrize("dtype", ["I32", "I64", "F64", "U8", "BOOL", "F8_E4M3", "bogus"])
def test_non_lora_dtypes_are_refused(build_safetensors: Build, dtype: str) -> None:
    header = {"w": {"dtype": dtype, "shape": [2], "data_offsets": [0, 8]}}
    error = refused(build_safetensors(header, bytes(8)))
    assert error.field == "adapter_model.safetensors:w"
    assert f"dtype {dtype} is not a float type supported for LoRA weights" in error.message


def test_int32_file_written_by_the_library_is_refused() -> None:
    data = save_safetensors_bytes({"ids": torch.arange(4, dtype=torch.int32)})  # (4,) int32
    assert "dtype I32 is not a float type" in refused(data).message


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"a": {"data_offsets": [0, 20]}}, "needs 24"),  # span disagrees with the shape
        ({"a": {"shape": [2, 4]}}, "needs 32"),
        ({"a": {"shape": [2, -3]}}, "non-negative integers"),
        ({"a": {"shape": [2, 3.0]}}, "non-negative integers"),
        ({"a": {"shape": "2x3"}}, "non-negative integers"),
        ({"a": {"data_offsets": [24, 0]}}, "0 <= start <= end"),
        ({"a": {"data_offsets": [0, 24, 48]}}, "0 <= start <= end"),
        ({"a": {"data_offsets": [-24, 0]}}, "0 <= start <= end"),
        ({"a": {"extra": 1}}, "exactly the keys"),
        ({"b": {"data_offsets": [28, 36]}}, "leaves a gap"),  # and the buffer is not covered
        ({"b": {"data_offsets": [16, 24]}}, "overlaps the previous tensor"),
    ],
)
def test_entries_lying_about_offsets_or_shapes_are_refused(
    build_safetensors: Build, changes: dict, message: str
) -> None:
    assert message in refused(two_tensors(build_safetensors, **changes)).message


def test_reordered_but_tiling_offsets_pass(build_safetensors: Build) -> None:
    data = two_tensors(build_safetensors, a={"data_offsets": [8, 32]}, b={"data_offsets": [0, 8]})
    # Header order does not matter; the buffer is still tiled exactly.
    assert check_safetensors(data)["a"].start == 8


def test_first_tensor_must_start_at_zero(build_safetensors: Build) -> None:
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}
    assert "leaves a gap" in refused(build_safetensors(header, bytes(8))).message


def test_tensor_count_is_bounded(build_safetensors: Build) -> None:
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(5)}
    assert len(check_safetensors(build_safetensors(header, b""))) == 5
    with pytest.raises(AdapterTooLargeError, match="at most 4"):
        check_safetensors(build_safetensors(header, b""), max_tensors=4)


def test_long_tensor_names_are_clipped_in_errors(build_safetensors: Build) -> None:
    name = "x" * 10_000
    header = {name: {"dtype": "I32", "shape": [1], "data_offsets": [0, 4]}}
    error = refused(build_safetensors(header, bytes(4)))
    assert error.field.endswith("...")
    assert len(str(error)) < 500
