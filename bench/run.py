"""`loraserve bench` / `python -m loraserve.bench.run`: every part of the benchmark in one run.

    python -m loraserve.bench.run --quick                       # a few minutes on 2 CPU cores
    python -m loraserve.bench.run --only distinct,peft,naive    # a subset of the parts
    python -m loraserve.bench.run --device cuda --dtype bfloat16 --size 1b --batch 32 --adapters 64

Writes bench/results/bench.json and bench/results/bench.png (see --out) and prints the table.
A part that fails is reported (and makes the exit code 1); the others still run.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from loraserve.bench.context import BenchContext
from loraserve.bench.report import format_table, with_ratios, write_json
from loraserve.bench.settings import BenchSettings, settings_from_args

log = logging.getLogger("bench")


def _meta(settings: BenchSettings, ctx: BenchContext) -> dict:
    import torch

    from loraserve.bench.models import SIZES

    size = SIZES[settings.size]
    meta = {k: v for k, v in asdict(settings).items() if k not in ("cache_dir", "work_dir")}
    meta.update(
        model=f"hidden {size.hidden_size} x {size.num_layers} layers, {size.num_heads} heads, "
        f"vocab {size.vocab_size}",
        torch=torch.__version__,
        python=platform.python_version(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        loadavg_end=_loadavg(),
    )
    if settings.device.startswith("cuda") and torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name(0)
    return meta


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: other processes on the machine skew every number."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_parts(ctx: BenchContext) -> dict:
    """Runs the selected parts in a fixed order; a failing part is recorded, not fatal."""
    from loraserve.bench.batch_modes import run_loraserve_modes, run_peft_baselines
    from loraserve.bench.cold_start import run_cold_start
    from loraserve.bench.grpc_load import run_grpc
    from loraserve.bench.nsweep import run_nsweep
    from loraserve.bench.trace_replay import run_trace

    only = set(ctx.settings.only)
    results: dict = {"batch": {"modes": {}, "distinct_sweep": {}}, "errors": {}}

    def attempt(part: str, fn) -> None:
        started = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # one broken part must not lose the others' numbers
            log.error("part %s failed:\n%s", part, traceback.format_exc())
            results["errors"][part] = f"{type(exc).__name__}: {exc}"
        ctx.timings[f"part_{part}_s"] = time.perf_counter() - started

    if "distinct" in only:

        def distinct() -> None:
            out = run_loraserve_modes(ctx)
            results["batch"]["modes"].update(out["modes"])
            results["batch"]["distinct_sweep"] = out["distinct_sweep"]

        attempt("distinct", distinct)
    if "peft" in only or "naive" in only:
        attempt(
            "peft" if "peft" in only else "naive",
            lambda: results["batch"]["modes"].update(
                run_peft_baselines(ctx, mixed="peft" in only, naive="naive" in only)
            ),
        )
    if "nsweep" in only:
        attempt("nsweep", lambda: results.update(nsweep=run_nsweep(ctx)))
    if "trace" in only:
        attempt("trace", lambda: results.update(trace=run_trace(ctx)))
    if "cold" in only:
        attempt("cold", lambda: results.update(cold_start=run_cold_start(ctx)))
    if ctx.settings.profile:
        from loraserve.bench.profile_part import run_profile

        attempt(
            "profile",
            lambda: results.update(
                profile=str(run_profile(ctx, ctx.settings.out_dir / "profile.txt"))
            ),
        )
    if "grpc" in only:
        ctx.close()  # free the in-process engine's memory and CPU before the server starts
        attempt("grpc", lambda: results.update(grpc=run_grpc(ctx)))
    if not results["batch"]["modes"]:
        del results["batch"]
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point of `loraserve bench`; returns the exit code (1 if any part failed)."""
    settings = settings_from_args(list(sys.argv[1:] if argv is None else argv))
    from loraserve.server.engine.compute_threads import torch_ops_serially

    # This thread only orchestrates: parallel torch work here would keep an OpenMP pool beside
    # the engine thread's and slow every decode step (server.engine.compute_threads); the
    # baselines and the model build run on passing threads instead.
    with torch_ops_serially():
        return _main(settings)


def _main(settings: BenchSettings) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("bench").setLevel(logging.INFO)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    loadavg_start = _loadavg()
    scratch = settings.work_dir or Path(tempfile.mkdtemp(prefix="loraserve-bench-"))
    ctx = BenchContext(settings=settings, work_dir=scratch)
    try:
        results = run_parts(ctx)
        meta = _meta(settings, ctx)
        meta.update(ctx.engine_info)
        ctx.close()
    finally:
        ctx.close()
        if settings.work_dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    meta["loadavg_start"] = loadavg_start
    meta["elapsed_s"] = time.perf_counter() - started
    meta["setup_s"] = dict(ctx.timings)
    results = with_ratios({"meta": meta, **results})
    out_dir = settings.out_dir
    json_path = write_json(results, out_dir / "bench.json")
    print()
    print(format_table(results))
    print(f"\nJSON: {json_path}")
    if settings.plot:
        from loraserve.bench.plot import plot_results

        try:
            png = plot_results(results, out_dir / "bench.png")
        except ImportError:
            print("plot: skipped, matplotlib is not installed (pip install -e '.[bench]')")
        else:
            if png:
                print(f"plot: {png}")
    print(f"elapsed: {meta['elapsed_s']:.0f} s")
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    raise SystemExit(main())
