"""The `loraserve` command line: `serve` runs the server; every other subcommand is a client.

Client subcommands talk to a server through client.LoraServeClient and print either
human-readable text or, with --json, one JSON object. Server errors print
`error: <STATUS>: <details>` on stderr and exit 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypedDict

import grpc

from loraserve import __version__
from loraserve.client.config import DEFAULT_TARGET, ClientConfig
from loraserve.client.request import Prompt
from loraserve.client.results import (
    JsonObject,
    StreamAccumulator,
    adapter_info_to_dict,
    adapter_usage_to_dict,
    generate_response_to_dict,
    server_info_to_dict,
)
from loraserve.client.sync import LoraServeClient
from loraserve.client.upload import AdapterDirectoryError
from loraserve.v1 import adapters_pb2, inference_pb2

TARGET_ENV = "LORASERVE_TARGET"
API_KEY_ENV = "LORASERVE_API_KEY"

LOCAL_COMMANDS = {
    "train": ("loraserve.finetune.train", "main"),
    "eval": ("loraserve.finetune.evaluate", "main"),
    "demo": ("loraserve.finetune.demo", "main"),
}
"""Commands that work on local files (imported on use: they need torch), by module."""

Handler = Callable[[LoraServeClient, argparse.Namespace], int]
"""A client subcommand: runs against a connected client, returns the exit code."""


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns the process exit code (0 ok, 1 failed, 2 usage error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # Local commands own all their flags (some share names with the client options below).
    local = None
    if argv and argv[0] in LOCAL_COMMANDS:
        local, rest = LOCAL_COMMANDS[argv[0]], argv[1:]
    elif argv[:2] == ["adapters", "inspect"]:
        local, rest = ("loraserve.finetune.inspect", "main"), argv[2:]
    if argv and argv[0] == "serve-ray":
        from loraserve.server.ray.main import main as serve_ray_main  # Ray is an optional extra

        try:
            return serve_ray_main(argv[1:], _embedded_model)
        except SystemExit as e:
            return _exit_code(e)
    if local is not None:
        try:  # imported on use: these need torch
            return int(getattr(importlib.import_module(local[0]), local[1])(rest))
        except SystemExit as e:  # argparse's --help and usage errors
            return _exit_code(e)
    parser = build_parser()
    try:
        # parse_known_args: `serve` passes its flags through to the server's own parser.
        args, extras = parser.parse_known_args(argv)
        if args.command == "serve":
            return _serve(extras)
        if args.command == "bench":
            from loraserve.bench.run import (
                main as bench_main,  # imports torch: only when benchmarking
            )

            return bench_main(extras)
        if args.command == "hash-key":
            return _hash_key(args)
        if extras:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        config = _client_config(args, parser)
    except SystemExit as e:  # argparse exits on --help and on usage errors.
        return _exit_code(e)

    handler: Handler = args.handler
    try:
        with LoraServeClient(config) as client:
            return handler(client, args)
    except grpc.RpcError as e:
        # Server errors are expected outcomes for a CLI: one line, never a traceback.
        print(f"error: {e.code().name}: {e.details() or ''}", file=sys.stderr)
        return 1
    except (AdapterDirectoryError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


# Parser


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree; connection options are accepted before or after a subcommand."""
    parser = argparse.ArgumentParser(
        prog="loraserve", description="Serve LoRA adapters over gRPC, or talk to a server."
    )
    parser.add_argument("--version", action="version", version=f"loraserve {__version__}")
    _add_client_options(parser, with_defaults=True)
    # Subcommands repeat the options with SUPPRESS defaults, so a value given before the
    # subcommand is not overwritten by the subcommand's default.
    common = argparse.ArgumentParser(add_help=False)
    _add_client_options(common, with_defaults=False)

    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # No flags here: they belong to the server (server.main), which is imported only when run.
    commands.add_parser(
        "serve", add_help=False, help="run the server (see `loraserve serve --help`)"
    )
    commands.add_parser(
        "bench", add_help=False, help="run the benchmark (see `loraserve bench --help`)"
    )
    for name, help_text in (
        ("train", "fine-tune a LoRA adapter from JSONL (see `loraserve train --help`)"),
        ("eval", "exact match, token accuracy, perplexity: base vs adapter"),
        ("demo", "two tenants train, upload and use their own adapters, end to end"),
        ("serve-ray", "run N replicas on Ray Serve (see `loraserve serve-ray --help`)"),
    ):
        commands.add_parser(name, add_help=False, help=help_text)
    hash_cmd = commands.add_parser(
        "hash-key", help="print the tenants-file form of an API key (sha256:<hex>)"
    )
    hash_cmd.add_argument("key", help="the API key; '-' reads it from stdin")

    adapters = commands.add_parser("adapters", parents=[common], help="manage your adapters")
    adapter_commands = adapters.add_subparsers(
        dest="adapters_command", required=True, metavar="ACTION"
    )
    upload = adapter_commands.add_parser(
        "upload", parents=[common], help="upload a PEFT adapter directory"
    )
    upload.add_argument(
        "directory",
        type=Path,
        metavar="DIR",
        help="directory with adapter_config.json and adapter_model.safetensors",
    )
    upload.add_argument("--name", required=True, help="adapter name")
    upload.add_argument("--description", default="", help="free-form description")
    upload.add_argument("--tenant", default="", help="admin only: upload for this tenant")
    upload.set_defaults(handler=_upload)

    listing = adapter_commands.add_parser("list", parents=[common], help="list your adapters")
    listing.add_argument("--tenant", default="", help="admin only: list this tenant's")
    listing.set_defaults(handler=_list)

    for action, handler, help_text in (
        ("get", _get, "describe an adapter's latest version, or version N with NAME@N"),
        ("delete", _delete, "delete an adapter (all versions), or only version N with NAME@N"),
    ):
        sub = adapter_commands.add_parser(action, parents=[common], help=help_text)
        sub.add_argument("name", metavar="NAME[@N]", help="adapter name, optionally @version")
        sub.add_argument("--tenant", default="", help="admin only: the owning tenant")
        sub.set_defaults(handler=handler)

    for action, handler, help_text in (
        ("pin", _pin, "admin only: keep an adapter loaded on the device tier"),
        ("unpin", _unpin, "admin only: release a pin"),
    ):
        sub = adapter_commands.add_parser(action, parents=[common], help=help_text)
        sub.add_argument(
            "name", metavar="NAME", help="adapter name (follows new versions), or NAME@N"
        )
        sub.add_argument("--tenant", required=True, help="the owning tenant")
        sub.set_defaults(handler=handler)

    versions = adapter_commands.add_parser(
        "versions", parents=[common], help="list an adapter's stored versions"
    )
    versions.add_argument("name", metavar="NAME", help="adapter name")
    versions.add_argument("--tenant", default="", help="admin only: the owning tenant")
    versions.set_defaults(handler=_versions)

    rollback = adapter_commands.add_parser(
        "rollback", parents=[common], help="make a stored version the latest again"
    )
    rollback.add_argument("name", metavar="NAME", help="adapter name")
    rollback.add_argument(
        "--to",
        dest="to_version",
        type=_version_number,
        required=True,
        metavar="N",
        help="the version",
    )
    rollback.add_argument("--tenant", default="", help="admin only: the owning tenant")
    rollback.set_defaults(handler=_rollback)

    # Local work on an adapter directory; its flags belong to finetune.inspect (imported on use).
    adapter_commands.add_parser(
        "inspect",
        add_help=False,
        help="rank advice for an adapter directory (see `loraserve adapters inspect --help`)",
    )

    generate = commands.add_parser("generate", parents=[common], help="generate text")
    generate.add_argument("prompt", metavar="PROMPT", help="the prompt; '-' reads stdin")
    generate.add_argument(
        "--adapter",
        default="",
        help="adapter name (its latest version), NAME@N for version N; omit for the base model",
    )
    generate.add_argument("--max-new-tokens", type=int, metavar="N")
    generate.add_argument("--temperature", type=float, metavar="T", help="0 means greedy")
    generate.add_argument("--top-p", type=float, metavar="P")
    generate.add_argument("--top-k", type=int, metavar="K")
    generate.add_argument("--seed", type=int, metavar="S")
    generate.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="STR",
        help="stop sequence (repeat for several)",
    )
    generate.add_argument(
        "--ignore-eos", action="store_true", default=None, help="always generate N tokens"
    )
    generate.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    generate.add_argument(
        "--chat", action="store_true", help="send the prompt as one user chat message"
    )
    generate.add_argument(
        "--logprobs",
        type=_top_logprobs,
        default=None,
        metavar="N",
        help="print each generated token's logprob and its N (0-20) most likely alternatives",
    )
    generate.set_defaults(handler=_generate)

    info = commands.add_parser("info", parents=[common], help="describe the server")
    info.set_defaults(handler=_info)
    return parser


def _add_client_options(parser: argparse.ArgumentParser, *, with_defaults: bool) -> None:
    def default(value: object) -> object:
        return value if with_defaults else argparse.SUPPRESS

    group = parser.add_argument_group("connection")
    group.add_argument(
        "--target",
        metavar="HOST:PORT",
        default=default(os.environ.get(TARGET_ENV) or DEFAULT_TARGET),
        help=f"server address (env {TARGET_ENV}, default {DEFAULT_TARGET})",
    )
    group.add_argument(
        "--api-key",
        metavar="KEY",
        default=default(os.environ.get(API_KEY_ENV) or None),
        help=f"API key sent as a bearer token (env {API_KEY_ENV})",
    )
    group.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        default=default(ClientConfig.timeout_s),
        help=f"deadline of each call (default {ClientConfig.timeout_s:g})",
    )
    group.add_argument(
        "--tls",
        action="store_true",
        default=default(False),
        help="use TLS with the system's root CAs (implied by the --tls-* paths)",
    )
    group.add_argument(
        "--tls-ca",
        type=Path,
        metavar="PEM",
        default=default(None),
        help="root CA certificate(s) that signed the server's certificate",
    )
    group.add_argument(
        "--tls-cert",
        type=Path,
        metavar="PEM",
        default=default(None),
        help="client certificate chain, for mutual TLS",
    )
    group.add_argument(
        "--tls-key",
        type=Path,
        metavar="PEM",
        default=default(None),
        help="client private key, for mutual TLS",
    )
    group.add_argument(
        "--tls-server-name",
        metavar="NAME",
        default=default(None),
        help="verify the server certificate against NAME instead of the host",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print one JSON object instead of text",
    )


def _client_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ClientConfig:
    try:
        return ClientConfig(
            target=args.target,
            api_key=args.api_key,
            timeout_s=args.timeout,
            tls=args.tls,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_server_name=args.tls_server_name,
        )
    except ValueError as e:
        parser.error(str(e))  # exits 2: a bad flag combination is a usage error


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    return e.code if isinstance(e.code, int) else 1


def _serve(server_argv: list[str]) -> int:
    # Imported here so that client commands never import torch or the model code.
    try:
        from loraserve.server.main import add_serve_arguments, run_serve
    except ImportError as e:
        print(f"error: cannot load the server (server.main): {e}", file=sys.stderr)
        return 1
    parser = argparse.ArgumentParser(
        prog="loraserve serve", description="Serve one base model with many tenants' adapters."
    )
    add_serve_arguments(parser)
    try:
        args = parser.parse_args(server_argv)
    except SystemExit as e:
        return _exit_code(e)
    return run_serve(args, _embedded_model)


def _embedded_model() -> Path:
    """`--model embedded`: the tiny random-weight test model, built once and cached."""
    from loraserve.testing.tiny_model import default_model_path

    return default_model_path()


# Client subcommands


class _GenerateOptions(TypedDict):
    """The keyword arguments `generate` passes to both generate and generate_stream."""

    adapter: str
    max_new_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: list[str]
    ignore_eos: bool | None
    logprobs: bool
    top_logprobs: int


def _generate(client: LoraServeClient, args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    prompt: Prompt = [("user", text)] if args.chat else text
    options = _GenerateOptions(
        adapter=args.adapter,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
        logprobs=args.logprobs is not None,
        top_logprobs=args.logprobs or 0,
    )
    if not args.stream:
        response = client.generate(prompt, **options)
        if args.json:
            _print_json(generate_response_to_dict(response))
        else:
            print(response.text)
            _print_logprobs(response.logprobs)
        return 0

    accumulator = StreamAccumulator()
    for chunk in client.generate_stream(prompt, **options):
        accumulator.add(chunk)
        if not args.json:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    if args.json:
        _print_json(generate_response_to_dict(accumulator.result()))
    else:
        sys.stdout.write("\n")
        _print_logprobs(accumulator.result().logprobs)
    return 0


def _top_logprobs(value: str) -> int:
    n = int(value)
    if not 0 <= n <= 20:
        raise argparse.ArgumentTypeError(f"{n} is not in 0..20")
    return n


def _print_logprobs(entries: Iterable[inference_pb2.TokenLogprob]) -> None:
    """One line per generated token: its id, logprob, and the alternatives as id:logprob."""
    rows = list(entries)
    if not rows:
        return
    print(f"{'token':>8} {'logprob':>10}  top")
    for e in rows:
        top = " ".join(f"{t.token_id}:{t.logprob:.4f}" for t in e.top)
        print(f"{e.token_id:>8} {e.logprob:>10.4f}  {top}".rstrip())


def _hash_key(args: argparse.Namespace) -> int:
    from loraserve.server.tenants import (
        hash_key,  # no torch: tenants imports only the adapters' names
    )

    key = sys.stdin.readline().strip() if args.key == "-" else args.key
    if not key:
        print("error: the API key is empty", file=sys.stderr)
        return 1
    print(hash_key(key))
    return 0


def _info(client: LoraServeClient, args: argparse.Namespace) -> int:
    info = server_info_to_dict(client.server_info())
    if args.json:
        _print_json(info)
    else:
        for key, value in info.items():
            shown = ", ".join(value) if isinstance(value, list) else value
            print(f"{key}: {shown}")
    return 0


def _upload(client: LoraServeClient, args: argparse.Namespace) -> int:
    info = client.upload_adapter(
        args.directory, args.name, description=args.description, tenant=args.tenant
    )
    _print_adapter(info, args.json)
    return 0


def _list(client: LoraServeClient, args: argparse.Namespace) -> int:
    adapters = client.list_adapters(tenant=args.tenant)
    if args.json:
        _print_json({"adapters": [adapter_info_to_dict(a) for a in adapters]})
        return 0
    if not adapters:
        print("no adapters")
        return 0
    rows = [
        (
            "NAME",
            "VERSION",
            "RANK",
            "SIZE",
            "CREATED",
            "REQUESTS",
            "TOKENS",
            "RESIDENT",
            "DESCRIPTION",
        )
    ]
    rows += [
        (
            a.name,
            str(a.version),
            str(a.rank),
            _size(a.size_bytes),
            _time(a.created_at),
            str(a.usage.requests),
            str(a.usage.prompt_tokens + a.usage.completion_tokens),
            _resident(a),
            a.description,
        )
        for a in adapters
    ]
    # Pad every column but the last, so long descriptions do not widen the table.
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        padded = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
        print("  ".join([*padded, row[-1]]).rstrip())
    return 0


def _get(client: LoraServeClient, args: argparse.Namespace) -> int:
    _print_adapter(client.get_adapter(args.name, tenant=args.tenant), args.json)
    return 0


def _pin(client: LoraServeClient, args: argparse.Namespace) -> int:
    _print_adapter(client.pin_adapter(args.name, tenant=args.tenant), args.json)
    return 0


def _unpin(client: LoraServeClient, args: argparse.Namespace) -> int:
    _print_adapter(client.unpin_adapter(args.name, tenant=args.tenant), args.json)
    return 0


def _delete(client: LoraServeClient, args: argparse.Namespace) -> int:
    _print_adapter(client.delete_adapter(args.name, tenant=args.tenant), args.json)
    return 0


def _versions(client: LoraServeClient, args: argparse.Namespace) -> int:
    versions = client.list_adapter_versions(args.name, tenant=args.tenant)
    if args.json:
        _print_json({"versions": [adapter_info_to_dict(v) for v in versions]})
        return 0
    rows = [("VERSION", "LATEST", "RANK", "SIZE", "SHA256", "CREATED", "DESCRIPTION")]
    rows += [
        (
            str(v.version),
            "*" if v.latest else "",
            str(v.rank),
            _size(v.size_bytes),
            v.sha256[:12],
            _time(v.created_at),
            v.description,
        )
        for v in versions
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        padded = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
        print("  ".join([*padded, row[-1]]).rstrip())
    return 0


def _version_number(text: str) -> int:
    """argparse type of --to: a version number as RollbackAdapterRequest carries it (uint32)."""
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) < 2**32:
        raise argparse.ArgumentTypeError(f"{text!r} is not a version number (1 to 2^32-1)")
    return int(text)


def _rollback(client: LoraServeClient, args: argparse.Namespace) -> int:
    info = client.rollback_adapter(args.name, args.to_version, tenant=args.tenant)
    _print_adapter(info, args.json)
    return 0


# Output


def _print_json(obj: JsonObject) -> None:
    print(json.dumps(obj, ensure_ascii=False))


def _print_adapter(info: adapters_pb2.AdapterInfo, as_json: bool) -> None:
    fields = adapter_info_to_dict(info)
    if as_json:
        _print_json(fields)
        return
    fields["size_bytes"] = f"{info.size_bytes} ({_size(info.size_bytes)})"
    fields["created_at"] = _time(info.created_at)
    fields["target_modules"] = f"{len(info.target_modules)} modules"
    usage = fields.pop("usage")
    for key, value in fields.items():
        print(f"{key}: {value}")
    # Since this server process started (per adapter name, all versions).
    last = _time(info.usage.last_used) if info.usage.last_used else "never"
    print(
        f"usage: {usage['requests']} requests, {usage['prompt_tokens']} prompt + "
        f"{usage['completion_tokens']} completion tokens, {usage['compute_seconds']:.3f} "
        f"compute s, cost {usage['cost']:.6g}, last used {last} (since server start)"
    )
    print(f"resident: {_resident(info)}")


def _resident(info: adapters_pb2.AdapterInfo) -> str:
    where = str(adapter_usage_to_dict(info.usage)["resident"])
    return f"{where} (pinned)" if info.pinned else where


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _time(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="seconds")


if __name__ == "__main__":
    sys.exit(main())
