"""S-LoRA-style trace replay against the in-process engine, base and loraserve side by side.

The trace (bench.workloads.make_trace) has Gamma/Poisson arrivals, Zipf adapter popularity over
n registered adapters, and drawn prompt and output lengths. First the saturation throughput is
found by submitting every request at once; then the same trace is replayed with real wall-clock
arrival times at `trace_load` (80%) of the lower saturation rate, once with each request's adapter
and once with every request on the base model (same arrivals, same lengths). Reported per run:
throughput, TTFT p50/p99 (the engine's Usage), and goodput (requests meeting the TTFT SLO per s).
"""

from __future__ import annotations

import logging

from loraserve.bench.context import BenchContext
from loraserve.bench.engine_runner import BenchRequest
from loraserve.bench.workloads import TraceItem, TraceSpec, make_trace, rescale_arrivals

log = logging.getLogger("bench")


def trace_spec(ctx: BenchContext) -> TraceSpec:
    s = ctx.settings
    return TraceSpec(
        n_requests=s.trace_requests,
        rate=1.0,  # rescaled to the measured load before replay
        cv=s.trace_cv,
        n_adapters=s.trace_adapters,
        alpha=s.trace_alpha,
        prompt_dist=s.trace_length_dist,  # type: ignore[arg-type]
        prompt_len=s.trace_prompt_len,
        output_dist=s.trace_length_dist,  # type: ignore[arg-type]
        output_len=s.trace_output_len,
    )


def to_requests(
    ctx: BenchContext, trace: list[TraceItem], tenant: str, names: list[str] | None
) -> list[BenchRequest]:
    """The trace as engine requests; names None puts every request on the base model."""
    return [
        BenchRequest(
            prompt_ids=ctx.prompt(item.prompt_len, i),
            max_new_tokens=item.output_len,
            adapter=None if names is None else names[item.adapter_index],
            tenant=tenant,
            arrival_s=item.arrival_s,
        )
        for i, item in enumerate(trace)
    ]


def run_trace(ctx: BenchContext) -> dict:
    s = ctx.settings
    spec = trace_spec(ctx)
    tenant = f"n{s.trace_adapters}"
    names = ctx.tenant_with(tenant, s.trace_adapters)
    trace = make_trace(spec, s.seed)
    engine = ctx.engine
    log.info(
        "trace: %d requests, %d adapters (zipf %.2f), cv %.2f, prompt %s, output %s",
        s.trace_requests,
        s.trace_adapters,
        s.trace_alpha,
        s.trace_cv,
        s.trace_prompt_len,
        s.trace_output_len,
    )
    variants = {"base": None, "loraserve": names}
    saturation = {}
    for label, variant in variants.items():
        run = engine.run(to_requests(ctx, trace, tenant, variant), timed=False)
        saturation[label] = run.summary(s.slo_ttft_s)
        log.info("  saturation %-9s %6.2f req/s", label, run.requests_per_s)
    rate = s.trace_load * min(v["requests_per_s"] for v in saturation.values())  # type: ignore[type-var]
    replay_trace = rescale_arrivals(trace, rate, spec.rate)
    replay = {}
    for label, variant in variants.items():
        run = engine.run(to_requests(ctx, replay_trace, tenant, variant), timed=True)
        replay[label] = run.summary(s.slo_ttft_s)
        log.info(
            "  at %.2f req/s %-9s ttft p50 %.3fs p99 %.3fs",
            rate,
            label,
            replay[label]["ttft_p50_s"],
            replay[label]["ttft_p99_s"],
        )
    return {
        "requests": s.trace_requests,
        "adapters": s.trace_adapters,
        "alpha": s.trace_alpha,
        "cv": s.trace_cv,
        "prompt_len": list(s.trace_prompt_len),
        "output_len": list(s.trace_output_len),
        "length_dist": s.trace_length_dist,
        "distinct_adapters": len({item.adapter_index for item in trace}),
        "slo_ttft_s": s.slo_ttft_s,
        "load": s.trace_load,
        "rate_rps": rate,
        "saturation": saturation,
        "replay": replay,
    }
