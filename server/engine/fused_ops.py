"""Fused elementwise steps of the own Llama forward: Triton kernels and their torch references.

On an H200 (bench/kernels.py --only profile, 1b model, batch 32) an eager decode step ran 671
kernels, and the ones between the matrix products took more GPU time than the products
themselves: each RMSNorm was eight launches (cast, square, mean, add, rsqrt, two products, cast
back), RoPE ten per layer on strided views, plus a cache write per K and V. In a CUDA graph the
launches cost little; each small kernel's own time (a few µs at best) is what adds up. Three
kernels replace them, each reading its input once:

- `add_rms_norm`: the residual add and the next RMSNorm (one program per token row);
- `rope_write_kv`: RoPE on q and k straight out of the fused qkv projection, k and v written to
  their KV cache slots, q returned (one program per token and head);
- `silu_mul`: SwiGLU's silu(gate) * up over the fused gate/up projection.

The torch references define the semantics and are the CPU path. They round exactly where the
Hugging Face modules do (the norm in float32, cast to the activations' dtype before the weight;
RoPE's two products and their sum each in the activations' dtype), and so do the kernels, so a
kernel step differs from the reference only in the order of the norm's float32 sum. Tests
compare both per dtype (on CPU under Triton's interpreter).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from loraserve.server.engine.triton_support import runs_here, tl, triton

log = logging.getLogger(__name__)

available = runs_here
"""Where the kernels can run (elsewhere the forward uses the torch references)."""


# ---- torch references (the CPU path) ----


def add_rms_norm_reference(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, x + delta): x, delta (..., hidden); delta None norms x alone (returns x too)."""
    if delta is not None:
        x = x + delta
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_write_kv_reference(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    slots: torch.Tensor,
    heads: int,
) -> torch.Tensor:
    """q rotated, (T, heads, head_dim); k rotated and v written to cache slot slots[t].

    qkv: (T, (heads + 2 kv_heads) * head_dim); cos, sin: (T, head_dim) in qkv's dtype;
    cache_k, cache_v: (slots, kv_heads, head_dim); slots: (T,) int64.
    """
    kv_heads, head_dim = cache_k.shape[1], cache_k.shape[2]
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    q, k, v = qkv.split([q_out, kv_out, kv_out], dim=-1)
    cos, sin = cos[:, None], sin[:, None]  # (T, 1, head_dim)
    q = q.view(-1, heads, head_dim)
    k = k.view(-1, kv_heads, head_dim)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    cache_k.index_copy_(0, slots, k)
    cache_v.index_copy_(0, slots, v.reshape(-1, kv_heads, head_dim))
    return q


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """(..., 2 I) gate then up -> silu(gate) * up, (..., I)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# ---- kernels ----

if triton is not None:

    @triton.jit
    def _add_rms_norm(
        x_ptr,  # (T, N)
        delta_ptr,  # (T, N), when HAS_DELTA
        w_ptr,  # (N,)
        out_ptr,  # (T, N) normed
        sum_ptr,  # (T, N) x + delta, when HAS_DELTA
        n_cols,
        eps,
        HAS_DELTA: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
        if HAS_DELTA:
            d = tl.load(delta_ptr + row * n_cols + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + d.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(sum_ptr + row * n_cols + cols, x, mask=mask)
        h = x.to(tl.float32)
        var = tl.sum(h * h, axis=0) / n_cols
        h = (h * tl.math.rsqrt(var + eps)).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n_cols + cols, (w * h).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_write_kv(
        qkv_ptr,  # (T, (HEADS + 2 KV_HEADS) * D)
        cos_ptr,  # (T, D)
        sin_ptr,  # (T, D)
        q_ptr,  # (T, HEADS, D) out
        k_cache_ptr,  # (slots, KV_HEADS, D)
        v_cache_ptr,  # (slots, KV_HEADS, D)
        slots_ptr,  # (T,) int64
        HEADS: tl.constexpr,
        KV_HEADS: tl.constexpr,
        D: tl.constexpr,
        HALF_PAD: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        half: tl.constexpr = D // 2
        width: tl.constexpr = (HEADS + 2 * KV_HEADS) * D
        dt = qkv_ptr.dtype.element_ty
        i = tl.arange(0, HALF_PAD)
        mask = i < half
        src = qkv_ptr + t * width + head * D
        x1 = tl.load(src + i, mask=mask, other=0.0)
        x2 = tl.load(src + half + i, mask=mask, other=0.0)
        if head < HEADS + KV_HEADS:
            c1 = tl.load(cos_ptr + t * D + i, mask=mask, other=0.0).to(tl.float32)
            c2 = tl.load(cos_ptr + t * D + half + i, mask=mask, other=0.0).to(tl.float32)
            s1 = tl.load(sin_ptr + t * D + i, mask=mask, other=0.0).to(tl.float32)
            s2 = tl.load(sin_ptr + t * D + half + i, mask=mask, other=0.0).to(tl.float32)
            f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
            # x * cos + rotate_half(x) * sin, each product and the sum rounded to the dtype.
            a1 = (f1 * c1).to(dt).to(tl.float32)
            b1 = (-f2 * s1).to(dt).to(tl.float32)
            a2 = (f2 * c2).to(dt).to(tl.float32)
            b2 = (f1 * s2).to(dt).to(tl.float32)
            x1 = (a1 + b1).to(dt)
            x2 = (a2 + b2).to(dt)
        if head < HEADS:
            dst = q_ptr + (t * HEADS + head) * D
        else:
            slot = tl.load(slots_ptr + t)
            if head < HEADS + KV_HEADS:
                dst = k_cache_ptr + (slot * KV_HEADS + head - HEADS) * D
            else:
                dst = v_cache_ptr + (slot * KV_HEADS + head - HEADS - KV_HEADS) * D
        tl.store(dst + i, x1.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + half + i, x2.to(q_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul(
        gu_ptr,  # (T, 2 I)
        out_ptr,  # (T, I)
        inner,
        BLOCK: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inner
        g = tl.load(gu_ptr + t * 2 * inner + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + t * 2 * inner + inner + cols, mask=mask, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + t * inner + cols, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


def _norm_warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def add_rms_norm(
    x: torch.Tensor,
    delta: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    *,
    kernel: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + delta), x + delta), as add_rms_norm_reference; x, delta (..., hidden)."""
    if not kernel:
        return add_rms_norm_reference(x, delta, weight, eps)
    hidden = x.shape[-1]
    flat = x.reshape(-1, hidden).contiguous()  # (T, hidden)
    out = torch.empty(flat.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    total = torch.empty_like(flat) if delta is not None else flat  # (T, hidden)
    block = triton.next_power_of_2(hidden)
    _add_rms_norm[(flat.shape[0],)](
        flat,
        delta.reshape(-1, hidden).contiguous() if delta is not None else flat,
        weight,
        out,
        total,
        hidden,
        eps,
        HAS_DELTA=delta is not None,
        BLOCK=block,
        num_warps=_norm_warps(block),
    )
    return out.view(x.shape), total.view(x.shape)


def rope_write_kv(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    slots: torch.Tensor,
    heads: int,
    *,
    kernel: bool,
) -> torch.Tensor:
    """As rope_write_kv_reference: q rotated (T, heads, head_dim); K and V into their slots.

    cache_k and cache_v must be contiguous (slots, kv_heads, head_dim) views.
    """
    if not kernel:
        return rope_write_kv_reference(qkv, cos, sin, cache_k, cache_v, slots, heads)
    kv_heads, head_dim = cache_k.shape[1], cache_k.shape[2]
    tokens = qkv.shape[0]
    q = torch.empty((tokens, heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    _rope_write_kv[(tokens, heads + 2 * kv_heads)](
        qkv.contiguous(),
        cos.contiguous(),
        sin.contiguous(),
        q,
        cache_k,
        cache_v,
        slots,
        HEADS=heads,
        KV_HEADS=kv_heads,
        D=head_dim,
        HALF_PAD=triton.next_power_of_2(head_dim // 2),
        num_warps=1,
    )
    return q


SILU_BLOCK = 1024


def silu_mul(gate_up: torch.Tensor, *, kernel: bool) -> torch.Tensor:
    """As silu_mul_reference: (..., 2 I) -> (..., I)."""
    if not kernel:
        return silu_mul_reference(gate_up)
    inner = gate_up.shape[-1] // 2
    flat = gate_up.reshape(-1, 2 * inner).contiguous()  # (T, 2 I)
    out = torch.empty((flat.shape[0], inner), dtype=gate_up.dtype, device=gate_up.device)
    _silu_mul[(flat.shape[0], triton.cdiv(inner, SILU_BLOCK))](
        flat, out, inner, BLOCK=SILU_BLOCK, num_warps=4
    )
    return out.view(*gate_up.shape[:-1], inner)


def self_check(device: torch.device, dtype: torch.dtype) -> bool:
    """Runs each kernel once against its reference on small shapes; False (with a warning) if
    any disagrees or fails, and the forward then uses the references."""
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

        x, delta, weight = rand(5, 96), rand(5, 96), rand(96)
        heads, kv_heads, head_dim, slots_total = 4, 2, 16, 12
        qkv = rand(5, (heads + 2 * kv_heads) * head_dim)
        angle = torch.rand(5, head_dim // 2, generator=gen).repeat(1, 2) * 6  # (5, head_dim)
        cos, sin = angle.cos().to(device, dtype), angle.sin().to(device, dtype)
        slots = torch.tensor([3, 7, 0, 11, 4], device=device)
        caches = [torch.zeros(2, slots_total, kv_heads, head_dim, device=device, dtype=dtype)]
        caches.append(caches[0].clone())
        pairs = [
            (
                add_rms_norm(x, delta, weight, 1e-5, kernel=True)[0],
                add_rms_norm_reference(x, delta, weight, 1e-5)[0],
            ),
            (silu_mul(qkv, kernel=True), silu_mul_reference(qkv)),
            (
                rope_write_kv(qkv, cos, sin, caches[0][0], caches[0][1], slots, heads, kernel=True),
                rope_write_kv_reference(qkv, cos, sin, caches[1][0], caches[1][1], slots, heads),
            ),
            (caches[0], caches[1]),
        ]
        for got, want in pairs:
            scale = want.float().abs().max().item()
            if (got.float() - want.float()).abs().max().item() > 2e-2 * scale:
                log.warning("fused kernels disagree with the reference; using the torch path")
                return False
        return True
    except Exception:
        log.exception("fused kernels failed their self-check; using the torch path")
        return False
