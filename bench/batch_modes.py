"""Batch modes: the same requests, all at once, through loraserve and through HF PEFT.

loraserve: `base` (no adapters), Punica's identical / distinct / uniform / skewed patterns over
the adapter pool, and a sweep over the number of distinct adapters in the batch. Baselines:
`peft-mixed` (one generate with adapter_names) and `naive-swap` (set_adapter per request) on the
distinct pattern. Every run has the same requests, prompt length and output length; modes are
interleaved per repeat and combined with the settings' statistic (best or median tokens/s).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from loraserve.bench.context import BenchContext
from loraserve.bench.stats import RunResult, median
from loraserve.bench.workloads import PATTERNS, popularity, round_robin
from loraserve.server.engine.compute_threads import in_passing_thread

if TYPE_CHECKING:
    from loraserve.bench.baselines import PeftBaseline

log = logging.getLogger("bench")
POOL_TENANT = "bench"


def combine(samples: list[float], stat: str) -> float:
    return max(samples) if stat == "best" else median(samples)


def mode_entry(runs: list[RunResult], stat: str, distinct: int | None = None) -> dict:
    rates = [r.tokens_per_s for r in runs]
    value = combine(rates, stat)
    chosen = min(runs, key=lambda r: abs(r.tokens_per_s - value)) if runs else None
    entry: dict = {
        "tokens_per_s": value,
        "samples_tokens_per_s": rates,
        "cpu_util": chosen.cpu_util if chosen else None,
        "samples_cpu_util": [r.cpu_util for r in runs],
        "tokens": runs[-1].tokens if runs else 0,
        "requests": len(runs[-1].requests) if runs else 0,
        "errors": sum(r.errors for r in runs),
    }
    decode = [d for r in runs if (d := r.decode_tokens_per_s) is not None]
    if decode:
        entry["decode_tokens_per_s"] = combine(decode, stat)
    if distinct is not None:
        entry["distinct_adapters"] = distinct
    ttfts = [s for r in runs if (s := r.summary()["ttft_p50_s"]) is not None]
    if ttfts:
        entry["ttft_p50_s"] = median(ttfts)
    return entry


def _interleaved(
    modes: dict[str, Callable[[], RunResult]], repeats: int, warmup: bool = True
) -> dict[str, list[RunResult]]:
    """Runs every mode once untimed (warm-up), then `repeats` rounds of all modes in turn."""
    if warmup:
        for fn in modes.values():
            fn()
    runs: dict[str, list[RunResult]] = {m: [] for m in modes}
    for _ in range(repeats):
        for mode, fn in modes.items():
            runs[mode].append(fn())
            run = runs[mode][-1]
            cpu = f"  (cpu {run.cpu_util:.2f} cores)" if run.cpu_util is not None else ""
            dec = run.decode_tokens_per_s
            decode = f"  decode {dec:.1f} tokens/s" if dec is not None else ""
            log.info("  %-22s %8.1f tokens/s%s%s", mode, run.tokens_per_s, decode, cpu)
    return runs


def pool_assignments(ctx: BenchContext) -> dict[str, list[str | None]]:
    """Adapter name of each batch request under base and Punica's four patterns."""
    s = ctx.settings
    names = ctx.tenant_with(POOL_TENANT, s.adapters)
    rng = np.random.default_rng(s.seed)
    out: dict[str, list[str | None]] = {"base": [None] * s.batch}
    for pattern in PATTERNS:
        idx = popularity(pattern, s.batch, s.adapters, rng, s.skew_alpha)
        out[f"loraserve-{pattern}"] = [names[i] for i in idx]
    return out


def run_loraserve_modes(ctx: BenchContext) -> dict:
    """base + the four patterns + the distinct-count sweep, interleaved."""
    s = ctx.settings
    engine = ctx.engine
    assignments = pool_assignments(ctx)
    names = ctx.tenant_with(POOL_TENANT, s.adapters)
    # A sweep point equal to a pattern's requests (1 = identical, batch = distinct) reuses it.
    same_as: dict[int, str] = {}
    sweep: dict[str, list[str | None]] = {}
    for k in s.distinct_sweep:
        adapters = [names[i] for i in round_robin(s.batch, k)]
        twin = next((m for m, a in assignments.items() if a == adapters), None)
        if twin is None:
            sweep[f"distinct-{k}"] = adapters
        same_as[k] = twin or f"distinct-{k}"
    every = {**assignments, **sweep}
    modes = {
        mode: (lambda a=adapters: engine.run(ctx.batch_requests(a, POOL_TENANT)))
        for mode, adapters in every.items()
    }
    log.info("loraserve batch modes (%d requests each)", s.batch)
    runs = _interleaved(modes, s.repeats)
    result = {
        mode: mode_entry(runs[mode], s.stat, len({a for a in every[mode] if a}))
        for mode in assignments
    }
    result_sweep = {str(k): mode_entry(runs[same_as[k]], s.stat, k) for k in s.distinct_sweep}
    return {"modes": result, "distinct_sweep": result_sweep}


def run_peft_baselines(ctx: BenchContext, *, mixed: bool, naive: bool) -> dict:
    """peft-mixed and/or naive-swap on the distinct pattern's requests.

    On a passing thread: the baselines use every CPU thread, and the OpenMP pool that opens
    must not outlive them beside the engine thread (server.engine.compute_threads).
    """
    return in_passing_thread(
        lambda: _peft_baselines(ctx, mixed=mixed, naive=naive), name="bench-peft"
    )


def peft_baseline(ctx: BenchContext, adapters: list[str | None]) -> PeftBaseline:
    """HF PEFT with the pool adapters that `adapters` (one per request) name loaded."""
    from loraserve.bench.baselines import PeftBaseline

    s = ctx.settings
    dirs = {f"a{i:04d}": d for i, d in enumerate(ctx.adapter_dirs(s.adapters))}
    used = sorted({a for a in adapters if a})
    return PeftBaseline(ctx.model_dir, {n: dirs[n] for n in used}, device=s.device, dtype=s.dtype)


def _peft_baselines(ctx: BenchContext, *, mixed: bool, naive: bool) -> dict:
    s = ctx.settings
    adapters = pool_assignments(ctx)["loraserve-distinct"]
    used = sorted({a for a in adapters if a})
    with ctx.timed("load_peft_s"):
        baseline = peft_baseline(ctx, adapters)
    prompts = [r.prompt_ids for r in ctx.batch_requests(adapters)]
    out: dict = {}
    if mixed:
        log.info("peft-mixed (%d requests in one generate)", s.batch)
        runs = _interleaved(
            {"peft-mixed": lambda: baseline.mixed(prompts, adapters, s.output_len)}, s.repeats
        )
        out["peft-mixed"] = mode_entry(runs["peft-mixed"], s.stat, len(used))
    if naive:
        log.info("naive-swap (%d requests one at a time)", s.batch)
        baseline.naive_swap(prompts[:2], adapters[:2], s.output_len)  # warm-up
        runs = _interleaved(
            {"naive-swap": lambda: baseline.naive_swap(prompts, adapters, s.output_len)},
            s.naive_repeats,
            warmup=False,
        )
        out["naive-swap"] = mode_entry(runs["naive-swap"], s.stat, len(used))
    return out
