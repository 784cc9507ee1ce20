"""Pages laid out on the device from one upload of the adapter as read (device_layout).

Run here with the CPU as "the device": the gather must make the host layout's buffer bit for
bit (page_plan.lay_out), for every rank's fit to a page, with and without fused groups, for
each storage and page dtype; the index is kept per adapter structure under its byte budget;
and whatever it cannot take (no single buffer, too big) is left to the host layout.
"""

from __future__ import annotations

import time

import pytest
import torch

from loraserve.adapters.config import LoraAdapterConfig
from loraserve.adapters.weights import AdapterStructure, AdapterWeights, InPlacePlan
from loraserve.server.engine.cold_loader import PageLayout, stage
from loraserve.server.engine.device_layout import DeviceLayouts
from loraserve.server.engine.lora import adapter_pages
from loraserve.server.engine.page_plan import lay_out
from loraserve.server.engine.types import AdapterKey

SHAPES = {"q": (24, 24), "k": (24, 8), "v": (24, 8), "o": (24, 24), "down": (40, 24)}
"""Module -> (d_in, d_out), as test_stage_layout: shapes repeated and not, a fused group."""
GROUPS = (("q", "k", "v"), ("o", "x"))
CPU = torch.device("cpu")


class Structure:
    """Stands in for the AdapterStructure a StructureCache hands every adapter of one shape."""


def _weights(
    rank: int,
    storage: torch.dtype = torch.float32,
    *,
    seed: int = 0,
    structure: object = None,
    use_rslora: bool = False,
) -> AdapterWeights:
    """An adapter whose factors are views of one buffer that holds them and nothing else, in
    another order than the modules' (as a file may hold them)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = {
        (name, i): (rank, d_in) if i == 0 else (d_out, rank)
        for name, (d_in, d_out) in SHAPES.items()
        for i in (0, 1)
    }
    order = sorted(sizes, key=lambda k: (k[1], k[0]))  # every B first, names sorted
    total = sum(r * c for r, c in sizes.values())
    flat = torch.randn(total, generator=gen).to(storage)  # (elements,)
    views, offset = {}, 0
    for k in order:
        rows, cols = sizes[k]
        views[k] = flat[offset : offset + rows * cols].view(rows, cols)
        offset += rows * cols
    config = LoraAdapterConfig(
        rank=rank, alpha=2.5 * rank, use_rslora=use_rslora, target_modules="all-linear", raw={}
    )
    modules = {name: (views[(name, 0)], views[(name, 1)]) for name in SHAPES}
    return AdapterWeights(
        config=config, modules=modules, flat=flat, structure=structure or Structure()
    )


@pytest.mark.parametrize("groups", [(), GROUPS], ids=["by-shape", "grouped"])
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("rank", "page_rank"), [(8, 8), (16, 8), (12, 8), (3, 4), (5, 16)])
def test_the_gather_makes_the_host_layouts_buffer_bit_for_bit(
    rank: int, page_rank: int, dtype: torch.dtype, storage: torch.dtype, groups: tuple
) -> None:
    weights = _weights(rank, storage, use_rslora=rank == 12)
    n = -(-rank // page_rank)
    layouts = DeviceLayouts(CPU)
    got = layouts.lay_out(weights, page_rank, n, dtype, groups)
    assert got is not None
    arena, shapes, plan = got
    want, want_shapes, want_plan = lay_out(weights, page_rank, n, dtype, pin=False, groups=groups)
    assert (shapes, plan) == (want_shapes, want_plan)
    assert arena.dtype == dtype and arena.shape == want.shape
    assert torch.equal(arena.view(torch.uint8), want.view(torch.uint8))  # the very bits


@pytest.mark.parametrize("groups", [(), GROUPS], ids=["by-shape", "grouped"])
@pytest.mark.parametrize("rank", [16, 12, 5])
def test_staged_on_the_device_the_pages_are_the_reference_pages(rank: int, groups: tuple) -> None:
    weights = _weights(rank, torch.bfloat16)
    layouts = DeviceLayouts(CPU)
    layout = PageLayout(8, torch.bfloat16, CPU, groups=groups, on_device=layouts)
    staged = stage(AdapterKey("t", "a", 1, rank=rank), weights, layout, None, time.monotonic())
    assert layouts.builds == 1, "laid out by the gather"
    n = -(-rank // 8)
    for name, (lora_a, lora_b) in weights.modules.items():
        want_a, want_b = adapter_pages(lora_a, lora_b, weights.config.scale, 8, n, torch.bfloat16)
        assert torch.equal(staged.modules[name][0], want_a), name
        assert torch.equal(staged.modules[name][1], want_b), name
    if groups:
        assert list(staged.grouped) == [("q", "k", "v")]


def test_one_index_per_structure_kept_under_its_budget() -> None:
    first, second = Structure(), Structure()
    one = _weights(16, structure=first)
    nbytes = 4 * sum(2 * 8 * (d_in + d_out) for d_in, d_out in SHAPES.values())
    layouts = DeviceLayouts(CPU, budget_bytes=nbytes)  # room for one index
    for seed in range(3):  # other values, the same structure: one index
        assert layouts.lay_out(_weights(16, seed=seed, structure=first), 8, 2, torch.float32)
    assert layouts.builds == 1 and layouts.cached_bytes() == nbytes
    assert layouts.lay_out(_weights(16, structure=second), 8, 2, torch.float32)
    assert layouts.builds == 2 and layouts.cached_bytes() == nbytes  # the first one went
    assert layouts.lay_out(one, 8, 2, torch.float32)
    assert layouts.builds == 3, "evicted, so computed again"
    # Another page layout of one structure is another index; this one fits, a rank-24
    # structure's does not (and evicts nothing).
    assert layouts.lay_out(one, 16, 1, torch.float32)
    assert layouts.builds == 4 and layouts.cached_bytes() == nbytes
    assert layouts.lay_out(_weights(24), 8, 3, torch.float32) is None
    assert layouts.builds == 4 and layouts.cached_bytes() == nbytes


def test_what_the_gather_cannot_take_is_left_to_the_host_layout() -> None:
    layouts = DeviceLayouts(CPU)
    weights = _weights(8)
    no_buffer = AdapterWeights(config=weights.config, modules=weights.modules)
    assert layouts.lay_out(no_buffer, 8, 1, torch.float32) is None
    copied = dict(weights.modules)
    copied["k"] = (copied["k"][0].clone(), copied["k"][1])  # not a view of the buffer
    outside = AdapterWeights(weights.config, copied, flat=weights.flat, structure=Structure())
    assert layouts.lay_out(outside, 8, 1, torch.float32) is None
    too_big = DeviceLayouts(CPU, budget_bytes=64)
    assert too_big.lay_out(weights, 8, 1, torch.float32) is None
    assert layouts.builds == too_big.builds == 0 and too_big.cached_bytes() == 0
    # stage() then lays out on the host: the same pages.
    layout = PageLayout(8, torch.float32, CPU, on_device=too_big)
    staged = stage(AdapterKey("t", "a", 1, rank=8), weights, layout, None, time.monotonic())
    want_a, _ = adapter_pages(*weights.modules["q"], weights.config.scale, 8, 1, torch.float32)
    assert torch.equal(staged.modules["q"][0], want_a)


def _as_read(rank: int, alpha: float, seed: int = 0) -> AdapterWeights:
    """_weights with the AdapterStructure a load would attach: each module's keys, and where
    each tensor lies in the buffer (fresh objects each call, as for files checked apart)."""
    weights = _weights(rank, seed=seed)
    flat = weights.flat
    assert flat is not None
    views = []
    keys = []
    for name, (a, b) in weights.modules.items():
        keys.append((name, f"{name}.lora_A", f"{name}.lora_B"))
        for key, t in ((f"{name}.lora_A", a), (f"{name}.lora_B", b)):
            views.append((key, tuple(t.shape), t.stride(), t.storage_offset()))
    config = LoraAdapterConfig(
        rank=rank, alpha=alpha, use_rslora=False, target_modules="all-linear", raw={}
    )
    structure = AdapterStructure(
        config, (), tuple(keys), InPlacePlan(flat.dtype, 0, tuple(sorted(views)))
    )
    return AdapterWeights(config, weights.modules, flat=flat, structure=structure)


def test_adapters_that_differ_only_in_alpha_share_one_index() -> None:
    layouts = DeviceLayouts(CPU)
    first, other_alpha = _as_read(16, alpha=16), _as_read(16, alpha=64, seed=1)
    assert first.structure is not other_alpha.structure
    for weights in (first, other_alpha):
        got = layouts.lay_out(weights, 8, 2, torch.float32)
        assert got is not None
        want, _, _ = lay_out(weights, 8, 2, torch.float32, pin=False)
        assert torch.equal(got[0], want)  # each with its own scale
    assert layouts.builds == 1
    assert layouts.lay_out(_as_read(8, alpha=16), 8, 1, torch.float32) is not None
    assert layouts.builds == 2, "another rank is another layout"
