"""The engine thread's host work per decode step, with the model's forwards stubbed (run by hand).

On a GPU the decode step's kernels run in a captured graph while the engine thread plans the
next step, fills its input buffers, samples, reads the previous step's tokens, detokenizes and
emits events. When that host work takes longer than the graph, the device waits for Python;
through gRPC the event loop's work shares the same GIL, so every microsecond here counts twice.
This runs the real engine (scheduler, planner, executor, detokenizer, event sinks) with the
prefill and decode forwards replaced by fixed logits, so what is timed is the host work alone,
on any machine: wall microseconds per decode step and the engine thread's CPU per step.

    python -m loraserve.bench.host_step --batch 32 --tokens 256 --modes base,distinct
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from loraserve.bench.adapter_factory import AdapterFactory, LoraShape
from loraserve.bench.engine_runner import BenchRequest, EngineBench, EngineLimits
from loraserve.bench.models import bench_model_path
from loraserve.bench.report import command_result
from loraserve.bench.stub_device import MODES, StubbedForwards, parse_modes
from loraserve.server.metrics import Metrics
from loraserve.server.thread_cpu import thread_cpu_seconds

ENGINE_THREAD = "loraserve-engine"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="concurrent requests")
    parser.add_argument("--tokens", type=int, default=256, help="new tokens per request")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens per request")
    parser.add_argument("--adapters", type=int, default=16, help="distinct: adapters in turn")
    parser.add_argument("--modes", default=",".join(MODES), help=f"some of {','.join(MODES)}")
    parser.add_argument(
        "--vocab",
        type=int,
        default=1024,
        help="the stub logits' width: sampling runs on the device on a GPU, so a narrow "
        "width keeps its CPU cost here from swamping the host work being measured",
    )
    parser.add_argument(
        "--no-metrics",
        dest="metrics",
        action="store_false",
        help="no observer (default: the server's Metrics, which observes every row's token)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def _requests(args: argparse.Namespace, mode: str) -> list[BenchRequest]:
    prompt = tuple(range(3, 3 + args.prompt))
    return [
        BenchRequest(prompt, args.tokens, None if mode == "base" else f"a{i % args.adapters}")
        for i in range(args.batch)
    ]


def measure(bench: EngineBench, stub: StubbedForwards, args: argparse.Namespace, mode: str) -> dict:
    """Best-of-`repeats` wall and engine-thread CPU microseconds per decode step."""
    scheduler = bench.engine.scheduler
    bench.run(_requests(args, mode))  # warm: adapters resident, caches filled
    walls, cpus = [], []
    for _ in range(args.repeats):
        steps0, stubbed0 = scheduler.decode_steps, stub.decodes
        cpu0 = thread_cpu_seconds().get(ENGINE_THREAD, 0.0)
        started = time.perf_counter()
        bench.run(_requests(args, mode))
        wall = time.perf_counter() - started
        steps = scheduler.decode_steps - steps0
        if steps <= 0 or stub.decodes - stubbed0 != steps:
            raise RuntimeError(
                f"{mode}: {steps} decode steps, {stub.decodes - stubbed0} through the stub; "
                "the executor's forwards were not all replaced"
            )
        walls.append(wall / steps * 1e6)
        cpus.append((thread_cpu_seconds().get(ENGINE_THREAD, 0.0) - cpu0) / steps * 1e6)
    return {"mode": mode, "wall_us_per_step": min(walls), "cpu_us_per_step": min(cpus)}


def _run(args: argparse.Namespace, modes: list[str], scratch: Path) -> list[dict]:
    model_dir = bench_model_path("tiny", seed=0, storage_dtype="float32", cache_dir=scratch)
    limits = EngineLimits(
        max_batch_size=args.batch,
        device_adapters=args.adapters,
        max_new_tokens=max(args.tokens, 1),
    )
    observer = Metrics() if args.metrics else None
    bench = EngineBench(model_dir, scratch / "data", limits=limits, observer=observer)
    try:
        if "distinct" in modes:
            factory = AdapterFactory(model_dir, LoraShape(rank=16))
            for i, adapter_dir in enumerate(factory.ensure(scratch / "ad", args.adapters)):
                bench.register("bench", f"a{i}", adapter_dir)
        vocab = min(args.vocab, bench.loaded.model.config.vocab_size)
        stub = StubbedForwards(bench.engine, vocab, args.batch)
        return [measure(bench, stub, args, mode) for mode in modes]
    finally:
        bench.close()


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    modes = parse_modes(args.modes)
    with tempfile.TemporaryDirectory(prefix="loraserve-host-step-") as scratch:
        results = _run(args, modes, Path(scratch))
    observed = "the server's metrics" if args.metrics else "no observer"
    print(
        f"host work per decode step, forwards stubbed (batch {args.batch}, {observed}, "
        f"best of {args.repeats})"
    )
    for r in results:
        print(
            f"  {r['mode']:<9} wall {r['wall_us_per_step']:7.1f} us   "
            f"engine thread CPU {r['cpu_us_per_step']:7.1f} us"
        )
    return command_result(args, results=results)


if __name__ == "__main__":
    main()
