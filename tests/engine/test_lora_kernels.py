"""The Triton multi-LoRA kernels against the torch reference, per dtype (as Punica tests).

On a CUDA device with Triton the kernels run compiled. Without CUDA they run under Triton's
interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1 before Triton is imported;
CI installs Triton for this): that checks the kernels' indexing, masking and arithmetic on every
machine, though not their GPU speed or code generation. Skipped cleanly when Triton is absent.
Mixed ranks, rows without an adapter, decode (one token per row) and prefill (a page table
repeated per token), and a page table that is a strided slice of a wider static buffer, as the
decode graphs pass it.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from loraserve.server.engine import lora_kernels
from loraserve.server.engine.lora import LoRAGroup, MultiLoRALinear


def _kernel_device() -> str | None:
    if torch.cuda.is_available() and lora_kernels.available(torch.device("cuda")):
        return "cuda"
    if lora_kernels.triton is not None and os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    return None


DEVICE = _kernel_device()
pytestmark = pytest.mark.skipif(
    DEVICE is None, reason="needs Triton: a CUDA device, or Triton's CPU interpreter"
)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _group(outs: list[int], d_in: int, dtype: torch.dtype, pages: int) -> LoRAGroup:
    members = [
        MultiLoRALinear(nn.Linear(d_in, o).to(device=DEVICE, dtype=dtype), context=None)
        for o in outs
    ]
    group = LoRAGroup(members)
    group.reserve(pages, 8)
    assert group.a is not None and group.b is not None
    group.a.normal_(std=0.1)
    group.b.normal_(std=0.1)
    group.a[0].zero_()  # page 0 is the zero page
    group.b[0].zero_()
    return group


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("outs", "d_in"), [([256, 64, 64], 256), ([512, 512], 200), ([96], 384)])
@pytest.mark.parametrize("seq", [1, 5])
def test_kernels_match_reference(dtype: torch.dtype, outs: list[int], d_in: int, seq: int) -> None:
    torch.manual_seed(0)
    group = _group(outs, d_in, dtype, pages=9)
    wide = torch.zeros((6, 4), dtype=torch.long, device=DEVICE)  # a static buffer
    wide[:5, :3] = torch.tensor([[1, 2, 3], [0, 0, 0], [4, 0, 0], [5, 6, 0], [1, 2, 3]])
    table = wide[:5, :3]  # strided rows, as a graph bucket slices its buffer
    x = torch.randn(5, seq, d_in, device=DEVICE, dtype=dtype)  # (batch, seq, d_in)
    want = group.delta(x, table).float()  # (batch, seq, O)
    base = torch.randn(5 * seq, sum(outs), device=DEVICE, dtype=dtype)  # (T, O)
    y = base.clone()
    tokens = table if seq == 1 else table.repeat_interleave(seq, 0)
    assert group.a is not None and group.b is not None
    lora_kernels.add_lora(y, x.reshape(5 * seq, d_in), group.a, group.b, group.segment, tokens)
    got = (y.float() - base.float()).view(5, seq, -1)
    tol = TOLERANCE[dtype] * want.abs().max().item()
    torch.testing.assert_close(got, want, atol=tol, rtol=TOLERANCE[dtype])
    assert got[1].abs().max().item() <= TOLERANCE[dtype] * base.abs().max().item()


def test_self_check_passes_on_this_device() -> None:
    assert DEVICE is not None
    assert lora_kernels.self_check(torch.device(DEVICE), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 2, 4])
def test_split_shrink_matches_reference(dtype: torch.dtype, splits: int) -> None:
    """d_in = 700 is three BLOCK_K tiles and not a multiple of one: each split of the shrink
    sums a part of d_in (with 4 splits the last part is empty) and the expand adds them up."""
    torch.manual_seed(1)
    d_in = 700
    group = _group([64, 32], d_in, dtype, pages=5)
    table = torch.tensor([[1, 2], [3, 0], [0, 0], [4, 5]], device=DEVICE)  # (batch, n)
    x = torch.randn(4, 1, d_in, device=DEVICE, dtype=dtype)  # (batch, 1, d_in)
    want = group.delta(x, table).float()[:, 0]  # (batch, O)
    y = torch.zeros(4, 96, device=DEVICE, dtype=dtype)  # (T, O)
    assert group.a is not None and group.b is not None
    lora_kernels.add_lora(
        y, x[:, 0].contiguous(), group.a, group.b, group.segment, table, splits=splits
    )
    tol = TOLERANCE[dtype] * want.abs().max().item()
    torch.testing.assert_close(y.float(), want, atol=tol, rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pages_not_live_in_a_group_are_skipped(dtype: torch.dtype) -> None:
    """A page whose `live` flag is 0 contributes nothing even when its memory holds values (it
    is never read), and a row with no live page leaves its output bitwise as it was."""
    torch.manual_seed(2)
    group = _group([128, 64], 256, dtype, pages=6)
    assert group.a is not None and group.b is not None
    # (pages + 1,): pages 1, 3, 5 live; 2, 4, 6 hold values but are dead.
    live = torch.tensor([0, 1, 0, 1, 0, 1, 0], dtype=torch.int32, device=DEVICE)
    table = torch.tensor([[1, 2], [2, 4], [3, 5], [0, 0]], device=DEVICE)  # (batch, n)
    x = torch.randn(4, 1, 256, device=DEVICE, dtype=dtype)  # (batch, 1, d_in)
    # The reference over the same stacks with the dead pages' contents zeroed.
    alive = group.a.clone(), group.b.clone()
    group.a[live == 0] = 0
    group.b[live == 0] = 0
    want = group.delta(x, table).float()[:, 0]  # (batch, O)
    group.a.copy_(alive[0])
    group.b.copy_(alive[1])
    base = torch.randn(4, 192, device=DEVICE, dtype=dtype)  # (T, O)
    y = base.clone()
    lora_kernels.add_lora(y, x[:, 0].contiguous(), group.a, group.b, group.segment, table, live)
    tol = TOLERANCE[dtype] * want.abs().max().item()
    torch.testing.assert_close(y.float() - base.float(), want, atol=tol, rtol=TOLERANCE[dtype])
    assert torch.equal(y[1], base[1])  # pages 2 and 4: both dead
    assert torch.equal(y[3], base[3])  # no adapter


def test_shrink_splits_are_powers_of_two_within_d_in() -> None:
    bk = lora_kernels.BLOCK_K
    # Decode: few rows, so d_in is split, at most one BLOCK_K tile per program.
    assert lora_kernels.shrink_splits(tokens=32, slots=2, d_in=8 * bk) == 8
    assert lora_kernels.shrink_splits(tokens=32, slots=6, d_in=8 * bk) == 4
    assert lora_kernels.shrink_splits(tokens=32, slots=2, d_in=32 * bk) == 8
    assert lora_kernels.shrink_splits(tokens=1, slots=2, d_in=32 * bk) == 32
    assert lora_kernels.shrink_splits(tokens=1, slots=1, d_in=3 * bk) == 2
    # Prefill: the rows alone fill the GPU; d_in stays in one program.
    assert lora_kernels.shrink_splits(tokens=4096, slots=2, d_in=8 * bk) == 1
    assert lora_kernels.shrink_splits(tokens=8, slots=1, d_in=100) == 1
    for tokens in (1, 3, 32, 100, 2048):
        splits = lora_kernels.shrink_splits(tokens=tokens, slots=6, d_in=2048)
        assert splits & (splits - 1) == 0 and splits * bk <= 2048
