"""Throughput versus the number of registered adapters (S-LoRA's "5 vs 2,000 adapters").

For each n, a tenant `n<n>` holds n adapters registered through AdapterService, and the same
number of requests (batch-mode prompt and output lengths) picks adapters with Zipf(alpha)
popularity over those n, all submitted at once. With more adapters than the device tier holds, the
engine must load adapters from the store while serving: that cost is what this measures. The
same requests on the base model (no adapter) run alongside, as the reference.
"""

from __future__ import annotations

import logging

import numpy as np

from loraserve.bench.batch_modes import _interleaved, mode_entry
from loraserve.bench.context import BenchContext
from loraserve.bench.workloads import popularity

log = logging.getLogger("bench")


def run_nsweep(ctx: BenchContext) -> dict:
    s = ctx.settings
    requests = {}
    for n in s.nsweep:
        names = ctx.tenant_with(f"n{n}", n)
        rng = np.random.default_rng(s.seed + n)
        idx = popularity("skewed", s.nsweep_requests, n, rng, s.nsweep_alpha)
        requests[n] = ctx.batch_requests([names[i] for i in idx], tenant=f"n{n}")
    engine = ctx.engine
    base_requests = ctx.batch_requests([None] * s.nsweep_requests)
    modes = {"base": lambda: engine.run(base_requests)}
    modes.update({f"n={n}": (lambda r=reqs: engine.run(r)) for n, reqs in requests.items()})
    log.info(
        "n-registered sweep (%d requests, zipf alpha %.2f): n = %s",
        s.nsweep_requests,
        s.nsweep_alpha,
        ", ".join(map(str, s.nsweep)),
    )
    runs = _interleaved(modes, s.repeats)
    out = {}
    for n, reqs in requests.items():
        entry = mode_entry(runs[f"n={n}"], s.stat, len({r.adapter for r in reqs}))
        entry["registered"] = n
        out[str(n)] = entry
    return {
        "alpha": s.nsweep_alpha,
        "requests": s.nsweep_requests,
        "base": mode_entry(runs["base"], s.stat, 0),
        "by_n": out,
    }
