"""ServerConfig.validate: per-field bounds, cross-field rules and the development-mode bind rule."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from loraserve.server.config import ConfigError, ServerConfig, is_loopback

POSITIVE_FIELDS = [
    "max_lora_rank",
    "adapter_device_bytes",
    "adapter_host_bytes",
    "max_batch_tokens",
    "max_seq_len",
    "max_batch_size",
    "max_waiting_requests",
    "max_new_tokens_limit",
    "default_max_new_tokens",
    "max_prompt_tokens",
    "max_adapter_bytes",
    "max_adapter_config_bytes",
    "max_message_bytes",
    "tenant_max_uploads",
    "max_uploads",
    "adapter_versions_kept",
]


def _with(**changes: object) -> ServerConfig:
    return dataclasses.replace(ServerConfig(), **changes)


def test_defaults_are_valid_and_validate_returns_self() -> None:
    config = ServerConfig()
    assert config.validate() is config
    assert config.dev_mode
    assert not _with(tenants_file=Path("t.toml")).dev_mode


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("port", -1),
        ("port", 65536),
        ("metrics_port", -1),
        ("metrics_port", 70000),
        ("max_lora_rank", 1025),
        ("grace_seconds", -0.5),
        ("stream_interval_seconds", -0.01),
        ("stream_interval_seconds", 11.0),
        ("stream_interval_seconds", float("nan")),
        ("gil_switch_interval_seconds", 0.0),
        ("gil_switch_interval_seconds", 2.0),
        ("gil_switch_interval_seconds", float("nan")),
        ("cold_join_hold_seconds", -0.001),
        ("cold_join_hold_seconds", 1.5),
        ("cold_join_hold_seconds", float("nan")),
        ("prefill_graph_tokens", -1),
        ("prefill_graph_tokens", 65537),
        ("upload_idle_seconds", 0.0),
        ("upload_idle_seconds", float("nan")),
        ("upload_deadline_seconds", -1.0),
        ("upload_deadline_seconds", float("inf")),
        *[(name, 0) for name in POSITIVE_FIELDS],
        *[(name, -3) for name in POSITIVE_FIELDS],
    ],
)
def test_out_of_bounds_field_is_named(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as err:
        _with(**{field: value}).validate()
    assert str(err.value).startswith(f"{field}:"), str(err.value)
    assert str(value) in str(err.value) or "negative" in str(err.value)


@pytest.mark.parametrize(
    "changes",
    [
        {"port": 0},
        {"port": 65535},
        {"metrics_port": 0},
        {"metrics_port": 65535},
        {"max_lora_rank": 1},
        {"max_lora_rank": 1024},
        {"grace_seconds": 0.0},
        {"stream_interval_seconds": 0.0},
        {"stream_interval_seconds": 10.0},
        {"gil_switch_interval_seconds": None},
        {"gil_switch_interval_seconds": 1e-6},
        {"gil_switch_interval_seconds": 1.0},
        {"cold_join_hold_seconds": 0.0},
        {"cold_join_hold_seconds": 1.0},
        {"prefill_graph_tokens": 0},
        {"prefill_graph_tokens": 65536},
        {"default_max_new_tokens": 100, "max_new_tokens_limit": 100},
        {"max_stop_sequences": 0},
        *[{name: 1, "default_max_new_tokens": 1} for name in POSITIVE_FIELDS],
    ],
)
def test_boundary_values_are_accepted(changes: dict[str, object]) -> None:
    config = _with(**changes)
    assert config.validate() is config


def test_default_max_new_tokens_must_not_exceed_the_limit() -> None:
    with pytest.raises(ConfigError) as err:
        _with(default_max_new_tokens=65, max_new_tokens_limit=64).validate()
    message = str(err.value)
    assert message.startswith("default_max_new_tokens:")
    assert "65" in message and "max_new_tokens_limit" in message and "64" in message


def test_nan_grace_seconds_is_refused() -> None:
    # NaN slips through "grace_seconds < 0" (every comparison with NaN is False); argparse's
    # float() accepts "nan", so `--grace-seconds nan` would reach grpc server.stop(nan).
    with pytest.raises(ConfigError, match=r"^grace_seconds:"):
        _with(grace_seconds=math.nan).validate()


def test_negative_max_stop_sequences_is_refused() -> None:
    # A negative limit makes the engine refuse every request, even those with no stop sequence
    # ("0 sequences exceeds the limit of -1"); it must be caught at start like the other bounds.
    with pytest.raises(ConfigError, match=r"^max_stop_sequences:"):
        _with(max_stop_sequences=-1).validate()


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "10.1.2.3", "192.168.0.5", "::", "example.com", "myhost", ""]
)
def test_dev_mode_refuses_non_loopback_hosts(host: str) -> None:
    with pytest.raises(ConfigError) as err:
        _with(host=host).validate()
    message = str(err.value)
    assert message.startswith("host:")
    assert repr(host) in message and "--tenants" in message and "development mode" in message


@pytest.mark.parametrize("host", ["127.0.0.1", "127.5.5.5", "::1", "[::1]", "localhost"])
def test_dev_mode_accepts_loopback_hosts(host: str) -> None:
    assert is_loopback(host)
    config = _with(host=host)
    assert config.validate() is config


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "example.com", "127.0.0.1"])
def test_any_host_is_accepted_with_a_tenants_file(host: str, tmp_path: Path) -> None:
    config = _with(host=host, tenants_file=tmp_path / "tenants.toml")
    assert config.validate() is config
    assert not config.dev_mode


def test_host_rule_is_checked_even_when_other_fields_are_fine() -> None:
    # The bind rule is a cross-field rule (host x tenants_file), not a property of host alone.
    assert not is_loopback("0.0.0.0")
    with pytest.raises(ConfigError):
        _with(host="0.0.0.0", port=0, metrics_port=None).validate()


def _other_value(default: object) -> object:
    """A valid value different from `default` (strings are the attention backend choice)."""
    if isinstance(default, str):
        from loraserve.server.engine.config import ATTENTION_BACKENDS

        return next(choice for choice in ATTENTION_BACKENDS if choice != default)
    return default + 1  # type: ignore[operator]


def test_engine_config_takes_every_engine_field_from_the_server_config() -> None:
    """EngineConfig is a projection: each of its fields has the ServerConfig value of that name."""
    from loraserve.server.engine.config import EngineConfig

    names = [f.name for f in dataclasses.fields(EngineConfig)]
    # Distinct, non-default values, so a field left at EngineConfig's default is caught.
    changes = {name: _other_value(getattr(ServerConfig(), name)) for name in names}
    engine = _with(**changes).engine_config()
    assert {name: getattr(engine, name) for name in names} == changes


def test_attention_backend_is_one_of_the_choices() -> None:
    assert _with(attention="triton").validate().attention == "triton"
    with pytest.raises(ConfigError, match="attention: 'flash' is not one of sdpa, triton"):
        _with(attention="flash").validate()
