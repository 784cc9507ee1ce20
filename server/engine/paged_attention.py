"""Decode attention straight from the paged KV cache: a Triton kernel and its torch reference.

One query token per row (decode). Each row attends to the keys at positions 0..pos (pos is the
query's own position, whose K/V the layer has already written), or, with a sliding window W, to
positions pos-W+1..pos; its keys live in the blocks its block table lists, in order. Grouped-query
attention: the `group` query heads that share a KV head are computed together from one read of
that head's K and V.

The kernel (one program per row and KV head) walks only the row's own blocks and keeps an online
softmax (FlashAttention-style), so nothing is gathered or materialised: the SDPA path in llama.py
copies every row's whole block span (batch x max blocks) and builds a mask each layer. All its
arithmetic is fp32: decode attention is bound by reading K and V, not by arithmetic, and fp32
dots keep SDPA's accuracy. A fixed grid and device-side positions make it capturable in the
decode CUDA graphs. The reference below is that SDPA computation and defines the semantics; tests
compare the two per dtype (on CPU under Triton's interpreter).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from loraserve.server.engine.triton_support import runs_here, tl, triton

available = runs_here
"""Where the kernel can run (without Triton, decode attention is SDPA)."""


def reference(
    q: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    block_tables: torch.Tensor,
    positions: torch.Tensor,
    window: int | None,
    block_size: int,
) -> torch.Tensor:
    """Decode attention by gathering each row's blocks and masking (the SDPA path).

    q: (batch, heads, head_dim); cache_k/cache_v: (slots, kv_heads, head_dim) with
    slot = block * block_size + offset; block_tables: (batch, blocks) int64; positions: (batch,)
    int64. Returns (batch, heads, head_dim) in q's dtype.
    """
    batch, heads, head_dim = q.shape
    kv_heads = cache_k.shape[1]
    group = heads // kv_heads
    span = block_tables.shape[1] * block_size
    paged_k = cache_k.view(-1, block_size, kv_heads, head_dim)  # (blocks, bs, kv_heads, d)
    paged_v = cache_v.view(-1, block_size, kv_heads, head_dim)  # (blocks, bs, kv_heads, d)
    keys = paged_k[block_tables].view(batch, span, kv_heads, head_dim).transpose(1, 2)
    values = paged_v[block_tables].view(batch, span, kv_heads, head_dim).transpose(1, 2)
    key_pos = torch.arange(span, device=q.device)  # (span,)
    allowed = key_pos[None, :] <= positions[:, None]  # (batch, span)
    if window is not None:
        allowed = allowed & (key_pos[None, :] > positions[:, None] - window)
    qg = q.view(batch, kv_heads, group, head_dim)  # (batch, kv_heads, group, head_dim)
    mask = allowed[:, None, None, :]  # (batch, 1, 1, span)
    out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask)
    return out.reshape(batch, heads, head_dim)


if triton is not None:

    @triton.jit
    def _decode(
        q_ptr,  # (batch, heads, D)
        k_ptr,  # (slots, kv_heads, D)
        v_ptr,  # (slots, kv_heads, D)
        table_ptr,  # (batch, blocks) int64
        pos_ptr,  # (batch,) int64
        out_ptr,  # (batch, heads, D)
        table_stride,
        scale,
        window,  # 0 = no window
        KV_HEADS: tl.constexpr,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        D: tl.constexpr,
        BS: tl.constexpr,
    ):
        row = tl.program_id(0)
        kvh = tl.program_id(1)
        heads = KV_HEADS * GROUP
        gs = tl.arange(0, GROUP_PAD)
        ds = tl.arange(0, D)
        offs = tl.arange(0, BS)
        gmask = gs < GROUP
        q_rows = row * heads + kvh * GROUP + gs  # (GROUP_PAD,)
        q = tl.load(q_ptr + q_rows[:, None] * D + ds[None, :], mask=gmask[:, None], other=0.0)
        q = q.to(tl.float32) * scale  # (GROUP_PAD, D)
        pos = tl.load(pos_ptr + row)
        first = pos * 0  # int64 like pos: both branches must give `first` one type
        if window > 0:
            first = tl.maximum(pos - window + 1, 0)
        m = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
        denom = tl.zeros((GROUP_PAD,), dtype=tl.float32)
        acc = tl.zeros((GROUP_PAD, D), dtype=tl.float32)
        for j in range(first // BS, pos // BS + 1):
            block = tl.load(table_ptr + row * table_stride + j)
            key_pos = j * BS + offs  # (BS,)
            kmask = (key_pos <= pos) & (key_pos >= first)
            slots = block * BS + offs  # (BS,)
            kv_off = (slots[:, None] * KV_HEADS + kvh) * D + ds[None, :]  # (BS, D)
            k = tl.load(k_ptr + kv_off).to(tl.float32)  # (BS, D)
            v = tl.load(v_ptr + kv_off).to(tl.float32)  # (BS, D)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")  # (GROUP_PAD, BS)
            s = tl.where(kmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])  # (GROUP_PAD, BS)
            denom = denom * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            m = m_new
        out = acc / denom[:, None]
        tl.store(
            out_ptr + q_rows[:, None] * D + ds[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=gmask[:, None],
        )


def decode(
    q: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    block_tables: torch.Tensor,
    positions: torch.Tensor,
    window: int | None,
    block_size: int,
) -> torch.Tensor:
    """The kernel: same arguments and result as `reference`.

    q: (batch, heads, head_dim) contiguous; head_dim a power of two >= 16; block_size >= 16;
    block_tables' rows may be strided (a slice of a static buffer), its columns contiguous.
    """
    batch, heads, head_dim = q.shape
    kv_heads = cache_k.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)  # (batch, heads, head_dim)
    _decode[(batch, kv_heads)](
        q,
        cache_k,
        cache_v,
        block_tables,
        positions,
        out,
        block_tables.stride(0),
        1.0 / math.sqrt(head_dim),
        window or 0,
        KV_HEADS=kv_heads,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        D=head_dim,
        BS=block_size,
    )
    return out


def supports(head_dim: int, block_size: int) -> bool:
    """Shapes the kernel handles (tl.dot needs power-of-two tiles of at least 16)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and block_size in (16, 32, 64)
