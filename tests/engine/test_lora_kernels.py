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
