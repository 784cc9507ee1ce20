"""Strict, library-independent check of a safetensors file's structure before anything parses it.

Layout: an 8-byte little-endian u64 N, then N bytes of a UTF-8 JSON object (the header), then the
data buffer. The header maps tensor names to {dtype, shape, data_offsets=[start, end]}, offsets
relative to the data buffer; the optional "__metadata__" entry is a str -> str map.

We re-check here what the safetensors library also checks, and more (exact tiling of the buffer,
no trailing bytes, float dtypes only, bounded header and tensor count), so the upload path rejects
a crafted file with a precise message and the library only ever sees well-formed input.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

from loraserve.adapters.errors import AdapterTooLargeError, AdapterValidationError, clip, echo

WEIGHTS_FILE = "adapter_model.safetensors"
"""File name of the weights inside a PEFT adapter directory; also the error field."""

DEFAULT_MAX_HEADER_BYTES = 1_048_576
"""A LoRA header is ~150 bytes per tensor; 1 MiB leaves room for thousands of tensors."""

DEFAULT_MAX_TENSORS = 100_000
"""Upper bound on tensor entries, so a header cannot make us build a huge table."""

ITEMSIZE: dict[str, int] = {"F32": 4, "F16": 2, "BF16": 2}
"""Accepted dtypes and their size in bytes: the float types LoRA weights are trained in."""

_METADATA_KEY = "__metadata__"
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80


@dataclass(frozen=True)
class TensorHeader:
    """One tensor's entry in the header, checked."""

    dtype: str
    """"F32", "F16" or "BF16"."""
    shape: tuple[int, ...]
    """Dimensions, each >= 0."""
    start: int
    """Byte offset of the first element, relative to the start of the data buffer."""
    end: int
    """Byte offset one past the last element; end - start == prod(shape) * itemsize."""


def _error(message: str, tensor: str | None = None) -> AdapterValidationError:
    field = WEIGHTS_FILE if tensor is None else f"{WEIGHTS_FILE}:{clip(tensor)}"
    return AdapterValidationError(field, message)


def _looks_like_pickle(data: memoryview) -> bool:
    """A PyTorch zip checkpoint, or a raw pickle stream (protocol 2+ starts with 0x80 <proto>).

    A genuine safetensors file may also start with 0x80 (header length 128, 384, ...), but its
    ninth byte is then always "{", which separates the two.
    """
    if bytes(data[:4]) == _ZIP_MAGIC:
        return True
    if len(data) >= 2 and data[0] == _PICKLE_PROTO and 2 <= data[1] <= 5:
        return len(data) < 9 or data[8] != ord("{")
    return False


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _error(f"header names {echo(key)} more than once")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise _error(f"header contains {name}, which is not valid JSON")


def _is_nonneg_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_header(data: memoryview, max_header_bytes: int) -> tuple[dict[str, Any], int]:
    """Return the decoded header object and the byte offset where the data buffer begins."""
    if _looks_like_pickle(data):
        raise _error(
            "looks like a pickle/PyTorch .bin file; only safetensors is accepted "
            "(save with PEFT's save_pretrained(..., safe_serialization=True))"
        )
    if len(data) < 8:
        raise _error(f"is {len(data)} bytes, shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > max_header_bytes:
        raise AdapterTooLargeError(
            WEIGHTS_FILE,
            f"header is {header_len} bytes; at most {max_header_bytes} bytes are accepted",
        )
    if header_len > len(data) - 8:
        raise _error(
            f"header length {header_len} exceeds the {len(data) - 8} bytes after it "
            "(truncated or not a safetensors file)"
        )
    raw = bytes(data[8 : 8 + header_len])
    # The reference implementation requires the JSON to start with "{"; so do we.
    if not raw.startswith(b"{"):
        raise _error("header does not start with '{' (not a safetensors file)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _error(f"header is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        header = json.loads(
            text, object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant
        )
    except json.JSONDecodeError as exc:
        raise _error(f"header is not valid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise _error("header is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise _error(f"header is not valid JSON: {clip(str(exc))}") from None
    if not isinstance(header, dict):
        raise _error("header must be a JSON object")
    return header, 8 + header_len


def _check_metadata(metadata: object) -> None:
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _error("__metadata__ must map strings to strings")


def _check_entry(name: str, entry: object) -> TensorHeader:
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        raise _error("entry must have exactly the keys dtype, shape, data_offsets", name)
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise _error(
            f"dtype {clip(str(dtype))} is not a float type supported for LoRA weights "
            f"(use one of {', '.join(ITEMSIZE)})",
            name,
        )
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_nonneg_int(d) for d in shape):
        raise _error(f"shape must be a list of non-negative integers, got {echo(shape)}", name)
    offsets = entry["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_nonneg_int(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise _error(
            f"data_offsets must be [start, end] with 0 <= start <= end, got {echo(offsets)}", name
        )
    start, end = offsets
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if end - start != expected:
        raise _error(
            f"data_offsets span {end - start} bytes but shape {echo(shape)} of {dtype} "
            f"needs {expected}",
            name,
        )
    return TensorHeader(dtype=dtype, shape=tuple(shape), start=start, end=end)


def _check_tiling(tensors: dict[str, TensorHeader], buffer_len: int) -> None:
    """Tensors must cover the data buffer exactly: no gap, no overlap, nothing after the last."""
    position = 0
    for name, tensor in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if tensor.start != position:
            what = "overlaps the previous tensor" if tensor.start < position else "leaves a gap"
            raise _error(f"data starts at byte {tensor.start}, expected {position}: {what}", name)
        position = tensor.end
    if position > buffer_len:
        raise _error(
            f"data buffer is {buffer_len} bytes but the header describes {position} "
            "(file truncated)"
        )
    if position < buffer_len:
        raise _error(
            f"{buffer_len - position} trailing bytes after the last tensor's data "
            "(the header does not describe them)"
        )


def check_safetensors(
    data: bytes | memoryview,
    *,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    max_tensors: int = DEFAULT_MAX_TENSORS,
) -> dict[str, TensorHeader]:
    """Check the whole file structure and return every tensor's header entry by name.

    Raise AdapterValidationError (field "adapter_model.safetensors", or
    "adapter_model.safetensors:<tensor>" when one entry is at fault) on the first problem;
    AdapterTooLargeError when a size bound is exceeded. Reads no tensor data.
    """
    view = memoryview(data).cast("B")  # index by byte whatever the caller's view format
    header, data_start = _parse_header(view, max_header_bytes)
    tensors = _check_entries(header, max_tensors)
    _check_tiling(tensors, len(view) - data_start)
    return tensors


def _check_entries(header: dict[str, Any], max_tensors: int) -> dict[str, TensorHeader]:
    """The header's metadata and tensor entries checked, at most `max_tensors` of them."""
    entries = {name: entry for name, entry in header.items() if name != _METADATA_KEY}
    if _METADATA_KEY in header:
        _check_metadata(header[_METADATA_KEY])
    if len(entries) > max_tensors:
        raise AdapterTooLargeError(
            WEIGHTS_FILE, f"has {len(entries)} tensors; at most {max_tensors} are accepted"
        )
    return {name: _check_entry(name, entry) for name, entry in entries.items()}


def header_bytes_needed(head: bytes | memoryview, file_size: int | None = None) -> int | None:
    """How many leading bytes of the file hold its whole header (8 + N), once the first 9 are
    known; None before that. Refuses at once a pickle, or a header length over the bound or
    (given the size the file will have) longer than the file."""
    view = memoryview(head).cast("B")
    if len(view) >= 4 and bytes(view[:4]) == _ZIP_MAGIC:
        _parse_header(view, DEFAULT_MAX_HEADER_BYTES)  # raises the pickle message
    if len(view) < 9:
        return None
    if _looks_like_pickle(view):
        _parse_header(view, DEFAULT_MAX_HEADER_BYTES)  # raises the pickle message
    (header_len,) = struct.unpack("<Q", view[:8])
    if header_len > DEFAULT_MAX_HEADER_BYTES:
        raise AdapterTooLargeError(
            WEIGHTS_FILE,
            f"header is {header_len} bytes; at most {DEFAULT_MAX_HEADER_BYTES} bytes are accepted",
        )
    if file_size is not None and 8 + header_len > file_size:
        raise _error(
            f"header length {header_len} exceeds the {file_size - 8} bytes after it "
            "(truncated or not a safetensors file)"
        )
    return 8 + header_len


def check_safetensors_head(
    head: bytes | memoryview, file_size: int, *, max_tensors: int = DEFAULT_MAX_TENSORS
) -> dict[str, TensorHeader]:
    """The checks of check_safetensors() on the file's first bytes only: `head` holds at least
    the whole header (see header_bytes_needed) and `file_size` is the size the file will have.

    Lets an upload be refused as soon as its header arrives, before the data is streamed.
    """
    view = memoryview(head).cast("B")
    needed = header_bytes_needed(view, file_size)
    if needed is None or len(view) < needed:
        raise ValueError("check_safetensors_head needs the whole header")
    header, data_start = _parse_header(view[:needed], DEFAULT_MAX_HEADER_BYTES)
    tensors = _check_entries(header, max_tensors)
    _check_tiling(tensors, file_size - data_start)
    return tensors
