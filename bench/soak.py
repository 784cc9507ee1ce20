"""A bounded load and soak test of a real loraserve server, loopback only, stopping by itself.

    python -m loraserve.bench.soak [--duration S] [--clients N] [--tenants A B C] [--max-requests N]
                         [--json PATH]

What it does:

1. Starts a real server: `python -m loraserve serve` in a child process (default; its RSS is
   measured on the child's pid with psutil) or server.app.Server on a thread of this process
   (`--server thread`, cheaper to start; RSS is then this whole process's). The server binds
   127.0.0.1 on a free port, with a tenants file this command generates (3+ tenants, random
   API keys) and a throwaway data directory.
2. Uploads `--adapters-per-tenant` (default 2) random PEFT adapters per tenant with the real
   client (AsyncLoraServeClient.upload_adapter).
3. Runs `--clients` concurrent async clients (one channel each, tenants assigned round-robin)
   for at most `--duration` seconds and at most `--max-requests` requests in all: a mix of
   unary Generate and streaming GenerateStream, with and without the tenant's adapters, random
   max_new_tokens in `--min-new-tokens`..`--max-new-tokens`, and a few ListAdapters calls.
4. Samples the server's RSS every second. The growth is measured from the sample at the end of
   the warm-up (`--warmup`, default 10% of the duration, 3..20 s) to the last sample after the
   load; the bound is the larger of `--rss-bound-mib` (64 MiB) and `--rss-bound-pct` (10%) of
   the warm RSS.

It prints a table (and writes `--json PATH`) with requests by status, tenant and kind, p50/p99
end-to-end latency and TTFT (the server's Usage; for streams also the client's first token),
throughput, and the RSS samples summary. Exit code 1 if any call failed unexpectedly (every
non-OK status is unexpected, except RESOURCE_EXHAUSTED when `--tenant-max-requests` deliberately
configures a quota), if a tenant got no successful response, or if the RSS bound is exceeded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import secrets
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loraserve.bench.grpc_server import BenchServer, server_pid
from loraserve.bench.grpc_server import start_server as start_bench_server
from loraserve.bench.stats import percentile

MIB = 1024 * 1024

PROMPTS: tuple[str, ...] = (
    "The quick brown fox",
    "Once upon a time, in a land far away,",
    "Summarize the following report in one sentence:",
    "def fibonacci(n):",
    "Translate to French: good morning",
    "List three colors:",
    "The capital of France is",
    "In the beginning",
)


@dataclass(frozen=True)
class SoakSettings:
    """What one soak run does; every count and duration is capped."""

    duration_s: float = 120.0
    """No new request starts after this many seconds of load."""
    clients: int = 8
    """Concurrent async clients (each with its own channel)."""
    tenants: tuple[str, ...] = ("acme", "globex", "initech")
    """Tenant names written to the generated tenants file (at least 3)."""
    max_requests: int = 100_000
    """Requests (Generate, GenerateStream, ListAdapters) in all, at most."""
    adapters_per_tenant: int = 2
    """Random PEFT adapters uploaded per tenant before the load."""
    adapter_rank: int = 8
    """Rank of those adapters."""
    min_new_tokens: int = 2
    """Smallest random max_new_tokens of a Generate call."""
    max_new_tokens: int = 16
    """Largest random max_new_tokens of a Generate call."""
    stream_fraction: float = 0.5
    """Share of Generate calls that stream."""
    adapter_fraction: float = 0.6
    """Share of Generate calls that name one of the tenant's adapters (else the base model)."""
    list_fraction: float = 0.05
    """Share of calls that are ListAdapters."""
    warmup_s: float | None = None
    """RSS baseline is taken this long into the load; None: 10% of duration, 3..20 s."""
    rss_bound_mib: float = 64.0
    """Allowed RSS growth after warm-up, in MiB (or rss_bound_pct of the warm RSS if larger)."""
    rss_bound_pct: float = 10.0
    """Allowed RSS growth after warm-up, in percent of the warm RSS (or rss_bound_mib)."""
    tenant_max_requests: int | None = None
    """Configure this per-tenant quota; RESOURCE_EXHAUSTED then counts as expected."""
    server: str = "process"
    """"process" (`python -m loraserve serve` child) or "thread" (in this process)."""
    model_dir: Path | None = None
    """Base model checkpoint; None: the embedded test model (random weights), built here."""
    seed: int = 0
    """Seed of the request mix."""
    request_timeout_s: float = 60.0
    """Deadline of each call."""

    @property
    def warmup(self) -> float:
        if self.warmup_s is not None:
            return min(self.warmup_s, self.duration_s)
        return min(max(0.1 * self.duration_s, 3.0), 20.0, self.duration_s)

    @property
    def expected_statuses(self) -> frozenset[str]:
        if self.tenant_max_requests is not None:
            return frozenset({"OK", "RESOURCE_EXHAUSTED"})
        return frozenset({"OK"})

    def validate(self) -> SoakSettings:
        if len(self.tenants) < 3 or len(set(self.tenants)) != len(self.tenants):
            raise ValueError("soak needs at least 3 distinct tenants")
        if not 0 < self.duration_s <= 24 * 3600:
            raise ValueError("duration must be in (0, 86400] seconds")
        if not 1 <= self.clients <= 1024:
            raise ValueError("clients must be in 1..1024")
        if not 1 <= self.max_requests <= 10_000_000:
            raise ValueError("max_requests must be in 1..10,000,000")
        if not 1 <= self.min_new_tokens <= self.max_new_tokens <= 1024:
            raise ValueError("need 1 <= min_new_tokens <= max_new_tokens <= 1024")
        if self.server not in ("process", "thread"):
            raise ValueError("server must be 'process' or 'thread'")
        return self


@dataclass(frozen=True)
class CallResult:
    """One call of the load."""

    tenant: str
    kind: str
    """"unary", "stream" or "list"."""
    adapter: str
    status: str
    """A grpc.StatusCode name ("OK" on success)."""
    started_s: float
    """Seconds since the load started."""
    latency_s: float
    ttft_s: float = math.nan
    """Server's Usage.time_to_first_token_seconds (Generate calls)."""
    client_ttft_s: float = math.nan
    """Send to the first message with tokens, at the client (streams)."""
    completion_tokens: int = 0
    detail: str = ""


@dataclass
class RssSample:
    t_s: float
    """Seconds since the load started (negative: before it)."""
    rss_bytes: int


@dataclass
class SoakReport:
    """Everything a run measured, and its verdict."""

    settings: dict[str, Any]
    wall_s: float
    results: list[CallResult] = field(default_factory=list)
    rss: list[RssSample] = field(default_factory=list)
    rss_pid: int = 0
    upload_s: float = 0.0

    # Derived numbers.

    def by_status(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            out[r.status] = out.get(r.status, 0) + 1
        return dict(sorted(out.items()))

    def unexpected(self) -> list[CallResult]:
        expected = set(self.settings["expected_statuses"])
        return [r for r in self.results if r.status not in expected]

    def ok_by_tenant(self) -> dict[str, int]:
        out = {t: 0 for t in self.settings["tenants"]}
        for r in self.results:
            if r.status == "OK":
                out[r.tenant] = out.get(r.tenant, 0) + 1
        return out

    def latency(self, kind: str | None = None) -> dict[str, float | None]:
        ok = [r for r in self.results if r.status == "OK" and (kind is None or r.kind == kind)]
        gens = [r for r in ok if r.kind != "list"]
        return {
            "count": float(len(ok)),
            "latency_p50_s": percentile([r.latency_s for r in ok], 50),
            "latency_p99_s": percentile([r.latency_s for r in ok], 99),
            "ttft_p50_s": percentile([r.ttft_s for r in gens], 50),
            "ttft_p99_s": percentile([r.ttft_s for r in gens], 99),
            "client_ttft_p50_s": percentile([r.client_ttft_s for r in gens], 50),
            "client_ttft_p99_s": percentile([r.client_ttft_s for r in gens], 99),
        }

    def throughput(self) -> dict[str, float]:
        ok = [r for r in self.results if r.status == "OK"]
        tokens = sum(r.completion_tokens for r in ok)
        wall = self.wall_s if self.wall_s > 0 else math.nan
        return {
            "requests_per_s": len(ok) / wall,
            "tokens_per_s": tokens / wall,
            "completion_tokens": float(tokens),
        }

    def memory(self) -> dict[str, Any]:
        """RSS after warm-up, at the end and the growth between, against the bound."""
        warmup = float(self.settings["warmup_s"])
        during = [s for s in self.rss if s.t_s >= 0]
        if not during:
            return {"samples": len(self.rss), "within_bound": False, "reason": "no RSS samples"}
        after = [s for s in during if s.t_s >= warmup] or during[-1:]
        warm = after[0].rss_bytes
        end = self.rss[-1].rss_bytes
        growth = end - warm
        bound = max(
            float(self.settings["rss_bound_mib"]) * MIB,
            float(self.settings["rss_bound_pct"]) / 100.0 * warm,
        )
        return {
            "samples": len(self.rss),
            "pid": self.rss_pid,
            "start_mib": self.rss[0].rss_bytes / MIB,
            "warm_mib": warm / MIB,
            "warm_at_s": after[0].t_s,
            "end_mib": end / MIB,
            "peak_mib": max(s.rss_bytes for s in self.rss) / MIB,
            "growth_mib": growth / MIB,
            "bound_mib": bound / MIB,
            "within_bound": growth <= bound,
        }

    def failures(self) -> list[str]:
        """Why the run fails; empty when it passes."""
        out = []
        bad = self.unexpected()
        if bad:
            first = bad[0]
            out.append(
                f"{len(bad)} unexpected error(s), first: {first.status} on {first.kind} "
                f"({first.tenant}/{first.adapter or 'base'}): {first.detail}"
            )
        silent = [t for t, n in self.ok_by_tenant().items() if n == 0]
        if silent:
            out.append(f"tenants without a successful response: {', '.join(silent)}")
        mem = self.memory()
        if not mem["within_bound"]:
            out.append(
                f"server RSS grew {mem.get('growth_mib', math.nan):.1f} MiB after warm-up, "
                f"bound {mem.get('bound_mib', math.nan):.1f} MiB"
                if "growth_mib" in mem
                else str(mem.get("reason"))
            )
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "wall_s": self.wall_s,
            "upload_s": self.upload_s,
            "requests": len(self.results),
            "by_status": self.by_status(),
            "unexpected_errors": len(self.unexpected()),
            "ok_by_tenant": self.ok_by_tenant(),
            "latency": {k: self.latency(k) for k in ("unary", "stream", "list")}
            | {"all": self.latency()},
            "throughput": self.throughput(),
            "memory": self.memory(),
            "rss_samples": [asdict(s) for s in self.rss],
            "errors": [asdict(r) for r in self.unexpected()[:20]],
            "failures": self.failures(),
            "passed": not self.failures(),
        }


# The server.


def write_tenants_file(path: Path, tenants: tuple[str, ...]) -> dict[str, str]:
    """Writes a tenants TOML with one fresh random API key per tenant; returns name -> key."""
    from loraserve.server.tenants import hash_key

    keys = {name: f"soak-{name}-{secrets.token_hex(12)}" for name in tenants}
    path.write_text(
        "".join(
            f'[tenants.{name}]\napi_keys = ["{hash_key(key)}"]\n\n' for name, key in keys.items()
        )
    )
    return keys


def _server_flags(
    settings: SoakSettings, data_dir: Path, tenants_file: Path
) -> dict[str, str | None]:
    flags: dict[str, str | None] = {
        "--data-dir": str(data_dir),
        "--tenants": str(tenants_file),
        "--host": "127.0.0.1",
        "--device": "cpu",
        "--no-metrics": None,
        "--max-lora-rank": str(max(8, settings.adapter_rank)),
        "--max-new-tokens": str(max(64, settings.max_new_tokens)),
        "--max-seq-len": "256",
        "--max-batch-size": str(max(8, settings.clients)),
        "--grace-seconds": "1",
        "--access-log": "",
        "--log-level": "WARNING",
        # A tenants file means production mode: the base model is always named explicitly.
        "--model": str(settings.model_dir) if settings.model_dir is not None else "embedded",
    }
    if settings.tenant_max_requests is not None:
        flags["--tenant-max-requests"] = str(settings.tenant_max_requests)
    return flags


def start_server(settings: SoakSettings, work_dir: Path, tenants_file: Path) -> BenchServer:
    """Starts the soak's server (bench.grpc_server: a child process or a thread) and waits."""
    data_dir = work_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    flags = _server_flags(settings, data_dir, tenants_file)
    if settings.model_dir is None:
        from loraserve.testing.tiny_model import default_model_path

        flags["--model"] = str(default_model_path())
    return start_bench_server(settings.server, flags, work_dir / "server.log")  # type: ignore[arg-type]


async def wait_serving(client: Any, server: BenchServer, timeout_s: float = 300.0) -> None:
    """Waits for SERVING; fails at once if the server died."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await client.wait_until_serving(1.0)
            return
        except TimeoutError:
            if not server.alive():
                raise RuntimeError("the soak server exited while starting") from None
            if time.monotonic() > deadline:
                raise


# The load.


def make_adapters(settings: SoakSettings, work_dir: Path) -> list[Path]:
    """adapters_per_tenant random PEFT directories (shared by every tenant's uploads)."""
    from loraserve.bench.adapter_factory import AdapterFactory, LoraShape
    from loraserve.testing.tiny_model import default_model_path

    model_dir = settings.model_dir or default_model_path()
    factory = AdapterFactory(
        model_dir,
        LoraShape(rank=settings.adapter_rank, alpha=2.0 * settings.adapter_rank),
        seed=settings.seed,
    )
    return factory.ensure(work_dir / "adapters", settings.adapters_per_tenant)


class RssSampler:
    """Samples a pid's RSS every `interval_s` on a thread; times are relative to `origin`."""

    def __init__(self, pid: int, interval_s: float = 1.0) -> None:
        import psutil

        self._process = psutil.Process(pid)
        self.interval_s = interval_s
        self.origin = time.perf_counter()
        self.samples: list[RssSample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-rss", daemon=True)

    def sample(self) -> None:
        import psutil

        try:
            rss = int(self._process.memory_info().rss)
        except psutil.Error:
            return
        self.samples.append(RssSample(time.perf_counter() - self.origin, rss))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> list[RssSample]:
        self._stop.set()
        self._thread.join(10)
        self.sample()
        return self.samples


async def _one_call(
    client: Any,
    rng: random.Random,
    settings: SoakSettings,
    tenant: str,
    adapters: list[str],
    load_start: float,
) -> CallResult:
    import grpc

    roll = rng.random()
    if roll < settings.list_fraction:
        kind, adapter = "list", ""
    else:
        kind = "stream" if rng.random() < settings.stream_fraction else "unary"
        adapter = (
            rng.choice(adapters) if adapters and rng.random() < settings.adapter_fraction else ""
        )
    prompt = rng.choice(PROMPTS)
    max_new = rng.randint(settings.min_new_tokens, settings.max_new_tokens)
    sent = time.perf_counter()
    started_s = sent - load_start
    ttft = math.nan
    client_ttft = math.nan
    tokens = 0
    try:
        if kind == "list":
            listed = await client.list_adapters(timeout_s=settings.request_timeout_s)
            tokens = 0
            if len(listed) < len(adapters):
                return CallResult(
                    tenant, kind, adapter, "WRONG_RESULT", started_s,
                    time.perf_counter() - sent,
                    detail=f"listed {len(listed)} adapters, uploaded {len(adapters)}",
                )  # fmt: skip
        elif kind == "unary":
            response = await client.generate(
                prompt,
                adapter=adapter,
                max_new_tokens=max_new,
                temperature=0.0,
                ignore_eos=True,
                timeout_s=settings.request_timeout_s,
            )
            tokens = int(response.usage.completion_tokens)
            ttft = float(response.usage.time_to_first_token_seconds)
        else:
            async for message in client.generate_stream(
                prompt,
                adapter=adapter,
                max_new_tokens=max_new,
                temperature=0.0,
                ignore_eos=True,
                timeout_s=settings.request_timeout_s,
            ):
                if message.token_ids and math.isnan(client_ttft):
                    client_ttft = time.perf_counter() - sent
                if message.HasField("usage"):
                    tokens = int(message.usage.completion_tokens)
                    ttft = float(message.usage.time_to_first_token_seconds)
    except grpc.RpcError as exc:
        code = exc.code()
        return CallResult(
            tenant,
            kind,
            adapter,
            code.name if code is not None else "UNKNOWN",
            started_s,
            time.perf_counter() - sent,
            detail=str(exc.details()),
        )
    latency = time.perf_counter() - sent
    if kind != "list" and tokens != max_new:
        return CallResult(
            tenant, kind, adapter, "WRONG_RESULT", started_s, latency,
            detail=f"{tokens} completion tokens, asked for {max_new} with ignore_eos",
        )  # fmt: skip
    return CallResult(tenant, kind, adapter, "OK", started_s, latency, ttft, client_ttft, tokens)


async def run_load(
    settings: SoakSettings,
    target: str,
    keys: dict[str, str],
    adapters: dict[str, list[str]],
) -> tuple[list[CallResult], float, float]:
    """Runs the clients; returns (results, load start (perf_counter), wall seconds)."""
    from loraserve.client.aio import AsyncLoraServeClient
    from loraserve.client.config import ClientConfig

    tenants = list(settings.tenants)
    results: list[CallResult] = []
    issued = 0
    start = time.perf_counter()
    deadline = start + settings.duration_s
    last_done = start

    async def worker(index: int) -> None:
        nonlocal issued, last_done
        tenant = tenants[index % len(tenants)]
        rng = random.Random(settings.seed * 7919 + index)
        config = ClientConfig(
            target=target, api_key=keys[tenant], timeout_s=settings.request_timeout_s
        )
        async with AsyncLoraServeClient(config) as client:
            while time.perf_counter() < deadline and issued < settings.max_requests:
                issued += 1
                result = await _one_call(client, rng, settings, tenant, adapters[tenant], start)
                results.append(result)
                last_done = max(last_done, time.perf_counter())

    await asyncio.gather(*(worker(i) for i in range(settings.clients)))
    return results, start, last_done - start


async def _soak(settings: SoakSettings, work_dir: Path) -> SoakReport:
    from loraserve.client.aio import AsyncLoraServeClient
    from loraserve.client.config import ClientConfig

    tenants_file = work_dir / "tenants.toml"
    keys = write_tenants_file(tenants_file, settings.tenants)
    if settings.model_dir is None:  # built (cached) here once, not raced by the child
        from loraserve.testing.tiny_model import default_model_path

        await asyncio.to_thread(default_model_path)
    adapter_dirs = await asyncio.to_thread(make_adapters, settings, work_dir)
    server = await asyncio.to_thread(start_server, settings, work_dir, tenants_file)
    sampler: RssSampler | None = None
    try:
        first = settings.tenants[0]
        probe = ClientConfig(target=server.target, api_key=keys[first], timeout_s=60.0)
        async with AsyncLoraServeClient(probe) as client:
            await wait_serving(client, server)
        upload_start = time.perf_counter()
        adapters: dict[str, list[str]] = {}
        for tenant in settings.tenants:
            config = ClientConfig(target=server.target, api_key=keys[tenant], timeout_s=120.0)
            async with AsyncLoraServeClient(config) as client:
                names = []
                for index, directory in enumerate(adapter_dirs):
                    name = f"{tenant}-soak-{index}"
                    await client.upload_adapter(directory, name)
                    names.append(name)
                adapters[tenant] = names
        upload_s = time.perf_counter() - upload_start
        sampler = RssSampler(server_pid(server)).start()
        load_task = run_load(settings, server.target, keys, adapters)
        results, load_start, wall_s = await load_task
        samples = await asyncio.to_thread(sampler.stop)
        offset = load_start - sampler.origin
        rss = [RssSample(s.t_s - offset, s.rss_bytes) for s in samples]
        if not server.alive():
            raise RuntimeError("the soak server died during the load")
    finally:
        if sampler is not None:
            sampler.stop()
        await asyncio.to_thread(server.stop)
    recorded = asdict(settings) | {
        "warmup_s": settings.warmup,
        "expected_statuses": sorted(settings.expected_statuses),
        "tenants": list(settings.tenants),
        "model_dir": str(settings.model_dir) if settings.model_dir else None,
    }
    return SoakReport(
        settings=recorded,
        wall_s=wall_s,
        results=results,
        rss=rss,
        rss_pid=server_pid(server),
        upload_s=upload_s,
    )


def run_soak(settings: SoakSettings, work_dir: Path | None = None) -> SoakReport:
    """Runs one soak (server start, uploads, load, stop); the work dir is temporary if None."""
    settings.validate()
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
        return asyncio.run(_soak(settings, work_dir))
    tmp = Path(tempfile.mkdtemp(prefix="loraserve-soak-"))
    try:
        return asyncio.run(_soak(settings, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# Output.


def _fmt_s(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value * 1000:9.1f} ms"


def format_report(report: SoakReport) -> str:
    """The human-readable table."""
    s = report.settings
    lines = [
        f"loraserve soak: {s['server']} server, {s['clients']} clients, "
        f"{len(s['tenants'])} tenants ({', '.join(s['tenants'])}), "
        f"{s['adapters_per_tenant']} adapters each, duration cap {s['duration_s']:g} s, "
        f"request cap {s['max_requests']}",
        f"load wall {report.wall_s:.1f} s, uploads {report.upload_s:.1f} s, "
        f"{len(report.results)} calls",
        "",
        "status                 calls",
    ]
    expected = set(s["expected_statuses"])
    for status, count in report.by_status().items():
        mark = "" if status in expected else "   <- unexpected"
        lines.append(f"  {status:<20} {count:6d}{mark}")
    lines += ["", "tenant                 ok calls"]
    for tenant, count in report.ok_by_tenant().items():
        lines.append(f"  {tenant:<20} {count:6d}")
    lines += [
        "",
        f"{'kind':<8} {'ok':>6} {'latency p50':>13} {'latency p99':>13} {'TTFT p50':>13} "
        f"{'TTFT p99':>13} {'client TTFT p99':>16}",
    ]
    for kind in ("unary", "stream", "list", None):
        lat = report.latency(kind)
        lines.append(
            f"{kind or 'all':<8} {int(lat['count'] or 0):6d} {_fmt_s(lat['latency_p50_s']):>13} "
            f"{_fmt_s(lat['latency_p99_s']):>13} {_fmt_s(lat['ttft_p50_s']):>13} "
            f"{_fmt_s(lat['ttft_p99_s']):>13} {_fmt_s(lat['client_ttft_p99_s']):>16}"
        )
    tp = report.throughput()
    lines += [
        "",
        f"throughput: {tp['requests_per_s']:.1f} ok calls/s, {tp['tokens_per_s']:.1f} "
        f"generated tokens/s ({int(tp['completion_tokens'])} tokens)",
    ]
    mem = report.memory()
    if "growth_mib" in mem:
        lines.append(
            f"server RSS (pid {mem['pid']}, {mem['samples']} samples at 1 s): start "
            f"{mem['start_mib']:.1f} MiB, after warm-up ({mem['warm_at_s']:.1f} s) "
            f"{mem['warm_mib']:.1f} MiB, end {mem['end_mib']:.1f} MiB, "
            f"peak {mem['peak_mib']:.1f} MiB"
        )
        lines.append(
            f"RSS growth after warm-up: {mem['growth_mib']:+.1f} MiB, bound "
            f"{mem['bound_mib']:.1f} MiB (max of {s['rss_bound_mib']:g} MiB and "
            f"{s['rss_bound_pct']:g}% of warm): "
            + ("within bound" if mem["within_bound"] else "EXCEEDED")
        )
    failures = report.failures()
    lines += ["", "PASS" if not failures else "FAIL: " + "; ".join(failures)]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = SoakSettings()
    p = argparse.ArgumentParser(
        prog="python -m loraserve.bench.soak",
        description="Bounded load and soak test of a real loraserve server (loopback only).",
    )
    p.add_argument("--duration", type=float, default=d.duration_s, help="load seconds (cap)")
    p.add_argument("--clients", type=int, default=d.clients, help="concurrent async clients")
    p.add_argument("--tenants", nargs="+", default=list(d.tenants), help="tenant names (3+)")
    p.add_argument("--max-requests", type=int, default=d.max_requests, help="request cap")
    p.add_argument("--adapters-per-tenant", type=int, default=d.adapters_per_tenant)
    p.add_argument("--adapter-rank", type=int, default=d.adapter_rank)
    p.add_argument("--min-new-tokens", type=int, default=d.min_new_tokens)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--warmup", type=float, default=None, help="seconds before the RSS baseline")
    p.add_argument("--rss-bound-mib", type=float, default=d.rss_bound_mib)
    p.add_argument("--rss-bound-pct", type=float, default=d.rss_bound_pct)
    p.add_argument(
        "--tenant-max-requests",
        type=int,
        default=None,
        help="configure this quota; RESOURCE_EXHAUSTED then counts as expected",
    )
    p.add_argument("--server", choices=["process", "thread"], default=d.server)
    p.add_argument("--model", type=Path, default=None, help="base model (default: embedded tiny)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--work-dir", type=Path, default=None, help="keep files here (default: temp)")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = SoakSettings(
        duration_s=args.duration,
        clients=args.clients,
        tenants=tuple(args.tenants),
        max_requests=args.max_requests,
        adapters_per_tenant=args.adapters_per_tenant,
        adapter_rank=args.adapter_rank,
        min_new_tokens=args.min_new_tokens,
        max_new_tokens=args.max_new_tokens,
        warmup_s=args.warmup,
        rss_bound_mib=args.rss_bound_mib,
        rss_bound_pct=args.rss_bound_pct,
        tenant_max_requests=args.tenant_max_requests,
        server=args.server,
        model_dir=args.model,
        seed=args.seed,
    )
    try:
        settings.validate()
    except ValueError as exc:
        print(f"bench.soak: {exc}", file=sys.stderr)
        return 2
    report = run_soak(settings, args.work_dir)
    print(format_report(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_json(), indent=2, default=str) + "\n")
    return 0 if not report.failures() else 1


if __name__ == "__main__":
    sys.exit(main())
