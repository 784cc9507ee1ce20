"""--lora-overlap: each fused projection's adapter shrink beside its base matmul (llama._project).

Where there are no streams (CPU) CheckedSide stands in for side_stream.SideStream and the
kernels run under Triton's interpreter: the result must equal the inline kernel path and the
torch reference, and the launches must be shaped for overlap (the shrink inside beside(), the
base matmul after it on the current stream and before join(), the expand after join()). On CUDA
the same runs with a real side stream, eagerly and captured in a graph.
"""

from __future__ import annotations

import pytest
import torch
from serving_support import CheckedSide
from torch import nn

from loraserve.server.engine import llama, lora_kernels
from loraserve.server.engine.llama import AdapterPath
from loraserve.server.engine.lora import LoRAGroup, MultiLoRALinear
from loraserve.server.engine.triton_support import runs_here

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    not runs_here(DEVICE), reason="needs Triton: a CUDA device, or Triton's CPU interpreter"
)
OUTS, D_IN = [96, 32, 32], 80


def _projection(dtype: torch.dtype) -> tuple[LoRAGroup, torch.Tensor, torch.Tensor]:
    """A q/k/v-like group with random pages (page 0 zero), its fused weight and bias."""
    torch.manual_seed(0)
    members = [
        MultiLoRALinear(nn.Linear(D_IN, o).to(device=DEVICE, dtype=dtype), context=None)
        for o in OUTS
    ]
    group = LoRAGroup(members)
    group.reserve(7, 8)
    assert group.a is not None and group.b is not None
    group.a.normal_(std=0.1)
    group.b.normal_(std=0.1)
    group.a[0].zero_()
    group.b[0].zero_()
    assert group.live is not None
    group.live.fill_(1)  # every page but the zero page holds an adapter for this group
    group.live[0] = 0
    weight = torch.randn(sum(OUTS), D_IN, device=DEVICE, dtype=dtype) * 0.1  # (O, d_in)
    bias = torch.randn(sum(OUTS), device=DEVICE, dtype=dtype)  # (O,)
    return group, weight, bias


TABLE = [[1, 2], [0, 0], [3, 0], [5, 6]]  # (batch, n): two ranks, a base row, mixed


@pytest.mark.parametrize("seq", [1, 3])
def test_shrink_beside_the_matmul_equals_inline_and_reference(
    seq: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    group, weight, bias = _projection(torch.float32)
    x = torch.randn(len(TABLE), seq, D_IN, device=DEVICE)  # (batch, seq, d_in)
    rows = torch.tensor(TABLE, device=DEVICE)
    table = rows if seq == 1 else rows.repeat_interleave(seq, 0)  # each token's pages

    side = CheckedSide()
    calls = side.log  # one log: the side's fork / end / join and the launches between
    shrink, expand, linear = lora_kernels.shrink, lora_kernels.expand, llama.F.linear
    monkeypatch.setattr(
        lora_kernels, "shrink", lambda *a, **k: (calls.append("shrink"), shrink(*a, **k))[1]
    )
    monkeypatch.setattr(
        lora_kernels, "expand", lambda *a, **k: (calls.append("expand"), expand(*a, **k))[1]
    )
    monkeypatch.setattr(llama, "F", _Recording(calls, linear))
    got = llama._project(x, weight, bias, group, table, AdapterPath(kernels=True, side=side))
    assert calls == ["beside", "shrink", "end", "linear", "join", "expand"]

    monkeypatch.undo()
    inline = llama._project(x, weight, bias, group, table, AdapterPath(kernels=True))
    reference = llama._project(x, weight, bias, group, rows, AdapterPath())
    torch.testing.assert_close(got, inline, rtol=0, atol=0)  # the same kernels, the same sums
    scale = reference.abs().max()
    torch.testing.assert_close(got, reference, atol=1e-5 * scale, rtol=1e-5)
    base = nn.functional.linear(x, weight, bias)
    assert (got - base).abs().max() > 1e-2 * scale  # the adapter term is really there


class _Recording:
    """torch.nn.functional with `linear` logged (llama's `F`)."""

    def __init__(self, calls: list[str], linear) -> None:
        self._calls, self._linear = calls, linear

    def linear(self, *args, **kwargs):
        self._calls.append("linear")
        return self._linear(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(torch.nn.functional, name)


def test_rows_without_an_adapter_get_the_base_projection_beside_too() -> None:
    group, weight, bias = _projection(torch.float32)
    x = torch.randn(2, 1, D_IN, device=DEVICE)
    table = torch.zeros(2, 2, dtype=torch.long, device=DEVICE)  # no row has pages
    got = llama._project(
        x, weight, bias, group, table, AdapterPath(kernels=True, side=CheckedSide())
    )
    torch.testing.assert_close(got, nn.functional.linear(x, weight, bias), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_real_side_stream_eager_and_in_a_graph(dtype: torch.dtype) -> None:
    from loraserve.server.engine.side_stream import SideStream

    group, weight, bias = _projection(dtype)
    table = torch.tensor(TABLE, device=DEVICE)
    x = torch.randn(len(TABLE), 1, D_IN, device=DEVICE, dtype=dtype)
    want = llama._project(x, weight, bias, group, table, AdapterPath(kernels=True))
    path = AdapterPath(kernels=True, side=SideStream(DEVICE))
    eager = llama._project(x, weight, bias, group, table, path)
    torch.testing.assert_close(eager, want, rtol=0, atol=0)
    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):
        llama._project(x, weight, bias, group, table, path)
    torch.cuda.current_stream().wait_stream(warm)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = llama._project(x, weight, bias, group, table, path)
    x.copy_(torch.randn_like(x))  # new inputs in the static buffer, then replay
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(
        out,
        llama._project(x, weight, bias, group, table, AdapterPath(kernels=True)),
        rtol=0,
        atol=0,
    )
