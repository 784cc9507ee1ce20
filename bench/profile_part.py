"""`--profile`: where the time goes in loraserve-distinct, base, and naive-swap.

Runs each once more under bench.sampler.StackSampler (the engine thread for loraserve, this
thread for naive-swap) and writes the reports to <out>/profile.txt.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from loraserve.bench.batch_modes import POOL_TENANT, peft_baseline, pool_assignments
from loraserve.bench.context import BenchContext
from loraserve.bench.sampler import StackSampler
from loraserve.server.engine.compute_threads import in_passing_thread

log = logging.getLogger("bench")


def run_profile(ctx: BenchContext, path: Path) -> Path:
    s = ctx.settings
    engine = ctx.engine
    assignments = pool_assignments(ctx)
    reports = []
    for mode in ("loraserve-distinct", "base"):
        requests = ctx.batch_requests(assignments[mode], POOL_TENANT)
        engine.run(requests)  # warm
        with StackSampler(thread_prefix="loraserve-engine") as sampler:
            result = engine.run(requests)
        reports.append(sampler.report(f"{mode}: {result.tokens_per_s:.1f} tokens/s"))
    if "naive" in s.only or "peft" in s.only:
        # On a passing thread, as the baselines run (compute_threads); sampled there.
        reports.append(in_passing_thread(lambda: _profile_naive(ctx), name="bench-peft"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(reports) + "\n")
    log.info("profile written to %s", path)
    return path


def _profile_naive(ctx: BenchContext) -> str:
    s = ctx.settings
    adapters = pool_assignments(ctx)["loraserve-distinct"]
    baseline = peft_baseline(ctx, adapters)
    prompts = [r.prompt_ids for r in ctx.batch_requests(adapters)][:4]
    baseline.naive_swap(prompts[:1], adapters[:1], s.output_len)  # warm
    with StackSampler(ident=threading.get_ident()) as sampler:
        result = baseline.naive_swap(prompts, adapters[:4], s.output_len)
    return sampler.report(f"naive-swap (4 requests): {result.tokens_per_s:.1f} tokens/s")
