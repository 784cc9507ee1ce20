"""Adapter cold start: time to first token when the adapter is only in the store, vs warm.

Each sample registers a fresh adapter (never loaded), asks the OS to drop its files from the page
cache (best effort, posix_fadvise DONTNEED, so "on disk" means disk where the kernel agrees), and
sends one request alone: cold TTFT. The same request again finds the adapter in device pages:
warm TTFT. A base-model request alone gives the floor. Medians over the samples.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from loraserve.bench.context import BenchContext
from loraserve.bench.engine_runner import BenchRequest
from loraserve.bench.stats import median

log = logging.getLogger("bench")
COLD_TENANT = "cold"
COLD_OUTPUT_TOKENS = 4


def drop_page_cache(directory: Path) -> bool:
    """Asks the kernel to forget the cached pages of every file in `directory`."""
    if not hasattr(os, "posix_fadvise"):
        return False
    dropped = True
    for path in Path(directory).iterdir():
        if not path.is_file():
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except OSError:
            dropped = False
    return dropped


def run_cold_start(ctx: BenchContext) -> dict:
    s = ctx.settings
    engine = ctx.engine
    dirs = ctx.adapter_dirs(s.cold_samples)
    prompt = ctx.prompt(s.prompt_len, 0)

    def one(adapter: str | None) -> float:
        request = BenchRequest(prompt, COLD_OUTPUT_TOKENS, adapter, COLD_TENANT)
        result = engine.run([request]).requests[0]
        if result.error:
            raise RuntimeError(f"cold-start request failed: {result.error}")
        return result.ttft_s

    one(None)  # warm the model's code paths
    cold, warm, base = [], [], []
    dropped = True
    log.info("cold start (%d samples)", s.cold_samples)
    for index, directory in enumerate(dirs):
        name = f"cold{index:03d}"
        engine.register(COLD_TENANT, name, directory)
        record = engine.service.get(COLD_TENANT, name)
        dropped = drop_page_cache(record.path) and dropped
        cold.append(one(name))
        warm.append(one(name))
        base.append(one(None))
        log.info("  cold %.4fs  warm %.4fs  base %.4fs", cold[-1], warm[-1], base[-1])
    cold_s, warm_s = median(cold), median(warm)
    return {
        "samples": s.cold_samples,
        "prompt_tokens": s.prompt_len,
        "page_cache_dropped": dropped,
        "cold_ttft_s": cold_s,
        "warm_ttft_s": warm_s,
        "base_ttft_s": median(base),
        "added_ttft_s": cold_s - warm_s,
        "cold_over_warm": cold_s / warm_s if warm_s > 0 else None,
        "cold_samples_s": cold,
        "warm_samples_s": warm,
    }
