"""Do cold adapter loads slow the running rows down? (run by hand, not a test)

`batch` base-model requests decode; once they are decoding, `joiners` requests on adapters join
them. In "warm" rounds those adapters are already in device pages; in "cold" rounds they were
just registered and are only in the store, so each needs a read, checksum, validation and copy to
the device first. The joiners' own compute is the same in both, so the difference in the base
rows' time per output token (TPOT, whole run) and in their longest gap between two tokens (a load
on the engine thread shows up as one long stall) is what the loads cost everyone else. The
issue's target is a TPOT ratio within 1.10. Rounds alternate warm, cold, warm, cold...

Each round also says where the engine thread's time went (decode steps, how many ran eagerly
and their mean time; prefill steps; adapter commits; the rest), so a cold round that is slower
shows whether the steps themselves slowed (contention for the GIL, the driver, the cores),
more prefills ran (joiners arriving one by one) or the commits cost the time. Each thread's
CPU time in the round (Linux) goes beside it: the engine thread's CPU per decode step against
the step's wall time tells a thread that waited (same CPU, longer step: the GIL or the device)
from one that did more work (more CPU).
`--gil-switch-interval` sets Python's thread switch interval for the run: on an H200 the cold
rounds' decode steps took 6.7-8.2 ms against 2.1-2.7 ms warm, and the GIL shared with the loader
thread is the suspect; running both values in one session measures it.

    python -m loraserve.bench.cold_overlap --size tiny --device cpu --batch 8 --joiners 8
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path

from loraserve.bench.adapter_factory import AdapterFactory, LoraShape
from loraserve.bench.engine_runner import EngineBench, EngineLimits
from loraserve.bench.models import SIZES, bench_model_path, default_cache_dir
from loraserve.bench.report import command_result
from loraserve.bench.stats import median
from loraserve.server.engine.compute_threads import torch_ops_serially
from loraserve.server.thread_cpu import thread_cpu_seconds

log = logging.getLogger("bench")
TENANT = "bench"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=8, help="running base-model requests")
    parser.add_argument("--joiners", type=int, default=8, help="adapter requests joining them")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64, help="tokens per base request")
    parser.add_argument("--rounds", type=int, default=3, help="warm/cold pairs")
    parser.add_argument(
        "--gil-switch-interval",
        type=float,
        default=None,
        help="sys.setswitchinterval in seconds for the run (Python's default is 0.005): how "
        "long the engine thread may wait for the GIL while the loader thread runs Python",
    )
    parser.add_argument(
        "--engine-opt",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a ServerConfig field for the engine (e.g. cold_join_hold_seconds=0)",
    )
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def _engine_counters(bench: EngineBench) -> dict[str, float]:
    """The engine thread's running totals and every thread's CPU seconds (`cpu_s:<thread>`,
    Linux); a round reports their growth."""
    scheduler = bench.engine.scheduler
    pool = bench.engine.device_pool
    return {
        **{f"cpu_s:{thread}": s for thread, s in thread_cpu_seconds().items()},
        "decode_steps": scheduler.decode_steps,
        "decode_s": scheduler.decode_seconds,
        "graph_steps": getattr(scheduler.executor, "graph_steps", 0),
        "prefill_steps": scheduler.prefill_steps,
        "prefill_s": scheduler.prefill_seconds,
        "commits": pool.commits,
        "commit_s": pool.commit_seconds,
    }


def _where_time_went(before: dict[str, float], after: dict[str, float], wall: float) -> dict:
    """What the engine thread did in one round: decode steps (how many replayed a graph) and
    their mean time, prefill steps and their total, adapter commits and their host time, and
    the rest of the round's wall time (scheduling, idle, waiting for the GIL)."""
    grown = {k: after[k] - before.get(k, 0.0) for k in after}
    steps = grown["decode_steps"]
    return {
        # Engine-thread CPU per decode step beside the step's wall time: the same CPU in a
        # slower step means the thread waited (for the GIL or the device), more CPU means it
        # did more work.
        "engine_cpu_per_decode_step_s": (
            grown.get("cpu_s:loraserve-engine", float("nan")) / steps if steps else float("nan")
        ),
        "thread_cpu_s": {k.removeprefix("cpu_s:"): v for k, v in grown.items() if "cpu_s:" in k},
        "wall_s": wall,
        "decode_steps": int(steps),
        "eager_decode_steps": int(steps - grown["graph_steps"]),
        "decode_step_mean_s": grown["decode_s"] / steps if steps else float("nan"),
        "prefill_steps": int(grown["prefill_steps"]),
        "prefill_s": grown["prefill_s"],
        "commits": int(grown["commits"]),
        "commit_s": grown["commit_s"],
        "other_s": wall - grown["decode_s"] - grown["prefill_s"] - grown["commit_s"],
    }


def _round(bench: EngineBench, args: argparse.Namespace, names: list[str]) -> dict:
    """One round: base rows decode; `names` join once the rows are decoding."""
    from loraserve.server.engine.engine import SamplingOverrides
    from loraserve.server.engine.types import AdapterRef, FinishEvent, TokenEvent

    engine = bench.engine
    prompt = [(7 * i) % 500 + 3 for i in range(args.prompt_len)]
    times: list[list[float]] = [[] for _ in range(args.batch)]
    first_join: list[float] = []
    lock = threading.Lock()
    done = threading.Semaphore(0)
    decoding = threading.Event()

    def base_sink(index: int):
        def sink(event: object) -> None:
            if isinstance(event, TokenEvent | FinishEvent):
                times[index].append(time.perf_counter())
                if len(times[index]) == 3:
                    decoding.set()
            if not isinstance(event, TokenEvent):
                done.release()

        return sink

    def joiner_sink(event: object) -> None:
        if isinstance(event, TokenEvent | FinishEvent):
            with lock:
                if not first_join:
                    first_join.append(time.perf_counter())
        if not isinstance(event, TokenEvent):
            done.release()

    def sampling(tokens: int):
        return engine.sampling(
            SamplingOverrides(max_new_tokens=tokens, temperature=0.0, ignore_eos=True)
        )

    before, started = _engine_counters(bench), time.perf_counter()
    for index in range(args.batch):
        engine.submit(
            tenant=TENANT,
            adapter=None,
            prompt_ids=prompt,
            sampling=sampling(args.output_len),
            sink=base_sink(index),
        )
    if not decoding.wait(600):
        raise TimeoutError("the base rows never started decoding")
    arrived = time.perf_counter()
    for name in names:
        engine.submit(
            tenant=TENANT,
            adapter=AdapterRef(TENANT, name),
            prompt_ids=prompt,
            sampling=sampling(4),
            sink=joiner_sink,
        )
    for _ in range(args.batch + len(names)):
        if not done.acquire(timeout=600):
            raise TimeoutError("a request did not finish")
    breakdown = _where_time_went(before, _engine_counters(bench), time.perf_counter() - started)
    tpot = [(row[-1] - row[1]) / (len(row) - 2) for row in times if len(row) > 2]
    gaps = [b - a for row in times for a, b in itertools.pairwise(row[1:]) if b > arrived]
    return {
        "base_tpot_s": median(tpot),
        "max_gap_after_arrival_s": max(gaps) if gaps else float("nan"),
        "first_join_after_s": (first_join[0] - arrived) if first_join else float("nan"),
        "engine": breakdown,
    }


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.gil_switch_interval is not None:
        sys.setswitchinterval(args.gil_switch_interval)
    # Orchestration only: no OpenMP pool of this thread's beside the engine's (compute_threads).
    with torch_ops_serially():
        _main(args)


def _main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cache = default_cache_dir()
    storage = "float32" if args.dtype == "float32" else "bfloat16"
    model_dir = bench_model_path(args.size, seed=0, storage_dtype=storage, cache_dir=cache)
    count = args.joiners * (args.rounds + 1)
    with tempfile.TemporaryDirectory() as scratch:
        factory = AdapterFactory(model_dir, LoraShape(rank=args.rank, alpha=2.0 * args.rank))
        dirs = factory.ensure(Path(scratch) / "adapters", count)
        bench = EngineBench(
            model_dir,
            Path(scratch) / "data",
            device=args.device,
            dtype=args.dtype,
            limits=EngineLimits(
                max_batch_size=args.batch + args.joiners,
                device_adapters=count,
                max_rank=args.rank,
                max_new_tokens=max(args.output_len, 8),
                extra=tuple(tuple(opt.split("=", 1)) for opt in args.engine_opt),  # type: ignore[arg-type]
            ),
        )
        try:
            for index, directory in enumerate(dirs):
                bench.register(TENANT, f"a{index:04d}", directory)
            warm_names = [f"a{i:04d}" for i in range(args.joiners)]
            _round(bench, args, warm_names)  # warms the code paths and loads the warm set
            rounds: list[dict] = []
            for r in range(args.rounds):
                first = (r + 1) * args.joiners
                names = [f"a{i:04d}" for i in range(first, first + args.joiners)]
                warm = _round(bench, args, warm_names)
                cold = _round(bench, args, names)
                rounds.append({"warm": warm, "cold": cold})
                log.info(
                    "round %d: base TPOT %.2f ms with warm joiners, %.2f ms with cold (%.3fx); "
                    "longest base gap %.1f / %.1f ms; first join after %.1f / %.1f ms",
                    r,
                    warm["base_tpot_s"] * 1e3,
                    cold["base_tpot_s"] * 1e3,
                    cold["base_tpot_s"] / warm["base_tpot_s"],
                    warm["max_gap_after_arrival_s"] * 1e3,
                    cold["max_gap_after_arrival_s"] * 1e3,
                    warm["first_join_after_s"] * 1e3,
                    cold["first_join_after_s"] * 1e3,
                )
                for mode, measured in (("warm", warm), ("cold", cold)):
                    e = measured["engine"]
                    log.info(
                        "  %s: %d decode steps (%d eager), %.2f ms each (engine-thread CPU "
                        "%.2f ms per step); %d prefills, %.1f ms; %d commits, %.1f ms; other "
                        "%.1f ms of %.1f ms; thread CPU ms: %s",
                        mode,
                        e["decode_steps"],
                        e["eager_decode_steps"],
                        e["decode_step_mean_s"] * 1e3,
                        e["engine_cpu_per_decode_step_s"] * 1e3,
                        e["prefill_steps"],
                        e["prefill_s"] * 1e3,
                        e["commits"],
                        e["commit_s"] * 1e3,
                        e["other_s"] * 1e3,
                        e["wall_s"] * 1e3,
                        ", ".join(
                            f"{thread} {cpu * 1e3:.0f}"
                            for thread, cpu in sorted(e["thread_cpu_s"].items())
                            if cpu > 0
                        ),
                    )
        finally:
            bench.close()

    def med(mode: str, field: str) -> float:
        return median([r[mode][field] for r in rounds])

    result = command_result(
        args,
        device=bench.device,
        base_tpot_warm_s=med("warm", "base_tpot_s"),
        base_tpot_cold_s=med("cold", "base_tpot_s"),
        tpot_cold_over_warm=med("cold", "base_tpot_s") / med("warm", "base_tpot_s"),
        max_gap_warm_s=med("warm", "max_gap_after_arrival_s"),
        max_gap_cold_s=med("cold", "max_gap_after_arrival_s"),
        first_join_warm_s=med("warm", "first_join_after_s"),
        first_join_cold_s=med("cold", "first_join_after_s"),
        decode_step_warm_s=median([r["warm"]["engine"]["decode_step_mean_s"] for r in rounds]),
        decode_step_cold_s=median([r["cold"]["engine"]["decode_step_mean_s"] for r in rounds]),
        rounds=rounds,
    )
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))


if __name__ == "__main__":
    main()
