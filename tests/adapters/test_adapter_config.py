"""adapter_config.json parsing: real PEFT configs pass; unsupported options are refused by key."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest

from loraserve.adapters.config import LoraAdapterConfig, parse_adapter_config
from loraserve.adapters.errors import AdapterTooLargeError, AdapterValidationError

MAX_RANK = 64


def minimal(**changes: object) -> bytes:
    """The smallest config we accept, with some keys changed (None deletes a key)."""
    config: dict[str, object] = {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"]}
    config.update(changes)
    return json.dumps({k: v for k, v in config.items() if v is not None}).encode()


def refused(data: bytes, *, max_rank: int = MAX_RANK) -> AdapterValidationError:
    with pytest.raises(AdapterValidationError) as info:
        parse_adapter_config(data, max_rank=max_rank)
    return info.value


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_real_peft_configs_pass(make_adapter: Callable, arch: str) -> None:
    saved = make_adapter(arch)
    config = parse_adapter_config(saved.config_bytes, max_rank=MAX_RANK)
    assert config.rank == 4
    assert config.alpha == 8.0
    assert config.use_rslora is False
    assert sorted(config.target_modules) == sorted(saved.config["target_modules"])
    assert config.scale == 2.0
    assert config.raw == saved.config  # every key PEFT wrote is kept in raw, none refused


def test_peft_defaults_for_every_checked_key_pass(make_adapter: Callable) -> None:
    raw = make_adapter("llama").config
    # The keys we police are all present in what PEFT 0.21 writes, at their defaults.
    for key in ("use_dora", "rank_pattern", "alpha_pattern", "layer_replication", "lora_bias"):
        assert key in raw
    parse_adapter_config(json.dumps(raw).encode(), max_rank=MAX_RANK)


def test_real_peft_regex_and_all_linear_and_rslora_configs_pass(make_adapter: Callable) -> None:
    rs = make_adapter("llama", use_rslora=True, r=16, lora_alpha=32)
    config = parse_adapter_config(rs.config_bytes, max_rank=MAX_RANK)
    assert config.use_rslora is True
    assert math.isclose(config.scale, 32 / 4)
    regex = make_adapter("llama", target_modules=r".*\.self_attn\.(q|v)_proj")
    assert parse_adapter_config(regex.config_bytes, max_rank=MAX_RANK).target_modules == (
        r".*\.self_attn\.(q|v)_proj"
    )
    # PEFT expands "all-linear" into the full names of the layers it found when it saves.
    linear = make_adapter("qwen2", target_modules="all-linear")
    targets = parse_adapter_config(linear.config_bytes, max_rank=MAX_RANK).target_modules
    assert sorted(targets) == sorted(linear.spec.modules)


def test_defaults_when_optional_keys_are_absent() -> None:
    config = parse_adapter_config(minimal(), max_rank=MAX_RANK)
    assert config == LoraAdapterConfig(
        rank=8, alpha=8.0, use_rslora=False, target_modules=["q_proj"], raw=config.raw
    )
    assert config.scale == 1.0


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("use_dora", True),
        ("modules_to_save", ["lm_head"]),
        ("layer_replication", [[0, 1], [0, 2]]),
        ("rank_pattern", {"q_proj": 4}),
        ("alpha_pattern", {"q_proj": 4}),
        ("layers_to_transform", [0]),
        ("layers_to_transform", 0),  # layer 0 only: falsy, but set
        ("trainable_token_indices", [1, 2]),
        ("target_parameters", ["mlp.experts.down_proj"]),
        ("lora_bias", True),
        ("use_qalora", True),
        ("alora_invocation_tokens", [1, 2]),
        ("exclude_modules", ["o_proj"]),
        ("use_bdlora", {"target_modules_bd_a": ["q_proj"]}),
        ("arrow_config", {"top_k": 2}),
        ("kasa_config", {"beta": 1e-4}),
        ("monteclora_config", {"n": 2}),
    ],
)
def test_unsupported_options_are_refused_naming_the_key(key: str, value: object) -> None:
    error = refused(minimal(**{key: value}))
    assert error.field == f"adapter_config.json:{key}"
    assert "is not supported by loraserve" in error.message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("use_dora", False),
        ("modules_to_save", None),
        ("rank_pattern", {}),
        ("alpha_pattern", {}),
        ("layers_to_transform", None),
        ("layers_pattern", "layers"),  # meaningless without layers_to_transform
        ("exclude_modules", []),
        ("bias", "none"),
        ("task_type", None),
        ("init_lora_weights", "gaussian"),
        ("init_lora_weights", True),
        ("velora_config", {"rank": 2}),  # changes only the backward pass
        ("lora_dropout", 0.1),
        ("some_future_key", {"x": 1}),
    ],
)
def test_defaults_and_harmless_options_pass(key: str, value: object) -> None:
    parse_adapter_config(minimal(**{key: value}), max_rank=MAX_RANK)


@pytest.mark.parametrize(
    ("changes", "key", "message"),
    [
        ({"peft_type": None}, "peft_type", 'must be "LORA"'),
        ({"peft_type": "IA3"}, "peft_type", 'must be "LORA"'),
        ({"r": None}, "r", "is missing"),
        ({"r": 0}, "r", "between 1 and 64"),
        ({"r": 65}, "r", "between 1 and 64"),
        ({"r": 8.0}, "r", "must be an integer"),
        ({"r": True}, "r", "must be an integer"),
        ({"r": "8"}, "r", "must be an integer"),
        ({"lora_alpha": 0}, "lora_alpha", "> 0"),
        ({"lora_alpha": -1.5}, "lora_alpha", "> 0"),
        ({"lora_alpha": "16"}, "lora_alpha", "must be a number"),
        ({"use_rslora": "yes"}, "use_rslora", "true or false"),
        ({"bias": "all"}, "bias", "not supported"),
        ({"bias": "lora_only"}, "bias", "not supported"),
        ({"task_type": "SEQ_CLS"}, "task_type", "CAUSAL_LM"),
        ({"target_modules": None}, "target_modules", "is missing"),
        ({"target_modules": []}, "target_modules", "non-empty list"),
        ({"target_modules": ""}, "target_modules", "empty string"),
        ({"target_modules": ["q_proj", 3]}, "target_modules", "non-empty strings"),
        ({"target_modules": {"q_proj": 1}}, "target_modules", "non-empty list"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights", "changes the base weights"),
        ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights", "changes the base"),
        ({"init_lora_weights": "olora"}, "init_lora_weights", "changes the base weights"),
        ({"init_lora_weights": "loftq"}, "init_lora_weights", "changes the base weights"),
        ({"init_lora_weights": "corda"}, "init_lora_weights", "changes the base weights"),
    ],
)
def test_bad_values_are_refused_naming_the_key(
    changes: dict[str, object], key: str, message: str
) -> None:
    error = refused(minimal(**changes))
    assert error.field == f"adapter_config.json:{key}"
    assert message in error.message


def test_infinite_alpha_is_refused() -> None:
    # 1e309 parses to inf without passing through json's NaN/Infinity constant hook.
    data = b'{"peft_type": "LORA", "r": 8, "target_modules": ["q"], "lora_alpha": 1e309}'
    error = refused(data)
    assert error.field == "adapter_config.json:lora_alpha"
    assert "finite" in error.message


def test_rank_bound_is_the_servers() -> None:
    assert parse_adapter_config(minimal(r=16), max_rank=16).rank == 16
    assert "between 1 and 8" in refused(minimal(r=16), max_rank=8).message


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"LORA"', "must be a JSON object"),
        (b'{"peft_type": "LORA", "r": 8, "lora_alpha": NaN}', "NaN is not valid JSON"),
        (b"[" * 100_000, "nested too deeply"),
    ],
)
def test_bad_json_is_refused(data: bytes, message: str) -> None:
    error = refused(data) if len(data) <= 65536 else None
    if error is None:
        with pytest.raises(AdapterValidationError) as info:
            parse_adapter_config(data, max_rank=MAX_RANK, max_bytes=len(data))
        error = info.value
    assert error.field == "adapter_config.json:json"
    assert message in error.message


def test_duplicate_keys_are_refused() -> None:
    error = refused(b'{"peft_type": "LORA", "r": 8, "r": 4000, "target_modules": "x"}')
    assert error.field == "adapter_config.json:r"
    assert "more than once" in error.message


def test_huge_config_is_refused_before_parsing() -> None:
    data = minimal(description="x" * 70_000)
    with pytest.raises(AdapterTooLargeError) as info:
        parse_adapter_config(data, max_rank=MAX_RANK)
    assert info.value.field == "adapter_config.json:size"
    assert "65536" in info.value.message
    parse_adapter_config(data, max_rank=MAX_RANK, max_bytes=len(data))


def test_error_messages_do_not_echo_huge_input() -> None:
    pattern = {f"layers.{i}.q_proj": 4 for i in range(2000)}
    error = refused(minimal(rank_pattern=pattern), max_rank=MAX_RANK)
    assert error.field == "adapter_config.json:rank_pattern"
    assert len(str(error)) < 300
