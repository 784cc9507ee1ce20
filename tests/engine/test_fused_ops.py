"""The fused elementwise kernels (server/engine/fused_ops.py) against their torch references.

Compiled on CUDA; without CUDA under Triton's CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1). Per dtype: the add + RMSNorm (with and without the residual add, a hidden
size that is not a power of two), RoPE with the K/V cache writes (GQA, a head_dim whose half is
not a power of two, slots out of order), and SwiGLU's silu * mul. The references themselves are
checked against the Hugging Face Llama modules they stand for.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama

from loraserve.server.engine import fused_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(
    not fused_ops.available(torch.device(DEVICE)),
    reason="needs Triton: a CUDA device, or Triton's CPU interpreter",
)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _rand(*shape: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    # A rounding step or two of the dtype (the interpreter truncates to bfloat16), relative to
    # the magnitude compared.
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = want.float().abs().max().item()
    assert (got.float() - want.float()).abs().max().item() <= tol * scale


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_delta", [True, False])
@pytest.mark.parametrize("hidden", [64, 200])
def test_add_rms_norm_matches_reference(dtype: torch.dtype, with_delta: bool, hidden: int) -> None:
    x = _rand(3, 4, hidden, dtype=dtype)
    delta = _rand(3, 4, hidden, dtype=dtype, seed=1) if with_delta else None
    weight = _rand(hidden, dtype=dtype, seed=2)
    got_norm, got_sum = fused_ops.add_rms_norm(x, delta, weight, 1e-6, kernel=True)
    want_norm, want_sum = fused_ops.add_rms_norm_reference(x, delta, weight, 1e-6)
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        # Triton's interpreter truncates float32 to bfloat16; compiled code rounds to nearest
        # even, as torch does.
        _close(got_sum, want_sum, dtype)
    else:
        assert torch.equal(got_sum, want_sum)  # the residual add rounds exactly as torch does
    _close(got_norm, want_norm, dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(8, 2, 32), (4, 4, 16), (6, 3, 24)])
def test_rope_write_kv_matches_reference(
    dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int
) -> None:
    tokens, slots_total = 7, 40
    qkv = _rand(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    angle = torch.rand(tokens, head_dim // 2, generator=torch.Generator().manual_seed(3)) * 9
    angle = angle.repeat(1, 2)  # (tokens, head_dim): cat(freqs, freqs), as the model's
    cos, sin = angle.cos().to(DEVICE, dtype), angle.sin().to(DEVICE, dtype)
    slots = torch.tensor([17, 3, 0, 39, 8, 9, 22], device=DEVICE)
    caches = [_rand(2, slots_total, kv_heads, head_dim, dtype=dtype, seed=4) for _ in range(2)]
    got = fused_ops.rope_write_kv(
        qkv, cos, sin, caches[0][0], caches[0][1], slots, heads, kernel=True
    )
    want = fused_ops.rope_write_kv_reference(
        qkv, cos, sin, caches[1][0], caches[1][1], slots, heads
    )
    _close(got, want, dtype)
    # Same slots written, the same values; every other slot untouched.
    assert torch.equal(caches[0][1], caches[1][1])  # V is a copy, bit for bit
    _close(caches[0][0], caches[1][0], dtype)
    untouched = [s for s in range(slots_total) if s not in slots.tolist()]
    assert torch.equal(
        caches[0][:, untouched],
        _rand(2, slots_total, kv_heads, head_dim, dtype=dtype, seed=4)[:, untouched],
    )


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inner", [64, 1500])
def test_silu_mul_matches_reference(dtype: torch.dtype, inner: int) -> None:
    gate_up = _rand(2, 3, 2 * inner, dtype=dtype) * 4
    got = fused_ops.silu_mul(gate_up, kernel=True)
    want = fused_ops.silu_mul_reference(gate_up)
    _close(got, want, dtype)


@needs_kernels
def test_self_check_passes_and_catches_a_wrong_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    assert fused_ops.self_check(torch.device(DEVICE), torch.float32)
    real = fused_ops.silu_mul
    monkeypatch.setattr(fused_ops, "silu_mul", lambda gu, kernel: real(gu, kernel=kernel) * 1.05)
    assert not fused_ops.self_check(torch.device(DEVICE), torch.float32)


def test_self_check_fails_closed_when_a_kernel_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(fused_ops, "add_rms_norm", broken)
    assert not fused_ops.self_check(torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_references_match_the_hf_llama_modules(dtype: torch.dtype) -> None:
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
    )
    norm = modeling_llama.LlamaRMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    x, delta = _rand(2, 3, 64, dtype=dtype), _rand(2, 3, 64, dtype=dtype, seed=1)
    normed, total = fused_ops.add_rms_norm_reference(x.cpu(), delta.cpu(), norm.weight, 1e-5)
    assert torch.equal(total, x.cpu() + delta.cpu())
    assert torch.equal(normed, norm(x.cpu() + delta.cpu()))

    mlp = modeling_llama.LlamaMLP(config).to(dtype)
    h = _rand(2, 3, 64, dtype=dtype, seed=5).cpu()
    with torch.no_grad():
        gate_up = torch.cat([mlp.gate_proj(h), mlp.up_proj(h)], dim=-1)
        assert torch.equal(mlp.down_proj(fused_ops.silu_mul_reference(gate_up)), mlp(h))

    heads, kv_heads, head_dim, tokens = 4, 2, 16, 3
    qkv = _rand(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=6).cpu()
    angle = (torch.arange(tokens)[:, None] * torch.rand(head_dim // 2)).repeat(1, 2)
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    caches = torch.zeros(2, tokens, kv_heads, head_dim, dtype=dtype)
    q = fused_ops.rope_write_kv_reference(
        qkv, cos, sin, caches[0], caches[1], torch.arange(tokens), heads
    )
    q_hf = qkv[:, : heads * head_dim].view(1, tokens, heads, head_dim).transpose(1, 2)
    k_hf = (
        qkv[:, heads * head_dim : (heads + kv_heads) * head_dim]
        .view(1, tokens, kv_heads, head_dim)
        .transpose(1, 2)
    )
    q_want, k_want = modeling_llama.apply_rotary_pos_emb(q_hf, k_hf, cos[None], sin[None])
    assert torch.equal(q, q_want.transpose(1, 2)[0])
    assert torch.equal(caches[0], k_want.transpose(1, 2)[0])
