"""Kernel-level GPU bench: the multi-LoRA kernels and a whole decode step, variants side by side.

`python -m loraserve.bench.kernels --size 1b --dtype bfloat16` (CUDA only) times, inside CUDA
graphs on one machine in one run:

- lora: each fused projection of the model (q/k/v, o, gate/up, down) at decode, batch rows
  each with its own rank-16 adapter (two pages), for the kernel variants `single-pass` (one
  program walks a row's whole d_in, every page read: the kernels before split-K) and `split-K`
  (d_in split across programs, dead pages skipped), plus `split-K, dead` (the group holds no
  adapter on those pages: an MLP group under q/k/v/o adapters) and the torch reference. Each
  projection is also timed whole, W0 x with the adapter term as the forward runs it: the
  shrink inline after the matmul, or on a side stream beside it (--lora-overlap);
- step: one whole decode step (forward + LM head) of the own Llama forward over paged KV, base
  rows against rows with distinct q/k/v/o adapters, per kernel variant and decode attention
  (sdpa, triton), with the shrinks beside the matmuls (--lora-overlap), and base rows with
  the torch norms, RoPE and SwiGLU (fused_ops off). The ratio adapter-step / base-step is what
  the engine's distinct/base decode ratio can reach at most;
- first_calls: the first and second eager prefill at shapes not seen before, per SDPA backend
  choice (a per-shape plan or compile stalls every running row);
- profile: one eager decode step under the profiler: kernels per step, their summed GPU time,
  and the costliest kernels by name, beside the step's time in a graph.

Every time is the median over repeated graph replays (CUDA events), in microseconds; the table
is printed last and written as JSON with --json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

from loraserve.bench.models import bench_model_path
from loraserve.server.engine import lora_kernels
from loraserve.server.engine.llama import (
    ATTENTION_KINDS,
    AdapterPath,
    LlamaForCausalLM,
    PagedKV,
    StepInputs,
    _project,
    load_llama,
)
from loraserve.server.engine.lora import LoRAContext, LoRAGroup, MultiLoRALinear
from loraserve.server.engine.side_stream import Beside, side_for

PAGE_RANK = 8
BLOCK_SIZE = 16


@dataclass(frozen=True)
class KernelBenchSettings:
    size: str = "1b"
    dtype: str = "bfloat16"
    batch: int = 32
    rank: int = 16
    adapters: int = 64
    context: int = 160
    """Tokens already in each row's KV (prompt 128 + half of 64 outputs)."""
    replays: int = 50
    calls_per_graph: int = 10


def time_graph(fn: Callable[[], object], settings: KernelBenchSettings) -> float:
    """Median microseconds of one fn() call: fn captured calls_per_graph times in one graph,
    replayed `replays` times, each replay timed with CUDA events."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()  # compile and warm up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(settings.calls_per_graph):
            fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(settings.replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / settings.calls_per_graph)
    return statistics.median(times)


STEP_VARIANTS: dict[str, dict] = {
    "single-pass": {"splits": 1, "live": False},
    "split-K": {},
    "split<=4, expand 256": {"max_splits": 4, "block_o": 256},
    "split<=2, expand 512": {"max_splits": 2, "block_o": 512},
    "no split, expand 512": {"max_splits": 1, "block_o": 512},
}
"""Kernel settings a whole decode step is timed with: {} is the engine's defaults; `live`:
False drops the groups' live flags (every non-zero page read); `splits` fixes the shrink's
split, `max_splits` caps the default's; `block_o` sets the expand's block."""


@contextlib.contextmanager
def kernel_variant(name: str, groups: list[LoRAGroup]) -> Iterator[None]:
    """Runs the model's adapter kernels with STEP_VARIANTS[name] for the duration."""
    spec = STEP_VARIANTS[name]
    saved = [g.live for g in groups]
    original, original_splits = lora_kernels.add_lora, lora_kernels.shrink_splits
    extra = {k: spec[k] for k in ("splits", "block_o") if k in spec}
    cap = spec.get("max_splits")

    def capped(tokens: int, slots: int, d_in: int) -> int:
        return min(original_splits(tokens, slots, d_in), cap)

    try:
        if spec.get("live") is False:
            for g in groups:
                g.live = None
        with contextlib.ExitStack() as stack:
            if extra:
                stack.enter_context(
                    mock.patch.object(
                        lora_kernels, "add_lora", lambda *a, **k: original(*a, **{**k, **extra})
                    )
                )
            if cap is not None:
                stack.enter_context(mock.patch.object(lora_kernels, "shrink_splits", capped))
            yield
    finally:
        for g, live in zip(groups, saved, strict=True):
            g.live = live


def _distinct_table(batch: int, pages_per_row: int, device: torch.device) -> torch.Tensor:
    rows = torch.arange(batch, device=device)[:, None] * pages_per_row  # (batch, 1)
    return rows + 1 + torch.arange(pages_per_row, device=device)  # (batch, n): pages from 1


def _bench_projection(
    d_in: int, outs: list[int], settings: KernelBenchSettings, dtype: torch.dtype, device
) -> dict:
    """One fused projection (members with out widths `outs`) at decode, every variant."""
    n = -(-settings.rank // PAGE_RANK)
    table = _distinct_table(settings.batch, n, device)  # (batch, n)
    members = [
        MultiLoRALinear(torch.nn.Linear(d_in, o, device=device, dtype=dtype), context=None)
        for o in outs
    ]
    group = LoRAGroup(members)
    group.reserve(settings.adapters * n, PAGE_RANK)
    assert group.a is not None and group.b is not None and group.live is not None
    group.a.normal_(std=0.02)
    group.b.normal_(std=0.02)
    group.a[0].zero_()
    group.b[0].zero_()
    x = torch.randn(settings.batch, d_in, device=device, dtype=dtype)  # (batch, d_in)
    y = torch.zeros(settings.batch, sum(outs), device=device, dtype=dtype)  # (batch, O)
    live = torch.ones_like(group.live)  # (pages,) every page but the zero page
    live[0] = 0
    dead = torch.zeros_like(group.live)  # (pages,) no page holds an adapter for this group
    a, b, seg = group.a, group.b, group.segment

    def kernels(
        flags: torch.Tensor | None, splits: int | None, block_o: int = lora_kernels.BLOCK_O
    ) -> Callable[[], None]:
        return lambda: lora_kernels.add_lora(
            y, x, a, b, seg, table, flags, splits=splits, block_o=block_o
        )

    auto = lora_kernels.shrink_splits(settings.batch, n * len(outs), d_in)
    # The whole projection, W0 x and the adapter term, as the forward runs it: the shrink
    # inline after the matmul, or beside it on a side stream (--lora-overlap).
    weight = torch.randn(sum(outs), d_in, device=device, dtype=dtype) * 0.02  # (O, d_in)
    x3 = x[:, None]  # (batch, 1, d_in)
    group.live = live

    def project(side: Beside | None) -> Callable[[], object]:
        path = AdapterPath(kernels=True, side=side)
        return lambda: _project(x3, weight, None, group, table, path)

    row: dict = {
        "single-pass": time_graph(kernels(None, 1), settings),
        "split-K": time_graph(kernels(live, None), settings),
        "split-K, dead": time_graph(kernels(dead, None), settings),
        "torch": time_graph(lambda: group.delta(x[:, None], table), settings),
        "W0 x alone": time_graph(lambda: torch.nn.functional.linear(x, weight), settings),
        "W0 x + adapter, inline": time_graph(project(None), settings),
        "W0 x + adapter, shrink beside": time_graph(project(side_for(device)), settings),
        "splits": auto,
    }
    # The sweep behind the defaults: (splits, expand block) -> µs, pages live.
    sweep = {}
    for splits in sorted({1, 2, 4, auto}):
        for block_o in (128, 256, 512):
            sweep[f"{splits}x{block_o}"] = time_graph(kernels(live, splits, block_o), settings)
    row["sweep"] = sweep
    return row


def bench_lora(settings: KernelBenchSettings, dtype: torch.dtype, device: torch.device) -> dict:
    from loraserve.bench.models import SIZES

    size = SIZES[settings.size]
    h, inter = size.hidden_size, size.intermediate_size
    kv = h // size.num_heads * size.num_kv_heads
    shapes = {"qkv": (h, [h, kv, kv]), "o": (h, [h]), "gate_up": (h, [inter, inter]),
              "down": (inter, [h])}  # fmt: skip
    return {
        name: _bench_projection(d_in, outs, settings, dtype, device)
        for name, (d_in, outs) in shapes.items()
    }


def _load_model(settings: KernelBenchSettings, dtype: torch.dtype, device: torch.device):
    from transformers import AutoConfig

    path = bench_model_path(
        settings.size, storage_dtype="float32" if dtype == torch.float32 else "bfloat16"
    )
    config = AutoConfig.from_pretrained(path)
    return load_llama(path, config, dtype, device, LoRAContext())


def _fill_attention_adapters(model: LlamaForCausalLM, settings: KernelBenchSettings) -> int:
    """Writes `adapters` random rank-r adapters on q/k/v/o through the members' page writes
    (which also set the groups' live flags); the MLP groups stay empty. Returns pages/row."""
    n = -(-settings.rank // PAGE_RANK)
    pages = settings.adapters * n
    for group in model.groups():
        group.reserve(pages, PAGE_RANK)
    torch.manual_seed(0)
    for layer in model.model.layers:
        attn = layer.self_attn
        for member in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            weight = member.base_layer.weight
            like = {"device": weight.device, "dtype": weight.dtype}
            a_pages = torch.randn(pages, PAGE_RANK, member.in_features, **like) * 0.02
            b_pages = torch.randn(pages, member.out_features, PAGE_RANK, **like) * 0.02
            member.write_pages(list(range(1, pages + 1)), pages, a_pages, b_pages)
    return n


@dataclass
class StepSetup:
    """One decode step of the bench model over paged KV, as the step part times it."""

    model: LlamaForCausalLM
    kv: PagedKV
    base: StepInputs
    distinct: StepInputs
    attention_only: StepInputs
    pages_per_row: int

    def forward(self, inputs: StepInputs) -> Callable[[], object]:
        return lambda: self.model.logits(self.model.forward(inputs, self.kv)[:, -1])


def _step_setup(
    settings: KernelBenchSettings, dtype: torch.dtype, device: torch.device
) -> StepSetup:
    model = _load_model(settings, dtype, device)
    model.lora_kernels = True
    model.fused_ops = True
    n = _fill_attention_adapters(model, settings)
    shape, batch = model.shape, settings.batch
    blocks = -(-(settings.context + 1) // BLOCK_SIZE)
    kv = PagedKV(shape, batch * blocks + 1, BLOCK_SIZE, dtype, device)
    kv.data.normal_(std=0.5)
    block_tables = 1 + torch.arange(batch * blocks, device=device).view(batch, blocks)
    step = StepInputs(
        input_ids=torch.randint(0, shape.vocab, (batch, 1), device=device),
        positions=torch.full((batch, 1), settings.context, device=device),
        block_tables=block_tables,  # (batch, blocks)
        valid=torch.ones(batch, 1, dtype=torch.bool, device=device),
        page_table=None,
    )
    with_adapters = StepInputs(**{**step.__dict__, "page_table": _distinct_table(batch, n, device)})
    attention_only = StepInputs(**{**with_adapters.__dict__, "lora_kinds": ATTENTION_KINDS})
    return StepSetup(model, kv, step, with_adapters, attention_only, n)


def bench_step(settings: KernelBenchSettings, dtype: torch.dtype, device: torch.device) -> dict:
    setup = _step_setup(settings, dtype, device)
    model, forward = setup.model, setup.forward
    step, with_adapters, attention_only = setup.base, setup.distinct, setup.attention_only

    out: dict = {}
    with torch.inference_mode():
        # The variants must compute the same step: their logits, relative to the reference's.
        ref = forward(with_adapters)()
        with kernel_variant("single-pass", model.groups()):
            single = forward(with_adapters)()
        out["single-pass vs split-K, max relative difference"] = (
            (single - ref).abs().max() / ref.abs().max()
        ).item()
        for attention in ("sdpa", "triton"):
            model.paged_attention = attention == "triton"
            row = {"base": time_graph(forward(step), settings)}
            model.fused_ops = False  # the torch norms, RoPE and SwiGLU, as before fused_ops
            row["base, unfused"] = time_graph(forward(step), settings)
            model.fused_ops = True
            for variant in STEP_VARIANTS:
                with kernel_variant(variant, model.groups()):
                    row[f"distinct, {variant}"] = time_graph(forward(with_adapters), settings)
            # What the engine runs for q/k/v/o adapters: the MLP kinds left out of the step.
            row["distinct, attention kinds only"] = time_graph(forward(attention_only), settings)
            model.lora_side = side_for(device)  # --lora-overlap
            row["distinct, attention kinds only, shrinks beside"] = time_graph(
                forward(attention_only), settings
            )
            row["distinct, shrinks beside"] = time_graph(forward(with_adapters), settings)
            model.lora_side = None
            out[attention] = row
    return out


def profile_step(settings: KernelBenchSettings, dtype: torch.dtype, device: torch.device) -> dict:
    """Where one eager decode step's GPU time goes: kernels per step, their summed time, and the
    costliest kernels by name, for base rows and distinct-adapter rows, beside the step's time
    in a CUDA graph (so the gap between kernel time and graph time shows launch overhead)."""
    from torch.profiler import ProfilerActivity, profile

    setup = _step_setup(settings, dtype, device)
    steps = 5
    out: dict = {}
    with torch.inference_mode():
        for what, inputs in (("base", setup.base), ("distinct", setup.attention_only)):
            fn = setup.forward(inputs)
            graph_us = time_graph(fn, settings)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    fn()
                torch.cuda.synchronize()
            kernels: dict[str, list[float]] = {}
            for event in prof.events():
                if event.device_type != torch.autograd.DeviceType.CUDA:
                    continue
                us = event.time_range.elapsed_us()
                kernels.setdefault(event.name[:90], []).append(us)
            total = sum(sum(v) for v in kernels.values()) / steps
            top = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:25]
            out[what] = {
                "graph_us": graph_us,
                "kernels_per_step": sum(len(v) for v in kernels.values()) / steps,
                "kernel_us_per_step": total,
                "top": [[name, len(v) / steps, sum(v) / steps] for name, v in top],
            }
    return out


FIRST_CALL_BACKENDS = {
    "default": None,
    "no cuDNN": ["EFFICIENT_ATTENTION", "FLASH_ATTENTION", "MATH"],
}
"""SDPA backends the first-call part compares (None: torch's own choice)."""


def first_calls(settings: KernelBenchSettings, dtype: torch.dtype, device: torch.device) -> dict:
    """Milliseconds of the first and the second eager prefill at prefill shapes not seen before
    (rows x prompt length; q/k/v/o adapters on every row), per SDPA backend choice: a library
    that builds a plan or compiles a kernel per new shape stalls every running row that long,
    which decode graphs captured at start never do. Each backend choice gets shapes of its own;
    one prefill first compiles what every shape shares."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    setup = _step_setup(settings, dtype, device)
    model, shape = setup.model, setup.model.shape

    def prefill(rows: int, length: int) -> float:
        blocks = -(-(length + 1) // BLOCK_SIZE)
        step = StepInputs(
            input_ids=torch.randint(0, shape.vocab, (rows, length), device=device),
            positions=torch.arange(length, device=device).expand(rows, length).contiguous(),
            block_tables=1 + torch.arange(rows * blocks, device=device).view(rows, blocks),
            valid=torch.ones(rows, length, dtype=torch.bool, device=device),
            page_table=_distinct_table(rows, setup.pages_per_row, device),
        )
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.logits(model.forward(step, setup.kv)[:, -1])
        torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3

    out: dict = {}
    with torch.inference_mode():
        prefill(3, 45)
        for offset, (name, backends) in enumerate(FIRST_CALL_BACKENDS.items()):
            chosen = [getattr(SDPBackend, b) for b in backends] if backends else None
            rows = {}
            with sdpa_kernel(chosen) if chosen else contextlib.nullcontext():
                for rows_n, length in ((1, 61), (2, 77), (3, 93), (5, 109), (8, 125)):
                    length += 2 * offset
                    rows[f"{rows_n} x {length}"] = [
                        prefill(rows_n, length),
                        prefill(rows_n, length),
                    ]
            out[name] = rows
    return out


def format_table(results: dict) -> str:
    lines = ["", "multi-LoRA kernels, one fused projection at decode (µs per call):", ""]
    lines.append("| projection | splits | single-pass | split-K | split-K, dead pages | torch |")
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for name, row in results.get("lora", {}).items():
        lines.append(
            f"| {name} | {row['splits']} | {row['single-pass']:.1f} | {row['split-K']:.1f} | "
            f"{row['split-K, dead']:.1f} | {row['torch']:.1f} |"
        )
    lines += ["", "the whole projection, W0 x with the adapter term (µs per call):", ""]
    lines.append("| projection | W0 x alone | shrink inline | shrink beside (--lora-overlap) |")
    lines.append("| --- | --- | --- | --- |")
    for name, row in results.get("lora", {}).items():
        lines.append(
            f"| {name} | {row['W0 x alone']:.1f} | {row['W0 x + adapter, inline']:.1f} | "
            f"{row['W0 x + adapter, shrink beside']:.1f} |"
        )
    for name, row in results.get("lora", {}).items():
        sweep = row.get("sweep", {})
        best = min(sweep, key=sweep.get) if sweep else "-"
        cells = ", ".join(f"{k} {v:.1f}" for k, v in sweep.items())
        lines.append(f"{name} sweep (splits x expand block: µs), best {best}: {cells}")
    step = results.get("step", {})
    if step:
        lines += ["", "one decode step, forward + LM head (µs; ratio base / this):", ""]
        lines.append("| attention | what | µs | base / this |")
        lines.append("| --- | --- | --- | --- |")
        for attention, row in step.items():
            if not isinstance(row, dict):
                lines.append(f"| {attention} | {row:.2e} | | |")
                continue
            for what, us in row.items():
                lines.append(f"| {attention} | {what} | {us:.0f} | {row['base'] / us:.3f} |")
    for backend, rows in results.get("first_calls", {}).items():
        cells = ", ".join(f"{k}: {a:.1f} then {b:.1f}" for k, (a, b) in rows.items())
        lines += ["", f"new prefill shapes, SDPA {backend} (ms, first then second call): {cells}"]
    for what, row in results.get("profile", {}).items():
        lines += [
            "",
            f"eager decode step profile, {what}: {row['kernels_per_step']:.0f} kernels, "
            f"{row['kernel_us_per_step']:.0f} µs of kernel time per step; in a graph "
            f"{row['graph_us']:.0f} µs",
            "",
            "| kernel | per step | µs per step |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {name} | {n:.1f} | {us:.1f} |" for name, n, us in row["top"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loraserve.bench.kernels", description=__doc__)
    p.add_argument("--size", default="1b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument(
        "--only", default="lora,step", help="comma list: lora, step, profile, first_calls"
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if not (torch.cuda.is_available() and lora_kernels.available(torch.device("cuda"))):
        p.error("needs a CUDA device with Triton")
    settings = KernelBenchSettings(size=args.size, dtype=args.dtype, batch=args.batch)
    dtype, device = getattr(torch, settings.dtype), torch.device("cuda")
    results: dict = {"device": torch.cuda.get_device_name(), "settings": settings.__dict__}
    only = set(args.only.split(","))
    if "lora" in only:
        results["lora"] = bench_lora(settings, dtype, device)
        print(json.dumps(results["lora"]), flush=True)
    if "step" in only:
        results["step"] = bench_step(settings, dtype, device)
        print(json.dumps(results["step"]), flush=True)
    if "first_calls" in only:
        results["first_calls"] = first_calls(settings, dtype, device)
        print(json.dumps(results["first_calls"]), flush=True)
    if "profile" in only:
        results["profile"] = profile_step(settings, dtype, device)
        print(json.dumps(results["profile"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(format_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
