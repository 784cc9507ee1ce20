"""The Triton paged decode-attention kernel against its SDPA reference, per dtype.

Compiled on CUDA; without CUDA under Triton's CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so every machine checks the kernel's block walk, masking, grouped-query
heads and online softmax. Skipped cleanly when Triton is absent. The reference itself is checked
against plain per-row attention over the row's own keys, so both sides are pinned down.
"""

from __future__ import annotations

import math

import pytest
import torch

from loraserve.server.engine import paged_attention

DEVICE = (
    "cuda"
    if torch.cuda.is_available()
    else ("cpu" if paged_attention.available(torch.device("cpu")) else None)
)
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
BS = 16


def _case(
    batch: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: str
) -> tuple[torch.Tensor, ...]:
    """A shuffled block pool, rows of different lengths (block edges included), strided tables."""
    torch.manual_seed(0)
    num_blocks, blocks = 48, 5
    cache_k = torch.randn(num_blocks * BS, kv_heads, head_dim, device=device).to(dtype)
    cache_v = torch.randn(num_blocks * BS, kv_heads, head_dim, device=device).to(dtype)
    wide = torch.zeros((batch + 2, blocks + 3), dtype=torch.long, device=device)  # static buffer
    perm = torch.randperm(num_blocks - 1, device=device) + 1  # block 0 stays scratch
    wide[:batch, :blocks] = perm[: batch * blocks].view(batch, blocks)
    table = wide[:batch, :blocks]  # strided rows, as a graph bucket slices its buffer
    lengths = [0, 15, 16, 17, 40, 79, 5, 31][:batch]
    positions = torch.tensor(lengths, dtype=torch.long, device=device)  # (batch,)
    q = torch.randn(batch, heads, head_dim, device=device).to(dtype)  # (batch, heads, d)
    return q, cache_k, cache_v, table, positions


def _naive(
    q: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    table: torch.Tensor,
    positions: torch.Tensor,
    window: int | None,
) -> torch.Tensor:
    """Per row: gather its keys 0..pos by hand and run softmax(q k^T / sqrt(d)) v in float64."""
    batch, heads, head_dim = q.shape
    group = heads // cache_k.shape[1]
    out = torch.zeros(batch, heads, head_dim, dtype=torch.float64)
    for r in range(batch):
        pos = int(positions[r])
        first = 0 if window is None else max(0, pos - window + 1)
        slots = [int(table[r, p // BS]) * BS + p % BS for p in range(first, pos + 1)]
        keys = cache_k[slots].double().cpu()  # (n, kv_heads, d)
        values = cache_v[slots].double().cpu()  # (n, kv_heads, d)
        for h in range(heads):
            scores = keys[:, h // group] @ q[r, h].double().cpu() / math.sqrt(head_dim)  # (n,)
            out[r, h] = torch.softmax(scores, 0) @ values[:, h // group]
    return out


@pytest.mark.parametrize("window", [None, 20])
def test_reference_is_attention_over_each_rows_own_keys(window: int | None) -> None:
    q, cache_k, cache_v, table, positions = _case(8, 8, 2, 32, torch.float32, "cpu")
    got = paged_attention.reference(q, cache_k, cache_v, table, positions, window, BS)
    want = _naive(q, cache_k, cache_v, table, positions, window)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(DEVICE is None, reason="needs Triton: a CUDA device or the CPU interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"), [(8, 2, 32), (4, 4, 16), (16, 2, 64), (6, 1, 32)]
)
@pytest.mark.parametrize("window", [None, 20])
def test_kernel_matches_reference(
    dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, window: int | None
) -> None:
    assert DEVICE is not None
    q, cache_k, cache_v, table, positions = _case(8, heads, kv_heads, head_dim, dtype, DEVICE)
    want = paged_attention.reference(q, cache_k, cache_v, table, positions, window, BS).float()
    got = paged_attention.decode(q, cache_k, cache_v, table, positions, window, BS).float()
    tol = TOLERANCE[dtype] * max(want.abs().max().item(), 1.0)
    torch.testing.assert_close(got, want, atol=tol, rtol=TOLERANCE[dtype])


def test_supported_shapes() -> None:
    assert paged_attention.supports(64, 16) and paged_attention.supports(128, 16)
    assert not paged_attention.supports(80, 16)  # not a power of two
    assert not paged_attention.supports(8, 16)  # below tl.dot's smallest tile
    assert not paged_attention.supports(64, 8)
