"""Through gRPC against in process, at a GPU's step time, on any machine (run by hand).

The issue's gRPC target (streaming through the real server >= 0.85x the in-process engine's
tokens/s) is about host work: on a GPU the engine thread and the server's event loop share one
GIL while the device computes. On a CPU the model's own forward hides that, so here both engines
(an in-process `Engine` and a real server on a thread of this process) run with the model's
forwards replaced by fixed logits after a `--device-ms` sleep per decode step (bench.stub_device:
the GIL is released, as while a GPU computes). The gRPC load comes from a child process (its own
GIL, as a real client), every request a GenerateStream call of the same prompt and length.

The sleep is synchronous (the host waits for each step, then does its work), so a step here
costs the device time plus the host's, where a GPU with async decode overlaps them: absolute
tokens/s are not a GPU's; the ratio says what the gRPC path's GIL share costs the engine.

    python -m loraserve.bench.grpc_overhead --device-ms 1.5 --modes base,distinct
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loraserve.bench.adapter_factory import AdapterFactory, LoraShape
from loraserve.bench.engine_runner import (
    BenchRequest,
    EngineBench,
    EngineLimits,
    upload_adapter_dir,
)
from loraserve.bench.models import bench_model_path
from loraserve.bench.report import command_result
from loraserve.bench.stub_device import MODES, StubbedForwards, parse_modes
from loraserve.server.metrics import Metrics
from loraserve.server.tenants import DEV_TENANT
from loraserve.server.thread_cpu import thread_cpu_seconds

ENGINE = "loraserve-engine"
LOOP = "loraserve-server"
"""Thread labels (server.thread_cpu): the engine threads, the server's event loop
(BackgroundServer's thread)."""
PROMPT = "Tell me about the weather in the mountains today"
STUB_VOCAB = 1024
"""The stub logits' width (sampling on the device costs little on a GPU; keep it small here)."""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device-ms", type=float, default=1.5, help="device time per step")
    parser.add_argument("--requests", type=int, default=192, help="requests per run")
    parser.add_argument("--concurrency", type=int, default=32, help="also the max batch size")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--adapters", type=int, default=16, help="distinct: adapters in turn")
    parser.add_argument("--modes", default=",".join(MODES), help=f"some of {','.join(MODES)}")
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode and path (best)")
    parser.add_argument(
        "--engine-opt",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a ServerConfig field for both engines (e.g. stream_interval_seconds=0.02)",
    )
    parser.add_argument(
        "--gil-switch-interval",
        type=float,
        default=None,
        help="seconds; this process's thread switch interval (both paths; Python's: 0.005)",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--client", default=None, help=argparse.SUPPRESS)  # the child's target
    parser.add_argument("--client-adapters", default="", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _adapter_names(args: argparse.Namespace, mode: str) -> list[str]:
    """Each request's adapter in order ("" is the base model)."""
    if mode == "base":
        return [""] * args.requests
    return [f"a{i % args.adapters}" for i in range(args.requests)]


# ---- the child process: the gRPC load ----------------------------------------------------------


def _client_main(args: argparse.Namespace) -> None:
    from loraserve.bench.grpc_load import GrpcRequest, run_load
    from loraserve.client.aio import AsyncLoraServeClient
    from loraserve.client.config import ClientConfig

    names = args.client_adapters.split(",")
    requests = [GrpcRequest(PROMPT, name, args.tokens) for name in names]

    async def drive() -> dict:
        async with AsyncLoraServeClient(ClientConfig(target=args.client)) as client:
            await client.wait_until_serving(30.0)
            run = await run_load(client, requests, args.concurrency, duration_s=3600.0)
        errors = [r.error for r in run.run.requests if r.error]
        tokens = sum(r.completion_tokens for r in run.run.requests)
        return {"tokens": tokens, "wall_s": run.run.wall_s, "errors": errors[:3]}

    print(json.dumps(asyncio.run(drive())), flush=True)


def _grpc_run(args: argparse.Namespace, target: str, names: list[str]) -> float:
    """Tokens per second of one load from a child process."""
    command = [
        sys.executable, "-m", "loraserve.bench.grpc_overhead",
        "--client", target, "--client-adapters", ",".join(names),
        "--concurrency", str(args.concurrency), "--tokens", str(args.tokens),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the load process failed: {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["errors"]:
        raise RuntimeError(f"requests failed through gRPC: {result['errors']}")
    return result["tokens"] / result["wall_s"]


# ---- this process: both engines ----------------------------------------------------------------


def _in_process_run(bench: EngineBench, args: argparse.Namespace, names: list[str]) -> float:
    prompt_ids = tuple(bench.engine.encode(PROMPT, ()))
    requests = [BenchRequest(prompt_ids, args.tokens, name or None, DEV_TENANT) for name in names]
    result = bench.run(requests)
    failed = [r.error for r in result.requests if r.error]
    if failed:
        raise RuntimeError(f"requests failed in process: {failed[:3]}")
    return sum(r.completion_tokens for r in result.requests) / result.wall_s


def _cpu_since(before: dict[str, float]) -> dict[str, float]:
    """CPU seconds per thread label since `before` (server.thread_cpu)."""
    now = thread_cpu_seconds()
    return {label: seconds - before.get(label, 0.0) for label, seconds in now.items()}


def _decode_totals(engine) -> tuple[int, float]:
    scheduler = engine.scheduler
    return scheduler.decode_steps, scheduler.decode_seconds


def _measure(args: argparse.Namespace, modes: list[str], scratch: Path) -> list[dict]:
    from loraserve.server.background import BackgroundServer

    model_dir = bench_model_path("tiny", seed=0, storage_dtype="float32", cache_dir=scratch)
    extra = tuple(tuple(opt.split("=", 1)) for opt in args.engine_opt)
    limits = EngineLimits(
        max_batch_size=args.concurrency,
        device_adapters=args.adapters,
        max_new_tokens=max(args.tokens, 1),
        extra=extra,  # type: ignore[arg-type]
    )
    bench = EngineBench(model_dir, scratch / "in-process", limits=limits, observer=Metrics())
    # The server writes its access log as in production, to a file rather than this output.
    config = dataclasses.replace(
        bench.config, data_dir=scratch / "server", access_log=str(scratch / "access.log")
    )
    server = BackgroundServer(config).start()
    try:
        assert server.server is not None
        served = server.server.runtime
        assert served.engine is not None and served.adapter_service is not None
        if "distinct" in modes:
            dirs = AdapterFactory(model_dir, LoraShape(rank=16)).ensure(
                scratch / "adapters", args.adapters
            )
            for i, adapter_dir in enumerate(dirs):
                bench.register(DEV_TENANT, f"a{i}", adapter_dir)
                upload_adapter_dir(served.adapter_service, DEV_TENANT, f"a{i}", adapter_dir)
        device_s = args.device_ms / 1e3
        stubs = [
            StubbedForwards(engine, STUB_VOCAB, args.concurrency, device_s)
            for engine in (bench.engine, served.engine)
        ]
        results = []
        for mode in modes:
            names = _adapter_names(args, mode)
            _in_process_run(bench, args, names[: args.concurrency])  # warm: adapters resident
            _grpc_run(args, server.target, names[: args.concurrency])
            row: dict = {"mode": mode, "in_process": [], "grpc": []}
            for _ in range(args.repeats):  # alternated, so drift hits both alike
                for path, engine in (("in_process", bench.engine), ("grpc", served.engine)):
                    steps0, seconds0 = _decode_totals(engine)
                    cpu0 = thread_cpu_seconds()
                    if path == "grpc":
                        rate = _grpc_run(args, server.target, names)
                    else:
                        rate = _in_process_run(bench, args, names)
                    cpu = _cpu_since(cpu0)
                    steps, seconds = _decode_totals(engine)
                    steps -= steps0
                    row[path].append(
                        {
                            "tokens_per_s": rate,
                            "decode_step_ms": (seconds - seconds0) / max(steps, 1) * 1e3,
                            # The other engine idles meanwhile: the label's CPU is this one's.
                            "engine_cpu_us_per_step": cpu.get(ENGINE, 0.0) / max(steps, 1) * 1e6,
                            "loop_cpu_ms_per_request": cpu.get(LOOP, 0.0) / len(names) * 1e3,
                        }
                    )
            best = {p: max(row[p], key=lambda r: r["tokens_per_s"]) for p in ("in_process", "grpc")}
            row["grpc_over_in_process"] = (
                best["grpc"]["tokens_per_s"] / best["in_process"]["tokens_per_s"]
            )
            results.append(row)
        for stub, engine in zip(stubs, (bench.engine, served.engine), strict=True):
            if stub.decodes != engine.scheduler.decode_steps:
                raise RuntimeError("a decode step bypassed the stubbed device")
        return results
    finally:
        server.stop()
        bench.close()


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    if args.client is not None:
        _client_main(args)
        return {}
    modes = parse_modes(args.modes)
    started = time.perf_counter()
    switch = sys.getswitchinterval()
    if args.gil_switch_interval is not None:
        sys.setswitchinterval(args.gil_switch_interval)
    try:
        with tempfile.TemporaryDirectory(prefix="loraserve-grpc-overhead-") as scratch:
            results = _measure(args, modes, Path(scratch))
    finally:
        sys.setswitchinterval(switch)
    print(
        f"{args.device_ms:g} ms device step (stubbed), {args.concurrency} streams, "
        f"{args.tokens} tokens each, {args.requests} requests per run, best of {args.repeats}, "
        f"switch interval {args.gil_switch_interval or switch:g} s "
        f"({time.perf_counter() - started:.0f} s)"
    )
    for row in results:
        runs = {
            p: ", ".join(
                f"{r['tokens_per_s']:.0f} tok/s ({r['decode_step_ms']:.2f} ms/step, engine "
                f"{r['engine_cpu_us_per_step']:.0f} us CPU/step)"
                for r in row[p]
            )
            for p in ("in_process", "grpc")
        }
        loop = ", ".join(f"{r['loop_cpu_ms_per_request']:.2f}" for r in row["grpc"])
        print(
            f"  {row['mode']:<9} gRPC / in-process {row['grpc_over_in_process']:.3f}\n"
            f"    in-process {runs['in_process']}\n    gRPC {runs['grpc']}\n"
            f"    gRPC server's event loop: {loop} ms CPU per request"
        )
    return command_result(args, results=results)


if __name__ == "__main__":
    main()
