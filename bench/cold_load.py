"""What one cold adapter load costs the host, without a model (run by hand, not a test).

A cold load reads the stored files, checks their sha256 against the upload's, validates the
tensors against the base model and lays them out as device pages (`AdapterService.load` with
`cold_loader.stage` beside its checksum, as the cold loader runs them). This times that path for
a bench model size's adapter shapes: the whole load, each part alone, and the load with its
checksum beside validation and staging (what the server does) against one with the checksum in
line, alternated in one run. The base model is described from
the size's shapes alone, so `--size 1b` needs no 1b checkpoint.

    python -m loraserve.bench.cold_load --size 1b --storage bfloat16 [--device cuda]

With `--device cuda` the pages go to the GPU as the server's do: laid out there from one upload
of the adapter as read (server.engine.device_layout), the host layout timed beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from pathlib import Path

import torch

from loraserve.adapters.spec import BaseModelSpec, TargetModule
from loraserve.adapters.store import AdapterStore
from loraserve.adapters.weights import AdapterWeights
from loraserve.bench.adapter_factory import DEFAULT_TARGETS, AdapterFactory, LoraShape
from loraserve.bench.adapter_factory import target_shapes as adapter_target_shapes
from loraserve.bench.engine_runner import upload_adapter_dir
from loraserve.bench.models import SIZES
from loraserve.bench.report import command_result
from loraserve.server.adapter_service import AdapterService, key_of
from loraserve.server.config import ServerConfig
from loraserve.server.engine.cold_loader import PageLayout, stage
from loraserve.server.engine.compute_threads import torch_ops_serially
from loraserve.server.engine.device_layout import DeviceLayouts
from loraserve.server.engine.types import AdapterKey

log = logging.getLogger("bench")
TENANT = "bench"


class _InLine:
    """An executor that runs the checksum on the calling thread (the comparison's baseline)."""

    def submit(self, work: Callable[[], None]) -> Future[None]:
        future: Future[None] = Future()
        try:
            future.set_result(work())
        except BaseException as exc:
            future.set_exception(exc)
        return future


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS))
    parser.add_argument("--storage", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--page-dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the pages go: on cuda they are laid out on the GPU (server.engine."
        "device_layout), and the host layout is timed beside it as `stage, host layout`",
    )
    parser.add_argument("--adapters", type=int, default=8, help="distinct adapters, loaded in turn")
    parser.add_argument("--rounds", type=int, default=3, help="alternated in-line/beside pairs")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def _model_dir(root: Path, size_name: str) -> Path:
    """A directory holding only config.json: all the adapter factory reads of a model."""
    size = SIZES[size_name]
    config = {
        "hidden_size": size.hidden_size,
        "num_attention_heads": size.num_heads,
        "num_key_value_heads": size.num_kv_heads,
        "intermediate_size": size.intermediate_size,
        "num_hidden_layers": size.num_layers,
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    return root


def _fused_groups(names: Iterable[str]) -> tuple[tuple[str, ...], ...]:
    """The Llama forward's fused groups among these module names: each layer's q/k/v and
    gate/up, where every member is present."""
    present = set(names)
    groups = []
    for name in present:
        for members in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            if name.endswith("." + members[0]):
                prefix = name[: -len(members[0])]
                group = tuple(prefix + member for member in members)
                if all(member in present for member in group):
                    groups.append(group)
    return tuple(sorted(groups))


def _best_and_median(seconds: list[float]) -> dict[str, float]:
    return {"best_ms": min(seconds) * 1e3, "median_ms": statistics.median(seconds) * 1e3}


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with torch_ops_serially(), tempfile.TemporaryDirectory() as scratch:
        return _main(args, Path(scratch))


def _main(args: argparse.Namespace, scratch: Path) -> dict:
    targets = tuple(args.targets.split(","))
    model_dir = _model_dir(scratch / "model", args.size)
    shapes = adapter_target_shapes(model_dir, targets)
    spec = BaseModelSpec(
        "llama", {n: TargetModule(n, d_in, d_out) for n, (d_in, d_out) in shapes.items()}
    )
    storage = torch.float32 if args.storage == "float32" else torch.bfloat16
    factory = AdapterFactory(model_dir, LoraShape(rank=args.rank, targets=targets), dtype=storage)
    config = ServerConfig(data_dir=scratch / "data", max_lora_rank=max(64, args.rank))
    service = AdapterService(config, AdapterStore(scratch / "data" / "adapters"), spec)
    records = [
        upload_adapter_dir(
            service, TENANT, f"a{i:03d}", factory.write(scratch / "peft" / f"a{i:03d}", i)
        )
        for i in range(args.adapters)
    ]
    keys = [key_of(record) for record in records]
    page_dtype = torch.float32 if args.page_dtype == "float32" else torch.bfloat16
    # The engine's default page rank, and its fused groups (q/k/v, gate/up of each layer); on
    # a GPU laid out there, as DevicePool does.
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    host_layout = PageLayout(8, page_dtype, device, groups=_fused_groups(shapes))
    layout = dataclasses.replace(host_layout, on_device=DeviceLayouts(device) if cuda else None)

    def staged_now(key: AdapterKey, weights: AdapterWeights, how: PageLayout) -> object:
        """Staged, the copy (or the layout on the device) finished."""
        staged = stage(key, weights, how, None, time.monotonic())
        if cuda:
            torch.cuda.synchronize()
        return staged

    def load(key: AdapterKey) -> float:
        """One cold load as the cold loader runs it: pages laid out beside the checksum."""
        started = time.perf_counter()
        staged: list[object] = []
        service.load(
            key, beside_checksum=lambda weights: staged.append(staged_now(key, weights, layout))
        )
        assert staged, "a read from disk stages beside the checksum"
        return time.perf_counter() - started

    for key in keys:
        load(key)  # warm the page cache and the code paths
    beside_pool = service._checksums
    timed: dict[str, list[float]] = {"in line": [], "beside": []}
    for _ in range(args.rounds):
        for mode, pool in (("in line", _InLine()), ("beside", beside_pool)):
            service._checksums = pool  # type: ignore[assignment]
            timed[mode].extend(load(key) for key in keys)
    service._checksums = beside_pool

    record = service.store.get_version(TENANT, keys[0].name, keys[0].version)
    files = service.store.read_unverified(record)
    # As the server's cold load validates: the factors kept in the file's dtype.
    weights = service.validate(files.config, files.weights, as_stored=True)
    parts: dict[str, Callable[[], object]] = {
        "read": lambda: service.store.read_unverified(record),
        "sha256": files.verify,
        # What a load runs: one job per 1 MiB piece, on the service's checksum threads.
        "sha256 pieces": lambda: [
            job.result() for job in [beside_pool.submit(j) for j in files.checksum_jobs()]
        ],
        "validate": lambda: service.validate(files.config, files.weights, as_stored=True),
        "stage": lambda: staged_now(keys[0], weights, layout),
    }
    if cuda:
        parts["stage, host layout"] = lambda: staged_now(keys[0], weights, host_layout)
    part_times: dict[str, dict[str, float]] = {}
    for name, work in parts.items():
        seconds = []
        for _ in range(5 * args.rounds):
            started = time.perf_counter()
            work()
            seconds.append(time.perf_counter() - started)
        part_times[name] = _best_and_median(seconds)

    result = command_result(
        args,
        adapter_file_bytes=len(files.weights),
        load_in_line=_best_and_median(timed["in line"]),
        load_beside=_best_and_median(timed["beside"]),
        beside_over_in_line=statistics.median(timed["beside"])
        / statistics.median(timed["in line"]),
        parts=part_times,
    )
    log.info(
        "%s rank-%d %s adapter, %.1f MB stored as %s: a cold load (read, checksum, validate, "
        "stage) %.1f ms with the checksum beside validation and staging, %.1f ms in line "
        "(medians; %.3fx)",
        args.size,
        args.rank,
        "/".join(t.removesuffix("_proj") for t in targets),
        len(files.weights) / 1e6,
        args.storage,
        result["load_beside"]["median_ms"],
        result["load_in_line"]["median_ms"],
        result["beside_over_in_line"],
    )
    for name, times in part_times.items():
        log.info("  %-18s %.2f ms (best %.2f)", name, times["median_ms"], times["best_ms"])
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
