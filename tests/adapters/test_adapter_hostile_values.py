"""Hostile values the fuzz test found: each must be a validation error, never a crash."""

from __future__ import annotations

import json
import struct

import pytest

from loraserve.adapters.config import parse_adapter_config, resolve_target_modules
from loraserve.adapters.errors import AdapterValidationError
from loraserve.adapters.safetensors_check import check_safetensors
from loraserve.adapters.spec import BaseModelSpec, TargetModule

SPEC = BaseModelSpec(
    model_type="llama",
    modules={
        "model.layers.0.self_attn.q_proj": TargetModule("model.layers.0.self_attn.q_proj", 8, 8)
    },
)


def _config(**fields: object) -> bytes:
    return json.dumps(
        {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], **fields}
    ).encode()


def _safetensors(dtype_json: str) -> bytes:
    """A one-tensor file whose dtype is the given raw JSON text (json.dumps cannot write all)."""
    raw = ('{"x": {"dtype": ' + dtype_json + ', "shape": [1], "data_offsets": [0, 4]}}').encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0\0\0\0"


@pytest.mark.parametrize(
    "data",
    [b"1" + b"0" * 5000, _config(lora_alpha=10**400)],
    ids=["5000-digit number", "alpha overflows float"],
)
def test_config_numbers_that_break_python_parsing(data: bytes) -> None:
    with pytest.raises(AdapterValidationError):
        parse_adapter_config(data, max_rank=64)


def test_regex_with_an_overflowing_repeat_is_a_validation_error() -> None:
    config = parse_adapter_config(_config(target_modules="a{99999999999}"), max_rank=64)
    with pytest.raises(AdapterValidationError) as err:
        resolve_target_modules(config, SPEC)
    assert "regular expression" in err.value.message


@pytest.mark.parametrize(
    "dtype_json", ['["F32"]', '{"a": 1}', "1" + "0" * 5000], ids=["list", "object", "huge number"]
)
def test_safetensors_dtype_of_the_wrong_type(dtype_json: str) -> None:
    with pytest.raises(AdapterValidationError):
        check_safetensors(_safetensors(dtype_json))


def test_catastrophically_backtracking_regex_is_refused_not_run_forever() -> None:
    spec = BaseModelSpec(
        model_type="llama",
        modules={
            name: TargetModule(name, 8, 8)
            for name in (f"model.layers.{i}.self_attn.q_proj" for i in range(4))
        },
    )
    # Exponential in the name length with a backtracking engine: would run for hours.
    config = parse_adapter_config(_config(target_modules="(.|.)*j."), max_rank=64)
    with pytest.raises(AdapterValidationError) as err:
        resolve_target_modules(config, spec)
    assert "too long" in err.value.message


def test_ordinary_regexes_still_match() -> None:
    config = parse_adapter_config(_config(target_modules=r".*\.q_proj"), max_rank=64)
    assert resolve_target_modules(config, SPEC) == ["model.layers.0.self_attn.q_proj"]
