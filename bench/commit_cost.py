"""What committing one cold adapter costs the engine thread (run by hand, not a test).

A cold load ends on the engine thread, between two forwards: the staged pages are copied into
every target layer's page stacks (`DevicePool._commit_locked`), so every running row waits for
it. The device copies are queued, not waited for; what the rows wait for is the host: the
launches (one multi-tensor copy per dtype into consecutive pages, else a copy per factor of
each fused group) and the bookkeeping of every group. When the device tier is full the commit
first evicts the least recently used adapter on the same thread (its pages zeroed only where
the new adapter will not overwrite them: here, where every adapter has the same targets and
takes its victim's pages, nowhere). This times both, with room and with an eviction per commit,
for a bench size's layer count with q/k/v/o adapters, on narrow layers (hidden 64) so that on
CPU the copies themselves cost next to nothing and the host's share is what is measured;
`--device cuda` measures the real launches.

    python -m loraserve.bench.commit_cost --size 1b
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import torch
from transformers import LlamaConfig

from loraserve.adapters.config import LoraAdapterConfig
from loraserve.adapters.weights import AdapterWeights
from loraserve.bench.models import SIZES
from loraserve.server.engine.cold_loader import stage
from loraserve.server.engine.device_pool import DevicePool
from loraserve.server.engine.llama import Attention, LlamaShape
from loraserve.server.engine.lora import LiveIndex, LoRAContext, MultiLoRALinear
from loraserve.server.engine.types import AdapterKey

log = logging.getLogger("bench")
WIDTH = 64
"""Hidden size of the narrow layers: the op count of the size's layers, not their bytes."""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b", help="layer count")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--page-rank", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=200, help="commits; half evict one")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def _layers(layer_count: int, device: torch.device) -> dict[str, MultiLoRALinear]:
    """The own Llama forward's attention projections (q/k/v fused, o alone) per layer."""
    config = LlamaConfig(
        hidden_size=WIDTH,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=layer_count,
        vocab_size=128,
    )
    shape = LlamaShape.from_config(config)
    context, index = LoRAContext(), LiveIndex()
    layers: dict[str, MultiLoRALinear] = {}
    for i in range(layer_count):
        attn = Attention(shape, context, index).to(device)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            layers[f"model.layers.{i}.self_attn.{name}"] = getattr(attn, name)
    return layers


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    layers = _layers(SIZES[args.size].num_layers, device)

    def weights(version: int) -> AdapterWeights:
        gen = torch.Generator().manual_seed(version)
        modules = {
            name: (
                torch.randn(args.rank, layer.in_features, generator=gen),  # (r, d_in)
                torch.randn(layer.out_features, args.rank, generator=gen),  # (d_out, r)
            )
            for name, layer in layers.items()
        }
        config = LoraAdapterConfig(
            rank=args.rank, alpha=2.0 * args.rank, use_rslora=False, target_modules=[], raw={}
        )
        return AdapterWeights(config=config, modules=modules)

    pages_per_adapter = -(-args.rank // args.page_rank)
    page_bytes = sum(layer.page_bytes(args.page_rank, 4) for layer in layers.values())
    pool = DevicePool(
        layers,
        budget_bytes=(args.adapters // 2 + 2) * pages_per_adapter * page_bytes,
        loader=lambda key: weights(key.version),
        page_rank=args.page_rank,
    )
    groups = {id(layer.group): layer.group for layer in layers.values() if layer.group}
    for group in groups.values():
        group.reserve(pool.num_pages, args.page_rank)  # as on CUDA: fixed stacks, no growth
    keys = [AdapterKey("bench", "a", v, rank=args.rank) for v in range(1, args.adapters + 1)]
    staged = [stage(k, weights(k.version), pool._layout, None, time.monotonic()) for k in keys]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with_room: list[float] = []
    evicting: list[float] = []
    for item in staged:  # the second half finds the tier full: one eviction per commit
        full = len(pool._free) < pool.pages_for(item.rank)
        started = time.perf_counter()
        with pool._lock:
            pool._commit_locked(item, pins=0)
        (evicting if full else with_room).append(time.perf_counter() - started)
    result: dict[str, object] = {
        "size": args.size,
        "layers": len(layers) // 4,
        "modules": len(layers),
        "device": str(device),
    }
    for label, seconds in (("with_room", with_room), ("evicting", evicting)):
        timed = seconds[len(seconds) // 10 :]  # past the first calls' warm-up
        if not timed:
            continue
        result[label] = {
            "commits": len(timed),
            "median_us": statistics.median(timed) * 1e6,
            "best_us": min(timed) * 1e6,
        }
        log.info(
            "commit of one q/k/v/o adapter into %d layers' page groups (%s), %s: %.0f us "
            "median, %.0f us best, over %d commits",
            result["layers"],
            device,
            label.replace("_", " "),
            statistics.median(timed) * 1e6,
            min(timed) * 1e6,
            len(timed),
        )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
