"""Loading an uploaded PEFT LoRA adapter into checked float32 CPU tensors, keyed by base module.

Order of trust: the config is parsed and checked, the safetensors structure is checked by our own
code, tensor names and shapes are checked against the base model from the header alone, and only
then are tensors materialized: straight from the verified byte ranges (or, for a file mixing
dtypes, by the safetensors library; from bytes, never via pickle). Values are checked last
(finite), so a bad upload costs little and always gets a message naming the tensor.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors_bytes

from loraserve.adapters.config import (
    LoraAdapterConfig,
    parse_adapter_config,
    resolve_target_modules,
)
from loraserve.adapters.errors import AdapterValidationError, clip, echo
from loraserve.adapters.safetensors_check import WEIGHTS_FILE, TensorHeader, check_safetensors
from loraserve.adapters.spec import BaseModelSpec, TargetModule

PEFT_KEY_PREFIX = "base_model.model."
"""PEFT's save_pretrained prefixes every key with this (the PeftModel -> base model path)."""


@dataclass
class AdapterWeights:
    """A validated adapter: its config and, per targeted module, the two LoRA factors."""

    config: LoraAdapterConfig
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """Full module name -> (A (r, d_in), B (d_out, r)); CPU, contiguous, finite; float32 (views
    of one buffer holding the whole adapter, when loaded by load_adapter_weights), or, loaded
    `as_stored`, in the file's own dtype: then read-only views of the file's bytes."""
    flat: torch.Tensor | None = None
    """The one buffer (elements,) every factor is a view of and that holds nothing else, when
    loaded by load_adapter_weights: a cold load can copy it to the device as it is (one copy)
    and lay the pages out there (server.engine.device_layout)."""
    structure: object = None
    """What the factors' names, shapes and places in `flat` follow from (the AdapterStructure
    they were read with; a StructureCache hands the same one to every adapter of one
    structure): adapters with the same `structure` lay out alike."""

    @property
    def nbytes(self) -> int:
        """Bytes held by all A and B tensors."""
        if self.flat is not None:  # holds the factors and nothing else: one call, not 2 per module
            return self.flat.nbytes
        return sum(a.nbytes + b.nbytes for a, b in self.modules.values())

    @property
    def numel(self) -> int:
        """Elements of all A and B tensors (what the adapter takes in any dtype)."""
        if self.flat is not None:
            return self.flat.numel()
        return sum(a.numel() + b.numel() for a, b in self.modules.values())


def lora_keys(module_name: str) -> tuple[str, str]:
    """The safetensors keys PEFT writes for one module's lora_A and lora_B weights."""
    base = f"{PEFT_KEY_PREFIX}{module_name}"
    return f"{base}.lora_A.weight", f"{base}.lora_B.weight"


def _error(key: str, message: str) -> AdapterValidationError:
    return AdapterValidationError(f"{WEIGHTS_FILE}:{clip(key)}", message)


def _unexpected_reason(key: str, targets: set[str]) -> str:
    """Why a tensor we did not ask for is there, as precisely as the name tells."""
    if "lora_embedding_" in key:
        return "embedding LoRA weights are not supported by loraserve"
    if "lora_magnitude_vector" in key:
        return "DoRA magnitude vectors are not supported by loraserve"
    if key.endswith(".bias"):
        return "LoRA biases are not supported by loraserve"
    if not key.startswith(PEFT_KEY_PREFIX):
        return f"unexpected tensor: PEFT adapter keys start with {PEFT_KEY_PREFIX!r}"
    for suffix in (".lora_A.weight", ".lora_B.weight"):
        if key.endswith(suffix):
            module = key[len(PEFT_KEY_PREFIX) : -len(suffix)]
            if module not in targets:
                return f"unexpected tensor: module {echo(module)} is not selected by target_modules"
    return "unexpected tensor: not a lora_A/lora_B weight of a targeted module"


def _check_names_and_shapes(
    headers: Mapping[str, TensorHeader], targets: Sequence[TargetModule], rank: int
) -> None:
    """Every target has exactly its A (r, d_in) and B (d_out, r); nothing else is present."""
    expected: dict[str, tuple[int, int]] = {}
    for module in targets:
        key_a, key_b = lora_keys(module.name)
        expected[key_a] = (rank, module.in_features)
        expected[key_b] = (module.out_features, rank)
    target_names = {module.name for module in targets}
    for key in sorted(headers):
        if key not in expected:
            raise _error(key, _unexpected_reason(key, target_names))
    for key, shape in expected.items():
        if key not in headers:
            raise _error(
                key, "missing: target_modules selects this layer but the file has no such tensor"
            )
        actual = headers[key].shape
        if actual != shape:
            raise _error(
                key,
                f"has shape {list(actual)}, expected {list(shape)} "
                f"(r={rank} from adapter_config.json and this base model's layer size)",
            )


_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class InPlacePlan:
    """Where each tensor lies in the data buffer, in elements of the file's one dtype: so a load
    makes each factor with one `as_strided` call (a cold load makes 128 for a 1B model's
    rank-16 q/k/v/o adapter), no header arithmetic."""

    dtype: torch.dtype
    data_start: int
    """Byte offset of the data buffer in the file."""
    views: tuple[tuple[str, tuple[int, ...], tuple[int, ...], int], ...]
    """(key, shape, contiguous strides, element offset) of every tensor."""


@dataclass(frozen=True)
class AdapterStructure:
    """What the structure checks found in an adapter's two files: everything about it but the
    tensor values. A function of the config's bytes, the weights file's header bytes and
    length, the base model and the rank bound alone (adapters/structure_cache.py keys on them)."""

    config: LoraAdapterConfig
    targets: tuple[TargetModule, ...]
    """The base layers the adapter changes, in the model's module order."""
    module_keys: tuple[tuple[str, str, str], ...]
    """(module name, its lora_A key, its lora_B key) of every target, in `targets` order."""
    in_place: InPlacePlan | None
    """How to read the factors straight from the file's bytes; None where the tensors mix
    dtypes or an offset is not element-aligned (the safetensors library copies them out)."""


def check_structure(
    config_bytes: bytes, weights_bytes: bytes | memoryview, spec: BaseModelSpec, *, max_rank: int
) -> AdapterStructure:
    """The config parsed and checked, the safetensors structure checked, and every tensor's
    name and shape checked against the base model, from the header alone (no tensor data is
    read). Raise AdapterValidationError naming the file and key of the first problem."""
    config = parse_adapter_config(config_bytes, max_rank=max_rank)
    target_names = resolve_target_modules(config, spec)
    targets = tuple(spec.modules[name] for name in target_names)
    headers = check_safetensors(weights_bytes)
    _check_names_and_shapes(headers, targets, config.rank)
    view = memoryview(weights_bytes).cast("B")
    data_start = 8 + int.from_bytes(view[:8], "little")
    return AdapterStructure(
        config,
        targets,
        tuple((module.name, *lora_keys(module.name)) for module in targets),
        _in_place_plan(headers, data_start, len(view)),
    )


def _in_place_plan(
    headers: Mapping[str, TensorHeader], data_start: int, file_len: int
) -> InPlacePlan | None:
    """The plan for reading every tensor in place; None unless every tensor has one dtype and
    element-aligned offsets (and the buffer is not empty: frombuffer refuses one)."""
    dtypes = {h.dtype for h in headers.values()}
    if len(dtypes) != 1:
        return None
    dtype = _TORCH_DTYPES[dtypes.pop()]
    itemsize = dtype.itemsize
    if (
        data_start % itemsize
        or file_len == data_start
        or any(h.start % itemsize for h in headers.values())
    ):
        return None
    views = []
    for key, h in headers.items():
        strides = tuple(math.prod(h.shape[i + 1 :]) for i in range(len(h.shape)))
        views.append((key, h.shape, strides, h.start // itemsize))
    return InPlacePlan(dtype, data_start, tuple(views))


def load_adapter_weights(
    config_bytes: bytes,
    weights_bytes: bytes,
    spec: BaseModelSpec,
    *,
    max_rank: int,
    as_stored: bool = False,
    structure: AdapterStructure | None = None,
) -> AdapterWeights:
    """Parse, check and load one adapter for the base model described by `spec`.

    as_stored: a file of one dtype keeps it, the factors read-only views of `weights_bytes`
    (which must then be `bytes`, immutable; anything else is copied): no conversion pass and
    half the memory for a half-precision file, where the server only lays the factors out
    again as pages (a cold load). Mixed dtypes still load as float32.
    structure: check_structure's result for these very files (a StructureCache hit), so only
    the tensor values remain to check.

    Raise AdapterValidationError naming the file and key of the first problem found.
    """
    if structure is None:
        structure = check_structure(config_bytes, weights_bytes, spec, max_rank=max_rank)
    # Every factor in one float32 buffer: one conversion and one finiteness pass for the whole
    # adapter, where a pass per tensor cost ten times as much (a 1B model's rank-16 q/k/v/o
    # adapter has 128 tensors); the factors are views of it.
    if structure.in_place is not None:
        flat, factors = _tensors_in_place(weights_bytes, structure.in_place, as_stored=as_stored)
    else:  # mixed dtypes or unaligned offsets: let the library copy each tensor out
        keys = [key for _, key_a, key_b in structure.module_keys for key in (key_a, key_b)]
        tensors = load_safetensors_bytes(bytes(weights_bytes))
        flat = torch.cat([tensors[key].reshape(-1) for key in keys]).to(torch.float32)
        parts = flat.split([tensors[key].numel() for key in keys])
        factors = {
            key: part.view(tensors[key].shape) for key, part in zip(keys, parts, strict=True)
        }
    if not _all_finite(flat):
        for _, key_a, key_b in structure.module_keys:  # only to name the first bad tensor
            for key in (key_a, key_b):
                if not _all_finite(factors[key]):
                    raise _error(key, "contains NaN or Inf")
    modules = {
        name: (factors[key_a], factors[key_b])  # (r, d_in), (d_out, r)
        for name, key_a, key_b in structure.module_keys
    }
    return AdapterWeights(config=structure.config, modules=modules, flat=flat, structure=structure)


def _tensors_in_place(
    data: bytes | memoryview, plan: InPlacePlan, *, as_stored: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(The whole data buffer as float32 (elements,), each tensor as a view of it), read
    straight from the file's bytes in one conversion; as_stored, in the file's dtype and, for
    immutable `bytes`, without any copy.

    check_safetensors verified that the entries tile the data buffer exactly and the names and
    shapes were checked against the base model, so the buffer holds our factors and nothing
    else: one pass converts it all, where the library's load plus a concatenation copied every
    byte twice more (on a cold load, while other requests wait).
    """
    view = memoryview(data).cast("B")
    with warnings.catch_warnings():
        # The bytes are read-only; the conversion below copies, so nothing ever writes them.
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(view, dtype=plan.dtype, offset=plan.data_start)  # (elements,)
    if as_stored:
        # bytes cannot change under the views; any other buffer might, so it is copied.
        flat = raw if isinstance(data, bytes) else raw.clone()  # (elements,)
    else:
        # A float32 file converts to itself: clone, so the factors own their memory.
        flat = raw.clone() if plan.dtype == torch.float32 else raw.to(torch.float32)
    base = flat.storage_offset()
    factors = {
        key: flat.as_strided(shape, strides, base + offset)
        for key, shape, strides, offset in plan.views
    }
    return flat, factors


def _all_finite(values: torch.Tensor) -> bool:
    """No NaN and no infinity in `values`: its minimum and maximum are finite (both propagate
    NaN), one reduction pass where `isfinite(...).all()` takes a pass and a bool tensor."""
    if values.numel() == 0:
        return True
    low, high = torch.aminmax(values.reshape(-1))
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))
