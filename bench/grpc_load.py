"""Through-gRPC mode: a bounded-concurrency async load generator against a running server.

The server is real (bench.grpc_server), adapters are uploaded with the real client
(AsyncLoraServeClient.upload_adapter), and every request is a GenerateStream call, so
serialization, the servicer, the event-loop hop and streaming are all counted. At most
`concurrency` calls are in flight; no new call starts after `duration_s`. TTFT is measured at
the client (send to the first message carrying tokens); the server's own TTFT (Usage) is kept
beside it. base (no adapter) and loraserve (round-robin over the adapter pool) alternate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import numpy as np

from loraserve.bench.context import BenchContext
from loraserve.bench.grpc_server import settings_serve_flags, start_server
from loraserve.bench.server_steps import read_step_totals
from loraserve.bench.stats import RequestResult, RunResult, median, percentile
from loraserve.bench.workloads import popularity

log = logging.getLogger("bench")


@dataclass(frozen=True)
class GrpcRequest:
    prompt: str
    adapter: str
    """"" is the base model."""
    max_new_tokens: int


@dataclass
class GrpcRun:
    run: RunResult
    server_ttfts: list[float]
    server_steps: dict[str, float] | None = None
    """What the server's engine did during the run (bench.server_steps), when it has metrics."""


async def run_load(
    client,
    requests: list[GrpcRequest],
    concurrency: int,
    duration_s: float,
    sampling: tuple[float, float] = (0.0, 1.0),
) -> GrpcRun:
    """Sends `requests` with at most `concurrency` in flight; stops issuing after duration_s.

    sampling: every request's (temperature, top_p); temperature 0 is greedy."""
    import grpc

    semaphore = asyncio.Semaphore(concurrency)
    start = time.perf_counter()
    deadline = start + duration_s
    results: list[RequestResult] = []
    server_ttfts: list[float] = []
    last_done = start

    async def one(request: GrpcRequest) -> None:
        nonlocal last_done
        async with semaphore:
            sent = time.perf_counter()
            if sent > deadline:
                return
            first: float | None = None
            tokens = 0
            usage = None
            try:
                async for message in client.generate_stream(
                    request.prompt,
                    adapter=request.adapter,
                    max_new_tokens=request.max_new_tokens,
                    temperature=sampling[0],
                    top_p=sampling[1],
                    ignore_eos=True,
                ):
                    if message.token_ids and first is None:
                        first = time.perf_counter()
                    tokens += len(message.token_ids)
                    if message.HasField("usage"):
                        usage = message.usage
            except grpc.RpcError as exc:
                results.append(
                    RequestResult(
                        arrival_s=sent - start,
                        completion_tokens=0,
                        ttft_s=float("nan"),
                        total_s=float("nan"),
                        error=f"{exc.code().name}: {exc.details()}",
                    )
                )
                return
            done = time.perf_counter()
            last_done = max(last_done, done)
            results.append(
                RequestResult(
                    arrival_s=sent - start,
                    completion_tokens=usage.completion_tokens if usage else tokens,
                    ttft_s=(first or done) - sent,
                    total_s=done - sent,
                    queue_s=usage.queue_seconds if usage else float("nan"),
                )
            )
            if usage is not None:
                server_ttfts.append(usage.time_to_first_token_seconds)

    await asyncio.gather(*(one(r) for r in requests))
    return GrpcRun(RunResult(wall_s=last_done - start, requests=results), server_ttfts)


async def _wait_serving(client, server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await client.wait_until_serving(2.0)
            return
        except TimeoutError:
            if not server.alive():
                raise RuntimeError("the bench server exited while starting; see its log") from None
            if time.monotonic() > deadline:
                raise


def _describe_steps(steps: dict[str, float] | None, requests: int) -> str:
    if steps is None:
        return ""
    text = (
        f"; server: {steps['prefill_steps']:.0f} prefills ({steps['prefill_s'] * 1e3:.0f} ms), "
        f"{steps['decode_steps']:.0f} decode steps ({steps['decode_s'] * 1e3:.0f} ms), "
        f"{steps['mean_rows_per_step']:.1f} rows per step"
    )
    loop_s, engine_s = steps.get("cpu_s:MainThread"), steps.get("cpu_s:loraserve-engine")
    if loop_s is not None and engine_s is not None and requests:
        text += (
            f"; CPU per request: event loop {loop_s / requests * 1e3:.2f} ms, "
            f"engine thread {engine_s / requests * 1e3:.2f} ms"
        )
    return text


def _summary(runs: list[GrpcRun], stat: str) -> dict:
    """Throughput by `stat` over the runs; TTFT percentiles of the run that statistic picks."""
    rates = [r.run.tokens_per_s for r in runs]
    value = max(rates) if stat == "best" else median(rates)
    chosen = min(runs, key=lambda r: abs(r.run.tokens_per_s - value))
    ttfts = chosen.run.ttfts()
    server = chosen.server_ttfts
    return {
        "tokens_per_s": value,
        "samples_tokens_per_s": rates,
        "requests": len(chosen.run.requests),
        "errors": sum(r.run.errors for r in runs),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "server_steps": chosen.server_steps,
        "server_ttft_p50_s": percentile(server, 50),
        "server_ttft_p99_s": percentile(server, 99),
    }


async def _drive(ctx: BenchContext, server, concurrency: int) -> dict:
    from loraserve.client.aio import AsyncLoraServeClient
    from loraserve.client.config import ClientConfig
    from loraserve.testing.tiny_model import build_tokenizer

    s = ctx.settings
    tokenizer = build_tokenizer()
    config = ClientConfig(target=server.target, timeout_s=max(600.0, 2 * s.grpc_duration_s))
    # A shared target may hold adapters of an earlier run: names unique to this run.
    prefix = f"g{int(time.time()) % 100000:05d}-" if s.grpc_target else "g"
    async with AsyncLoraServeClient(config) as client:
        await _wait_serving(client, server, 300.0)
        names = []
        started = time.perf_counter()
        for index, directory in enumerate(ctx.adapter_dirs(s.adapters)):
            name = f"{prefix}{index:04d}"
            await client.upload_adapter(directory, name)
            names.append(name)
        upload_s = time.perf_counter() - started
        prompts = [
            tokenizer.decode(list(ctx.prompt(s.prompt_len, i))) for i in range(s.grpc_requests)
        ]
        if s.grpc_popularity == "zipf":
            rng = np.random.default_rng(s.seed)
            picks = popularity("skewed", len(prompts), len(names), rng, s.skew_alpha)
        else:
            picks = [i % len(names) for i in range(len(prompts))]
        workloads = {
            "base": [GrpcRequest(p, "", s.output_len) for p in prompts],
            "loraserve": [
                GrpcRequest(p, names[pick], s.output_len)
                for pick, p in zip(picks, prompts, strict=True)
            ],
        }
        sampling = (s.temperature, s.top_p)
        for requests in workloads.values():  # warm-up: code paths and adapter pages
            warm = requests[: max(concurrency, len(names))]
            await run_load(client, warm, concurrency, s.grpc_duration_s, sampling)
        runs: dict[str, list[GrpcRun]] = {m: [] for m in workloads}
        metrics_port = getattr(server, "metrics_port", 0)
        for _ in range(s.repeats):
            for mode, requests in workloads.items():
                before = read_step_totals(metrics_port)
                result = await run_load(client, requests, concurrency, s.grpc_duration_s, sampling)
                after = read_step_totals(metrics_port)
                if before is not None and after is not None:
                    result.server_steps = after.since(before)
                runs[mode].append(result)
                log.info(
                    "  grpc %-9s %8.1f tokens/s%s",
                    mode,
                    result.run.tokens_per_s,
                    _describe_steps(result.server_steps, len(result.run.requests)),
                )
    out = {mode: _summary(r, s.stat) for mode, r in runs.items()}
    return {
        "server": s.grpc_target or s.grpc_server,
        "popularity": s.grpc_popularity,
        "concurrency": concurrency,
        "requests_per_run": s.grpc_requests,
        "duration_cap_s": s.grpc_duration_s,
        "adapters": len(names),
        "upload_s": upload_s,
        "modes": out,
    }


@dataclass
class ExternalServer:
    """A server or cluster someone else runs (`--grpc-target`): nothing to start or stop."""

    target: str

    def stop(self) -> None:
        pass


def run_grpc(ctx: BenchContext) -> dict:
    s = ctx.settings
    concurrency = s.grpc_concurrency or s.batch
    if s.grpc_target:
        log.info("gRPC: loading %s (concurrency %d)", s.grpc_target, concurrency)
        return asyncio.run(_drive(ctx, ExternalServer(s.grpc_target), concurrency))
    flags = settings_serve_flags(s, ctx.model_dir, ctx.work_dir / "grpc-data")
    log.info("gRPC: starting a %s server (concurrency %d)", s.grpc_server, concurrency)
    with ctx.timed("grpc_server_start_s"):
        server = start_server(s.grpc_server, flags, s.out_dir / "grpc-server.log")
    try:
        return asyncio.run(_drive(ctx, server, concurrency))
    finally:
        server.stop()
