"""Cold-load staging (server.engine.cold_loader.stage): one buffer per adapter holds exactly the
pages the per-module reference (lora.adapter_pages) makes, whatever the rank's fit to a page
and however the modules' shapes repeat."""

from __future__ import annotations

import time

import pytest
import torch

from loraserve.adapters.config import LoraAdapterConfig
from loraserve.adapters.weights import AdapterWeights
from loraserve.server.engine.cold_loader import PageLayout, stage
from loraserve.server.engine.lora import adapter_pages
from loraserve.server.engine.types import AdapterKey

SHAPES = {"q": (24, 24), "k": (24, 8), "v": (24, 8), "o": (24, 24), "down": (40, 24)}
"""Module -> (d_in, d_out): square, narrow and wide layers in one adapter, and modules sharing a
shape (staged together) between modules of other shapes."""


def _weights(rank: int, alpha: float, use_rslora: bool = False) -> AdapterWeights:
    gen = torch.Generator().manual_seed(rank)
    modules = {
        name: (
            torch.randn(rank, d_in, generator=gen),  # A (r, d_in)
            torch.randn(d_out, rank, generator=gen),  # B (d_out, r)
        )
        for name, (d_in, d_out) in SHAPES.items()
    }
    config = LoraAdapterConfig(
        rank=rank, alpha=alpha, use_rslora=use_rslora, target_modules="all-linear", raw={}
    )
    return AdapterWeights(config=config, modules=modules)


GROUPS = (("q", "k", "v"), ("o", "x"))
"""A fused group the adapter targets whole, and one with a member it does not target."""


@pytest.mark.parametrize("groups", [(), GROUPS], ids=["by-shape", "grouped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("rank", "page_rank"), [(8, 8), (16, 8), (12, 8), (3, 4), (5, 16)])
def test_staged_pages_are_the_reference_pages(
    dtype: torch.dtype, rank: int, page_rank: int, groups: tuple
) -> None:
    weights = _weights(rank, alpha=2.5 * rank, use_rslora=rank == 12)
    layout = PageLayout(page_rank, dtype, torch.device("cpu"), groups=groups)
    staged = stage(AdapterKey("t", "a", 1, rank=rank), weights, layout, None, time.monotonic())
    n = -(-rank // page_rank)
    assert staged.rank == rank and list(staged.modules) == list(SHAPES)
    assert staged.host_nbytes == weights.nbytes and staged.numel == weights.numel
    for name, (lora_a, lora_b) in weights.modules.items():
        want_a, want_b = adapter_pages(lora_a, lora_b, weights.config.scale, page_rank, n, dtype)
        a_pages, b_pages = staged.modules[name]
        assert a_pages.dtype == b_pages.dtype == dtype
        in_group = any(name in names for names in staged.grouped)
        if n == 1 or not in_group:  # a grouped member's pages of several pages interleave
            assert a_pages.is_contiguous() and b_pages.is_contiguous()
        assert torch.equal(a_pages, want_a), name
        assert torch.equal(b_pages, want_b), name


@pytest.mark.parametrize(
    ("rank", "groups"), [(12, ()), (12, GROUPS), (16, GROUPS), (8, GROUPS), (5, GROUPS)]
)
def test_every_page_is_a_view_of_one_buffer_and_nothing_else_is_in_it(
    rank: int, groups: tuple
) -> None:
    """One host-to-device copy per adapter: the pages tile the staged buffer exactly."""
    weights = _weights(rank, alpha=16)
    staged = stage(
        AdapterKey("t", "a", 1, rank=rank),
        weights,
        PageLayout(8, torch.float32, torch.device("cpu"), groups=groups),
        None,
        time.monotonic(),
    )
    arena = staged.arena
    assert arena is not None
    storage = arena.untyped_storage().data_ptr()
    arena.zero_()
    for pair in staged.modules.values():
        for pages in pair:
            assert pages.untyped_storage().data_ptr() == storage, "a page outside the buffer"
            pages.add_(1)  # through the view: counts how many pages cover each element
    # Grouped members' pages of several pages interleave, so count elements, not spans.
    assert torch.equal(arena, torch.ones_like(arena)), "a gap or an overlap between pages"


def test_to_device_keeps_values_and_dtype() -> None:
    from loraserve.server.engine.device_copy import to_device

    index = to_device(torch.tensor([3, 1, 2], dtype=torch.long), torch.device("cpu"))
    assert index.dtype == torch.long and index.tolist() == [3, 1, 2]
    flags = to_device(torch.tensor([1, 0], dtype=torch.int32), torch.device("cpu"))
    assert flags.dtype == torch.int32 and flags.tolist() == [1, 0]


@pytest.mark.parametrize("rank", [12, 16, 8, 5])
def test_fused_groups_are_staged_in_their_stacks_layout(rank: int) -> None:
    """A group whose members the adapter all targets is also staged as the group's stacks lay
    pages out (members' A side by side, B stacked along d_out), so the engine thread's commit
    copies it as it is; a group with a member the adapter skips is not. Where the rank fits
    one page or fills its pages (5, 8 and 16 in pages of 8) the buffer itself is laid out so:
    the group is a view of it, no second copy; a rank of 12 is stacked from the modules'
    pages."""
    weights = _weights(rank, alpha=16)
    layout = PageLayout(8, torch.bfloat16, torch.device("cpu"), groups=GROUPS)
    staged = stage(AdapterKey("t", "a", 1, rank=rank), weights, layout, None, time.monotonic())
    assert list(staged.grouped) == [("q", "k", "v")]  # nothing targets "x"
    a, b = staged.grouped[("q", "k", "v")]
    n = -(-rank // 8)
    assert a.shape == (n, 3, 8, 24) and b.shape == (n, 24 + 8 + 8, 8)
    assert staged.arena is not None
    arena = staged.arena.untyped_storage().data_ptr()
    for tensor in (a, b):
        in_arena = tensor.untyped_storage().data_ptr() == arena
        assert in_arena == (rank != 12), "a view of the buffer unless the last page is partial"
    for j, name in enumerate(("q", "k", "v")):
        assert torch.equal(a[:, j], staged.modules[name][0]), name
    offset = 0
    for name in ("q", "k", "v"):
        width = SHAPES[name][1]
        assert torch.equal(b[:, offset : offset + width], staged.modules[name][1]), name
        offset += width
