"""Every Prometheus metric loraserve exports, declared once, on the server's own registry.

Naming follows Prometheus conventions: one `loraserve_` prefix, base units (`_seconds`,
`_bytes`), counters end in `_total`, histograms rather than summaries. `tenant` is a label
(tenants come from the tenants file, so the set is bounded); adapter names never are.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from loraserve.server.engine.accounting import EngineObserver, StepStats
from loraserve.server.thread_cpu import ThreadCpuCollector
from loraserve.server.token_gaps import TokenGapHistogram

if TYPE_CHECKING:
    from loraserve.adapters.store import AdapterStore
    from loraserve.server.engine.engine import Engine
    from loraserve.server.engine.model import LoadedModel

# LLM serving spans milliseconds (a decode step) to minutes (a long generation in a queue).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
GIGABYTE = 1e9


class Metrics(EngineObserver):
    """The server's metrics, and the engine observer that feeds most of them."""

    def __init__(
        self,
        *,
        price_per_device_hour: float = 0.0,
        price_per_gb_hour: float = 0.0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self._children: dict[tuple[int, str], Any] = {}
        self._price_per_device_second = price_per_device_hour / 3600.0
        self._price_per_byte_second = price_per_gb_hour / 3600.0 / GIGABYTE
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        ThreadCpuCollector(r)

        self.build_info = Gauge(
            "loraserve_build_info",
            "Always 1; labels describe the running server.",
            ["version", "model", "model_type", "device", "dtype", "currency"],
            registry=r,
        )
        # Latency, per tenant.
        self.request_duration = Histogram(
            "loraserve_request_duration_seconds",
            "End-to-end duration of generation requests, arrival to last token.",
            ["tenant"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "loraserve_queue_wait_seconds",
            "Time a request waited before its prefill started.",
            ["tenant"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.time_to_first_token = Histogram(
            "loraserve_time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            ["tenant"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        # Observed a step at a time (server/token_gaps.py): one bucket update per distinct gap.
        self.time_per_output_token = TokenGapHistogram(r, LATENCY_BUCKETS)
        self.step_duration = Histogram(
            "loraserve_step_duration_seconds",
            "Duration of engine steps (forward and sampling), by kind (prefill, decode).",
            ["kind"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        # Throughput.
        self.prompt_tokens = Counter(
            "loraserve_prompt_tokens_total", "Prompt tokens processed.", ["tenant"], registry=r
        )
        self.generated_tokens = Counter(
            "loraserve_generated_tokens_total", "Tokens generated.", ["tenant"], registry=r
        )
        self.requests = Counter(
            "loraserve_requests_total",
            "Generation requests by outcome: ok, cancelled, deadline, or the gRPC error code.",
            ["tenant", "outcome"],
            registry=r,
        )
        # Load.
        self.requests_running = Gauge(
            "loraserve_requests_running", "Requests in the running batch.", registry=r
        )
        self.requests_waiting = Gauge(
            "loraserve_requests_waiting", "Requests queued for a batch.", registry=r
        )
        self.batch_size = Histogram(
            "loraserve_batch_size", "Rows per engine step.", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_adapters = Histogram(
            "loraserve_batch_distinct_adapters",
            "Distinct adapters per engine step (base model rows not counted).",
            buckets=(0, *BATCH_BUCKETS),
            registry=r,
        )
        # Adapters.
        self.adapters_resident = Gauge(
            "loraserve_adapters_resident", "Adapters loaded, by tier.", ["tier"], registry=r
        )
        self.adapter_resident_bytes = Gauge(
            "loraserve_adapter_resident_bytes",
            "Bytes of adapter weights loaded, by tier.",
            ["tier"],
            registry=r,
        )
        self.adapter_cache = Counter(
            "loraserve_adapter_cache_lookups_total",
            "Adapter lookups by tier and result (hit, miss).",
            ["tier", "result"],
            registry=r,
        )
        self.adapter_evictions = Counter(
            "loraserve_adapter_evictions_total", "Adapters evicted, by tier.", ["tier"], registry=r
        )
        self.adapter_load_duration = Histogram(
            "loraserve_adapter_load_duration_seconds",
            "Time to load an adapter into a tier: host (read, checksum, validate from disk, also "
            "prefetches) or device (from host memory into pages, including any host load).",
            ["tier"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.uploads = Counter(
            "loraserve_adapter_uploads_total",
            "Adapter uploads by outcome: ok or the gRPC error code.",
            ["tenant", "outcome"],
            registry=r,
        )
        self.adapter_pinned_bytes = Gauge(
            "loraserve_adapter_pinned_bytes",
            "Device adapter budget bytes (whole pages) held by the tenant's pinned adapters "
            "(PinAdapter, --preload).",
            ["tenant"],
            registry=r,
        )
        self.adapters_stored = Gauge(
            "loraserve_adapters_stored", "Adapters in the durable store.", ["tenant"], registry=r
        )
        # Cost.
        self.busy_seconds = Counter(
            "loraserve_engine_busy_seconds_total",
            "Wall time the engine spent in steps; equals the sum of all tenants' compute.",
            registry=r,
        )
        self.compute_seconds = Counter(
            "loraserve_tenant_compute_seconds_total",
            "Engine step time attributed to the tenant by its share of each step's tokens.",
            ["tenant"],
            registry=r,
        )
        self.adapter_byte_seconds = Counter(
            "loraserve_tenant_adapter_byte_seconds_total",
            "Device bytes of the tenant's adapters times the seconds they were held.",
            ["tenant"],
            registry=r,
        )
        self.cost = Counter(
            "loraserve_tenant_cost_total",
            "Cost attributed to the tenant in the configured currency (see loraserve_build_info): "
            "compute at the device-hour price plus adapter memory at the GB-hour price.",
            ["tenant"],
            registry=r,
        )

    def serve(self, port: int, host: str) -> int:
        """Serves /metrics over HTTP on host:port (a daemon thread); returns the bound port."""
        http_server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(http_server.server_port)

    def watch(
        self,
        engine: Engine,
        store: AdapterStore,
        loaded: LoadedModel,
        tenants: list[str],
        currency: str,
    ) -> None:
        """Gauges read at scrape time from the live engine and store."""
        import loraserve

        self.build_info.labels(
            loraserve.__version__,
            Path(loaded.model_path).name,  # a name: the path is for admins only
            loaded.model_type,
            str(loaded.device),
            str(loaded.dtype).removeprefix("torch."),
            currency,
        ).set(1)
        scheduler, device, host = engine.scheduler, engine.device_pool, engine.host_cache
        self.requests_running.set_function(lambda: len(scheduler.running))
        self.requests_waiting.set_function(scheduler.waiting_count)
        self.adapters_resident.labels("device").set_function(lambda: len(device.resident()))
        self.adapter_resident_bytes.labels("device").set_function(device.resident_bytes)
        self.adapters_resident.labels("host").set_function(lambda: len(host.resident()))
        self.adapter_resident_bytes.labels("host").set_function(host.resident_bytes)
        for tenant in tenants:
            self.adapters_stored.labels(tenant).set_function(lambda t=tenant: len(store.list(t)))
            self.adapter_pinned_bytes.labels(tenant).set_function(
                lambda t=tenant: engine.pinned_bytes().get(t, 0)
            )

    def declare_tenants(self, tenants: list[str]) -> None:
        """Exports zeros for every configured tenant, so rates work from the first scrape."""
        for tenant in tenants:
            self.generated_tokens.labels(tenant)
            self.prompt_tokens.labels(tenant)
            self.compute_seconds.labels(tenant)
            self.cost.labels(tenant)
            self.adapter_byte_seconds.labels(tenant)

    # ---- EngineObserver (engine thread) -------------------------------------------------------

    def _child(self, family: Counter | Histogram, label: str) -> Any:
        """`family.labels(label)`, kept: labels() takes a lock and builds its key on every call,
        and the engine thread asks per row per step. Bounded by the label values the family
        itself already holds."""
        key = (id(family), label)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(label)
        return child

    def on_step(self, stats: StepStats) -> None:
        child = self._child
        child(self.step_duration, stats.kind).observe(stats.seconds)
        self.batch_size.observe(stats.batch_size)
        self.batch_adapters.observe(stats.distinct_adapters)
        self.busy_seconds.inc(stats.seconds)
        for tenant, seconds in stats.tenant_seconds.items():
            child(self.compute_seconds, tenant).inc(seconds)
            child(self.cost, tenant).inc(seconds * self._price_per_device_second)
        if stats.kind == "prefill":
            for tenant, tokens in stats.tenant_tokens.items():
                child(self.prompt_tokens, tenant).inc(tokens)

    def on_generated(self, tenant_tokens: dict[str, int]) -> None:
        for tenant, tokens in tenant_tokens.items():
            self._child(self.generated_tokens, tenant).inc(tokens)

    def on_token_gaps(self, gaps: dict[tuple[str, float], int]) -> None:
        self.time_per_output_token.observe(gaps)

    def on_residency(self, tenant_byte_seconds: dict[str, float]) -> None:
        for tenant, byte_seconds in tenant_byte_seconds.items():
            self.adapter_byte_seconds.labels(tenant).inc(byte_seconds)
            self.cost.labels(tenant).inc(byte_seconds * self._price_per_byte_second)

    def on_adapter_cache(self, tier: str, event: str, seconds: float = 0.0) -> None:
        if event == "eviction":
            self.adapter_evictions.labels(tier).inc()
            return
        if event in ("hit", "miss"):
            self.adapter_cache.labels(tier, event).inc()
        if event in ("miss", "prefetch"):
            self.adapter_load_duration.labels(tier).observe(seconds)
