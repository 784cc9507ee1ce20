"""`loraserve serve` flags: parsing into ServerConfig, defaults, exit code of a bad config."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import loraserve.server.main
from loraserve.server.config import ConfigError, DeviceChoice, DtypeChoice, ServerConfig
from loraserve.server.main import (
    add_serve_arguments,
    apply_process_settings,
    config_from_args,
    run_serve,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraserve serve")
    add_serve_arguments(parser)
    return parser


def _parse(*argv: str) -> argparse.Namespace:
    return _parser().parse_args(list(argv))


EMBEDDED_DIR = Path("/built/embedded-model")


def _embedded() -> Path:
    """Stands in for the CLI's embedded-model builder (records nothing, builds nothing)."""
    return EMBEDDED_DIR


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[ServerConfig]:
    """Replaces serve() so a run_serve that gets past validation returns at once, recorded."""
    calls: list[ServerConfig] = []

    async def fake_serve(config: ServerConfig) -> None:
        calls.append(config)

    monkeypatch.setattr(loraserve.server.main, "serve", fake_serve)
    return calls


def _choices(dest: str) -> list[str]:
    action = next(a for a in _parser()._actions if a.dest == dest)
    assert action.choices is not None
    return list(action.choices)


def test_defaults_equal_server_config_defaults() -> None:
    """Development mode without --model serves the embedded test model (with a warning)."""
    config = config_from_args(_parse(), _embedded)
    assert config == dataclasses.replace(ServerConfig(), model_path=EMBEDDED_DIR)
    assert config.dev_mode and config.tenants_file is None


def test_model_embedded_is_explicit(tmp_path: Path) -> None:
    tenants = str(tmp_path / "t.toml")
    config = config_from_args(_parse("--model", "embedded", "--tenants", tenants), _embedded)
    assert config.model_path == EMBEDDED_DIR
    # A launcher without the builder (the server layer alone) says so instead of guessing.
    with pytest.raises(ConfigError, match="--model embedded"):
        config_from_args(_parse("--model", "embedded"))


def test_no_model_with_tenants_is_refused(tmp_path: Path) -> None:
    """Outside development mode the random-weight model is never a silent default."""
    with pytest.raises(ConfigError) as err:
        config_from_args(_parse("--tenants", str(tmp_path / "t.toml")), _embedded)
    assert "--model PATH" in str(err.value) and "--model embedded" in str(err.value)
    assert "random" in str(err.value)


def test_a_forwarding_ingress_needs_no_model(tmp_path: Path) -> None:
    """`serve-ray --attach` loads no model; only it may leave --model out with tenants."""
    args = _parse("--tenants", str(tmp_path / "t.toml"))
    assert config_from_args(args, _embedded, needs_model=False).model_path is None


def test_no_metrics_disables_and_port_zero_picks_a_free_one() -> None:
    assert config_from_args(_parse("--no-metrics"), _embedded).metrics_port is None
    assert config_from_args(_parse("--metrics-port", "0"), _embedded).metrics_port == 0


def test_every_flag_maps_to_its_field(tmp_path: Path) -> None:
    argv = {
        "--model": str(tmp_path / "model"),
        "--host": "0.0.0.0",
        "--port": "6000",
        "--data-dir": str(tmp_path / "data"),
        "--tenants": str(tmp_path / "tenants.toml"),
        "--device": "cpu",
        "--dtype": "bfloat16",
        "--metrics-port": "9999",
        "--max-lora-rank": "8",
        "--adapter-device-bytes": "3000000",
        "--adapter-host-bytes": "4000000",
        "--max-batch-tokens": "300",
        "--max-seq-len": "512",
        "--max-batch-size": "5",
        "--max-waiting-requests": "77",
        "--max-new-tokens": "128",
        "--max-prompt-tokens": "900",
        "--max-adapter-bytes": "12345",
        "--grace-seconds": "2.5",
        "--stream-interval-seconds": "0.05",
        "--gil-switch-interval-seconds": "0.0005",
        "--cold-join-hold-seconds": "0.005",
        "--prefill-graph-tokens": "512",
    }
    config = config_from_args(_parse(*[part for item in argv.items() for part in item]))
    expected = dataclasses.replace(
        ServerConfig(),
        model_path=tmp_path / "model",
        host="0.0.0.0",
        port=6000,
        data_dir=tmp_path / "data",
        tenants_file=tmp_path / "tenants.toml",
        device="cpu",
        dtype="bfloat16",
        metrics_port=9999,
        max_lora_rank=8,
        adapter_device_bytes=3000000,
        adapter_host_bytes=4000000,
        max_batch_tokens=300,
        max_seq_len=512,
        max_batch_size=5,
        max_waiting_requests=77,
        max_new_tokens_limit=128,
        max_prompt_tokens=900,
        max_adapter_bytes=12345,
        grace_seconds=2.5,
        stream_interval_seconds=0.05,
        gil_switch_interval_seconds=0.0005,
        cold_join_hold_seconds=0.005,
        prefill_graph_tokens=512,
    )
    assert config == expected
    assert config.engine_config().cold_join_hold_seconds == 0.005
    assert config.engine_config().prefill_graph_tokens == 512
    assert isinstance(config.model_path, Path) and isinstance(config.data_dir, Path)
    assert not config.dev_mode


def test_the_switch_interval_is_applied_to_the_process_only_when_set() -> None:
    before = sys.getswitchinterval()
    try:
        apply_process_settings(ServerConfig())
        assert sys.getswitchinterval() == before  # unset: Python's own stays
        apply_process_settings(ServerConfig(gil_switch_interval_seconds=0.0005))
        assert sys.getswitchinterval() == pytest.approx(0.0005)
    finally:
        sys.setswitchinterval(before)


def test_switches_turn_their_field_on() -> None:
    config = config_from_args(_parse("--enforce-eager", "--lora-overlap"), _embedded)
    assert config.enforce_eager and config.lora_overlap
    assert config.engine_config().lora_overlap is True
    config = config_from_args(_parse(), _embedded)
    assert not config.enforce_eager and not config.lora_overlap
    assert config.gc_freeze  # on by default; --no-gc-freeze turns it off
    assert not config_from_args(_parse("--no-gc-freeze"), _embedded).gc_freeze
    # async_decode is on by default; --no-async-decode turns it off, --async-decode keeps it.
    assert config.async_decode and config.engine_config().async_decode is True
    config = config_from_args(_parse("--no-async-decode"), _embedded)
    assert not config.async_decode and config.engine_config().async_decode is False
    assert config_from_args(_parse("--async-decode"), _embedded).async_decode


def test_every_flag_reaches_a_config_field() -> None:
    fields = {f.name for f in dataclasses.fields(ServerConfig)}
    renamed = {"model": "model_path", "tenants": "tenants_file", "no_metrics": "metrics_port"}
    dests = {a.dest for a in _parser()._actions} - {"help", "log_level"}
    assert {renamed.get(d, d) for d in dests} <= fields


def test_device_and_dtype_choices_match_the_config_types() -> None:
    assert set(_choices("device")) == set(typing.get_args(DeviceChoice))
    assert set(_choices("dtype")) == set(typing.get_args(DtypeChoice))
    with pytest.raises(SystemExit):
        _parse("--device", "tpu")


def test_config_from_args_validates() -> None:
    with pytest.raises(ConfigError, match=r"^port:"):
        config_from_args(_parse("--port", "70000"), _embedded)
    with pytest.raises(ConfigError, match=r"^max_lora_rank:"):
        config_from_args(_parse("--max-lora-rank", "0"), _embedded)


def test_a_small_max_new_tokens_flag_is_usable() -> None:
    # default_max_new_tokens (64) has no flag, so `--max-new-tokens 32` must not be refused
    # because of it: the user has no way to fix "default_max_new_tokens: 64 exceeds ...".
    config = config_from_args(_parse("--max-new-tokens", "32"), _embedded)
    assert config.max_new_tokens_limit == 32
    assert 1 <= config.default_max_new_tokens <= 32


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "server.example.com"])
def test_run_serve_refuses_a_dev_mode_public_host(
    host: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, served: list[ServerConfig]
) -> None:
    code = run_serve(
        _parse("--host", host, "--data-dir", str(tmp_path), "--metrics-port", "0"), _embedded
    )
    assert code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("loraserve serve: host: ")
    assert repr(host) in err and "--tenants" in err
    assert "Traceback" not in err
    assert served == [], "the server was started despite the config error"
    assert list(tmp_path.iterdir()) == [], "nothing should be created before the config is valid"


def test_run_serve_reports_other_config_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, served: list[ServerConfig]
) -> None:
    code = run_serve(_parse("--grace-seconds", "-1", "--data-dir", str(tmp_path)), _embedded)
    assert code == 2
    assert "loraserve serve: grace_seconds:" in capsys.readouterr().err
    assert served == []


def test_run_serve_starts_with_a_valid_config(tmp_path: Path, served: list[ServerConfig]) -> None:
    argv = ("--port", "0", "--metrics-port", "0", "--data-dir", str(tmp_path))
    code = run_serve(_parse(*argv), _embedded)
    assert code == 0
    assert served == [
        dataclasses.replace(
            ServerConfig(), model_path=EMBEDDED_DIR, port=0, metrics_port=0, data_dir=tmp_path
        )
    ]


def test_upload_limit_flags_reach_the_config() -> None:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(
        [
            "--tenant-max-uploads",
            "3",
            "--max-uploads",
            "9",
            "--upload-idle-seconds",
            "2.5",
            "--upload-deadline-seconds",
            "60",
        ]
    )
    config = config_from_args(args, _embedded)
    assert (config.tenant_max_uploads, config.max_uploads) == (3, 9)
    assert (config.upload_idle_seconds, config.upload_deadline_seconds) == (2.5, 60.0)


def test_freezing_the_start_up_heap_takes_every_live_object_out_of_collections() -> None:
    """In a child process (a frozen heap would outlive this test in pytest's): after
    freeze_startup_heap, the collector tracks none of the objects alive before it, and objects
    made later are collected as ever."""
    code = (
        "import gc\n"
        "from loraserve.server.main import freeze_startup_heap\n"
        "before = len(gc.get_objects())\n"
        "frozen = freeze_startup_heap()\n"
        "assert frozen == gc.get_freeze_count() and frozen >= before // 2, (frozen, before)\n"
        "assert len(gc.get_objects()) < 100, len(gc.get_objects())\n"
        "class Cycle: pass\n"
        "a, b = Cycle(), Cycle()\n"
        "a.other, b.other = b, a\n"
        "del a, b\n"
        "assert gc.collect() >= 2  # a cycle made after the freeze is still found\n"
        "print('ok', frozen)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok ")
