"""Command-line settings: --quick defaults, explicit flags win, --only validation."""

from __future__ import annotations

import pytest

from loraserve.bench.settings import PARTS, QUICK, settings_from_args


def test_defaults_are_the_full_run() -> None:
    s = settings_from_args([])
    assert s.only == PARTS
    assert s.batch == 16 and s.rank == 16
    assert s.engine_device_adapters == 16
    assert s.distinct_sweep == (1, 2, 4, 8, 16)


def test_quick_overrides_but_explicit_flags_win() -> None:
    s = settings_from_args(["--quick", "--output-len", "7"])
    assert s.quick
    assert s.prompt_len == QUICK["prompt_len"]
    assert s.output_len == 7
    assert s.nsweep == QUICK["nsweep"]


def test_only_and_sweeps_parse() -> None:
    s = settings_from_args(
        [
            "--only",
            "cold,grpc",
            "--nsweep",
            "5,50",
            "--batch",
            "32",
            "--adapters",
            "64",
            "--trace-prompt-len",
            "16,256",
        ]
    )
    assert s.only == ("cold", "grpc")
    assert s.nsweep == (5, 50)
    assert s.engine_device_adapters == 64
    assert s.distinct_sweep == (1, 2, 4, 8, 16, 32)
    assert s.trace_prompt_len == (16, 256)
    assert settings_from_args(["--batch", "12"]).distinct_sweep == (1, 2, 4, 8, 12)


def test_unknown_part_is_a_usage_error() -> None:
    with pytest.raises(SystemExit):
        settings_from_args(["--only", "distinct,warp"])


def test_a_pool_smaller_than_the_batch_is_a_usage_error_only_for_the_distinct_mode(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        settings_from_args(["--batch", "32", "--adapters", "16"])
    assert "--adapters 16 is fewer than --batch 32" in capsys.readouterr().err
    assert settings_from_args(["--batch", "32", "--adapters", "16", "--only", "grpc"]).batch == 32


def test_requests_are_greedy_unless_a_temperature_is_given() -> None:
    assert (settings_from_args([]).temperature, settings_from_args([]).top_p) == (0.0, 1.0)
    s = settings_from_args(["--temperature", "0.8", "--top-p", "0.95"])
    assert (s.temperature, s.top_p) == (0.8, 0.95)


def test_engine_opts_set_config_fields() -> None:
    from pathlib import Path

    from loraserve.bench.engine_runner import apply_config_overrides
    from loraserve.server.config import ServerConfig

    s = settings_from_args(["--engine-opt", "max-batch-size=8", "--engine-opt", "grace_seconds=2"])
    assert s.engine_opts == (("max_batch_size", "8"), ("grace_seconds", "2"))
    config = apply_config_overrides(ServerConfig(), s.engine_opts)
    assert config.max_batch_size == 8 and config.grace_seconds == 2.0
    assert apply_config_overrides(ServerConfig(), (("data_dir", "/x"),)).data_dir == Path("/x")
    with pytest.raises(ValueError, match="no field"):
        apply_config_overrides(ServerConfig(), (("warp_speed", "9"),))
