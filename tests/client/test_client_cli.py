"""The `loraserve` command line against the fake server: output shapes and exit codes."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types

import pytest
from client_fakes import API_KEY, FakeServer, MakeAdapterDir

from loraserve.cli import main


def run_cli(server: FakeServer, *argv: str) -> int:
    return main(["--target", server.target, "--api-key", API_KEY, *argv])


def test_generate_json_shape(fake_server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(fake_server, "generate", "--json", "--max-new-tokens", "8", "hi there") == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {
        "text",
        "token_ids",
        "finish_reason",
        "usage",
        "request_id",
        "adapter_version",
    }
    assert out["text"] == "echo: hi"
    assert out["token_ids"] == [ord(c) for c in "echo: hi"]
    assert out["finish_reason"] == "length"
    assert out["usage"]["prompt_tokens"] == len("hi there")
    assert out["usage"]["completion_tokens"] == 8
    assert out["request_id"] == "req-1" and out["adapter_version"] == 0


def test_generate_passes_sampling_flags(fake_server: FakeServer) -> None:
    argv = ["generate", "--temperature", "0.7", "--top-p", "0.9", "--top-k", "5", "--seed", "1"]
    argv += ["--stop", "A", "--stop", "B", "--ignore-eos", "p"]
    assert run_cli(fake_server, *argv) == 0
    sampling = fake_server.state.generate_requests[-1].sampling
    assert sampling.temperature == pytest.approx(0.7) and sampling.top_p == pytest.approx(0.9)
    assert (sampling.top_k, sampling.seed, list(sampling.stop)) == (5, 1, ["A", "B"])
    assert sampling.ignore_eos and not sampling.HasField("max_new_tokens")


def test_generate_stream_prints_text_then_newline(
    fake_server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(fake_server, "generate", "--stream", "abc") == 0
    assert capsys.readouterr().out == "echo: abc\n"


def test_generate_stream_json_is_one_merged_object(
    fake_server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(fake_server, "generate", "--stream", "--json", "abc") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] == "echo: abc" and out["finish_reason"] == "eos"
    assert out["request_id"] == "req-2"


def test_generate_chat_sends_one_user_message(
    fake_server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(fake_server, "generate", "--chat", "hello") == 0
    request = fake_server.state.generate_requests[-1]
    assert [(m.role, m.content) for m in request.messages] == [("user", "hello")]
    assert request.prompt == ""
    assert capsys.readouterr().out == "echo: user: hello\n"


def test_global_options_after_the_subcommand(
    fake_server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["info", "--target", fake_server.target, "--api-key", API_KEY, "--timeout", "4"]
    assert main(argv) == 0
    assert "model_type: llama" in capsys.readouterr().out
    remaining = fake_server.state.calls[-1].time_remaining
    assert remaining is not None and remaining < 4.5


def test_options_before_subcommand_survive_subcommand_defaults(
    fake_server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # --timeout and --json before `adapters list` must not be reset by the subparsers.
    argv = ["--target", fake_server.target, "--api-key", API_KEY, "--timeout", "3", "--json"]
    assert main([*argv, "adapters", "list"]) == 0
    assert json.loads(capsys.readouterr().out) == {"adapters": []}
    remaining = fake_server.state.calls[-1].time_remaining
    assert remaining is not None and remaining < 3.5


def test_target_and_key_from_environment(
    fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LORASERVE_TARGET", fake_server.target)
    monkeypatch.setenv("LORASERVE_API_KEY", API_KEY)
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tenant"] == "tenant-a"
    assert fake_server.state.calls[-1].metadata["authorization"] == f"Bearer {API_KEY}"


def test_adapters_upload_list_get_delete_json(
    fake_server: FakeServer, make_adapter_dir: MakeAdapterDir, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = str(make_adapter_dir(weights_size=3000))
    upload = ["adapters", "upload", directory, "--name", "ad1", "--description", "first", "--json"]
    assert run_cli(fake_server, *upload) == 0
    uploaded = json.loads(capsys.readouterr().out)
    assert uploaded["name"] == "ad1" and uploaded["size_bytes"] == 3000
    assert uploaded["version"] == 1 and uploaded["description"] == "first"
    assert isinstance(uploaded["size_bytes"], int) and len(uploaded["sha256"]) == 64

    assert run_cli(fake_server, "adapters", "list", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [a["name"] for a in listed["adapters"]] == ["ad1"]

    assert run_cli(fake_server, "adapters", "get", "ad1", "--json") == 0
    assert json.loads(capsys.readouterr().out) == uploaded

    assert run_cli(fake_server, "adapters", "list") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["NAME", "VERSION", "RANK"] and table[1].startswith("ad1 ")

    assert run_cli(fake_server, "adapters", "delete", "ad1") == 0
    assert "name: ad1" in capsys.readouterr().out
    assert fake_server.state.adapters == {}


def test_server_error_prints_status_and_exits_1(
    fake_server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(fake_server, "adapters", "get", "missing") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "error: NOT_FOUND: adapter 'missing' not found\n"


def test_unauthenticated_is_exit_1(
    fake_server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--target", fake_server.target, "--api-key", "wrong", "info"]) == 1
    assert capsys.readouterr().err.startswith("error: UNAUTHENTICATED: ")


def test_upload_of_pickle_only_dir_is_refused_locally(
    fake_server: FakeServer, make_adapter_dir: MakeAdapterDir, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = str(make_adapter_dir(weights_file="adapter_model.bin"))
    assert run_cli(fake_server, "adapters", "upload", directory, "--name", "x") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "only safetensors" in err
    assert fake_server.state.calls == []


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["generate"],
        ["adapters", "upload", "dir"],
        ["generate", "--max-new-tokens", "many", "p"],
        ["info", "--bogus"],
        ["info", "--tls-cert", "c.pem"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage:" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--help"]) == 0
    assert "--max-new-tokens" in capsys.readouterr().out


def test_serve_delegates_to_server_main(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[argparse.Namespace] = []

    def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--host")
        parser.add_argument("--port", type=int)
        parser.add_argument("--timeout")  # a name the client options also use

    def run_serve(args: argparse.Namespace, embedded_model: object) -> int:
        seen.append(args)
        assert callable(embedded_model)  # `--model embedded` is built by the CLI, not the server
        return 7

    fake_main = types.ModuleType("loraserve.server.main")
    fake_main.add_serve_arguments = add_serve_arguments  # type: ignore[attr-defined]
    fake_main.run_serve = run_serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "loraserve.server.main", fake_main)

    assert main(["serve", "--host", "0.0.0.0", "--port", "5", "--timeout", "x"]) == 7
    assert (seen[0].host, seen[0].port, seen[0].timeout) == ("0.0.0.0", 5, "x")
    assert main(["serve", "--nope"]) == 2


def test_client_cli_does_not_import_torch() -> None:
    code = "import sys, loraserve.cli, loraserve.client.aio; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
