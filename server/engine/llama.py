"""Own forward for the Llama family: Llama 2/3/3.x, Mistral, Qwen2 (in the style of gpt-fast).

Reads the Hugging Face config and the safetensors weights directly (no transformers modelling
code), fuses q/k/v and gate/up into one matmul each, and runs RMSNorm, RoPE (default, linear
and llama3 scaling) and grouped-query attention over a paged KV cache (server.engine.paged_kv).
Biases are taken wherever the checkpoint has them (Qwen2's q/k/v bias, Llama's
attention_bias / mlp_bias). Mistral's sliding window masks keys older than the window.

The module tree mirrors the checkpoint's names (model.layers.N.self_attn.q_proj, ...), each
target projection a MultiLoRALinear whose W0 is a view into the fused weight, so adapters are
validated and paged per target module exactly as for the generic path; their page stacks are
views into one LoRAGroup per fused projection, and the multi-LoRA term runs fused too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from loraserve.server.engine import fused_ops, lora_kernels, paged_attention
from loraserve.server.engine.attention_backends import prefill_attention
from loraserve.server.engine.lora import LiveIndex, LoRAContext, LoRAGroup, MultiLoRALinear
from loraserve.server.engine.side_stream import Beside

FAMILY = ("llama", "mistral", "qwen2")


def _rope_params(config) -> dict:
    """RoPE settings, whichever way this transformers version stores them."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict):
        params = {**scaling, **params}
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def unsupported_reason(config) -> str | None:
    """None when the own forward runs this config; else why (the generic path takes it)."""
    if config.model_type not in FAMILY:
        return f"model_type {config.model_type!r} is not in the Llama family"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r}"
    rope = _rope_params(config)
    if rope["rope_type"] not in ("default", "linear", "llama3"):
        return f"rope type {rope['rope_type']!r}"
    if float(getattr(config, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
        return "partial rotary embeddings"
    if config.model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        return "Qwen2 sliding window layers"
    return None


@dataclass(frozen=True)
class LlamaShape:
    """What the forward needs from the config."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    window: int | None
    """Mistral's sliding window (keys older than this many positions are masked)."""
    max_positions: int

    @classmethod
    def from_config(cls, config) -> LlamaShape:
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        window = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
        return cls(
            vocab=int(config.vocab_size),
            hidden=int(config.hidden_size),
            layers=int(config.num_hidden_layers),
            heads=heads,
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            intermediate=int(config.intermediate_size),
            eps=float(config.rms_norm_eps),
            window=int(window) if window else None,
            max_positions=int(config.max_position_embeddings),
        )


def rope_inv_freq(config, head_dim: int) -> torch.Tensor:
    """(head_dim / 2,) float32 inverse frequencies, scaled as the config says."""
    params = _rope_params(config)
    base = float(params["rope_theta"])
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = params["rope_type"]
    if kind == "linear":
        inv = inv / float(params["factor"])
    elif kind == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv = torch.where(medium, smoothed, scaled)
    return inv


class RMSNorm(nn.Module):
    """Holds a norm's weight; the forward applies it through fused_ops.add_rms_norm."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_ops.add_rms_norm_reference(x, None, self.weight, self.eps)[0]


@dataclass
class StepInputs:
    """Device tensors of one forward, batch rows padded to a common width `seq`."""

    input_ids: torch.Tensor
    """(batch, seq) int64; padding is any valid token."""
    positions: torch.Tensor
    """(batch, seq) int64 position of each token; padding 0."""
    block_tables: torch.Tensor
    """(batch, blocks) int64 each row's KV blocks in order; padding block 0 (scratch)."""
    valid: torch.Tensor
    """(batch, seq) bool: False for padding, whose K/V go to the scratch block."""
    page_table: torch.Tensor | None
    """(batch, n) int64 each row's adapter pages, 0-padded; None runs no adapter term."""
    lora_kinds: frozenset[str] | None = None
    """Group kinds (GROUP_KINDS) whose adapter term runs; None: all. The executor leaves out
    kinds where none of the rows' pages is live (LiveIndex), which then cost nothing."""


class PagedKV:
    """K and V of every layer in blocks of `block_size` tokens; block 0 is scratch."""

    def __init__(self, shape: LlamaShape, num_blocks: int, block_size: int, dtype, device) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        # (layers, 2, blocks * block_size, kv_heads, head_dim): flat slots, one write per layer.
        self.data = torch.zeros(
            (shape.layers, 2, num_blocks * block_size, shape.kv_heads, shape.head_dim),
            dtype=dtype,
            device=device,
        )

    @staticmethod
    def bytes_per_block(shape: LlamaShape, block_size: int, itemsize: int) -> int:
        return shape.layers * 2 * block_size * shape.kv_heads * shape.head_dim * itemsize


GROUP_KINDS = ("qkv", "o", "gate_up", "down")
"""The fused projections of a layer, each one LoRAGroup: q/k/v, o, gate/up, down."""
ATTENTION_KINDS = frozenset({"qkv", "o"})
"""The kinds adapters of the attention projections alone use (PEFT's default for Llama)."""


class Attention(nn.Module):
    def __init__(self, shape: LlamaShape, context: LoRAContext, index: LiveIndex) -> None:
        super().__init__()
        self.shape = shape
        q_out, kv_out = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
        self.q_proj = MultiLoRALinear(nn.Linear(shape.hidden, q_out), context=context)
        self.k_proj = MultiLoRALinear(nn.Linear(shape.hidden, kv_out), context=context)
        self.v_proj = MultiLoRALinear(nn.Linear(shape.hidden, kv_out), context=context)
        self.o_proj = MultiLoRALinear(nn.Linear(q_out, shape.hidden), context=context)
        self.qkv = LoRAGroup([self.q_proj, self.k_proj, self.v_proj], kind="qkv", index=index)
        self.o = LoRAGroup([self.o_proj], kind="o", index=index)
        self.qkv_weight: torch.Tensor | None = None  # (q_out + 2 kv_out, hidden)
        self.qkv_bias: torch.Tensor | None = None  # (q_out + 2 kv_out,)


class MLP(nn.Module):
    def __init__(self, shape: LlamaShape, context: LoRAContext, index: LiveIndex) -> None:
        super().__init__()
        inter = shape.intermediate
        self.gate_proj = MultiLoRALinear(nn.Linear(shape.hidden, inter), context=context)
        self.up_proj = MultiLoRALinear(nn.Linear(shape.hidden, inter), context=context)
        self.down_proj = MultiLoRALinear(nn.Linear(inter, shape.hidden), context=context)
        self.gate_up = LoRAGroup([self.gate_proj, self.up_proj], kind="gate_up", index=index)
        self.down = LoRAGroup([self.down_proj], kind="down", index=index)
        self.gate_up_weight: torch.Tensor | None = None  # (2 inter, hidden)
        self.gate_up_bias: torch.Tensor | None = None


class DecoderLayer(nn.Module):
    def __init__(self, shape: LlamaShape, context: LoRAContext, index: LiveIndex) -> None:
        super().__init__()
        self.self_attn = Attention(shape, context, index)
        self.mlp = MLP(shape, context, index)
        self.input_layernorm = RMSNorm(shape.hidden, shape.eps)
        self.post_attention_layernorm = RMSNorm(shape.hidden, shape.eps)


class Backbone(nn.Module):
    def __init__(self, shape: LlamaShape, context: LoRAContext, index: LiveIndex) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(shape.vocab, shape.hidden)
        self.layers = nn.ModuleList(
            DecoderLayer(shape, context, index) for _ in range(shape.layers)
        )
        self.norm = RMSNorm(shape.hidden, shape.eps)


@dataclass(frozen=True)
class AdapterPath:
    """How one forward runs each projection's adapter term."""

    kernels: bool = False
    """The Triton BGMV kernels read the pages in place (CUDA, stacks reserved); else the torch
    reference (gather + bmm), which is also the CPU path."""
    reuse_key: object = None
    """The torch path's key for reusing gathered factors (LlamaForCausalLM.lora_reuse_key)."""
    side: Beside | None = None
    """With kernels: run each shrink on this side stream beside the base matmul."""


def _project(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    group: LoRAGroup,
    page_table: torch.Tensor | None,
    path: AdapterPath,
) -> torch.Tensor:
    """x: (batch, seq, d_in) -> W x (+ bias) + each row's adapter term, (batch, seq, d_out).

    page_table: each row's pages, (batch, n); with path.kernels, each token's, (batch * seq, n)
    (the forward repeats a prefill's table once for all its projections).
    """
    if page_table is None or group.a is None or group.b is None:
        return F.linear(x, weight, bias)
    if not path.kernels:
        y = F.linear(x, weight, bias)
        return y + group.delta(x, page_table, path.reuse_key).to(y.dtype)
    batch, seq, d_in = x.shape
    flat_x = x.reshape(batch * seq, d_in).contiguous()  # (T, d_in)
    if path.side is None:
        y = F.linear(x, weight, bias)
        flat_y = y.view(batch * seq, -1)  # (T, d_out), updated in place
        lora_kernels.add_lora(
            flat_y, flat_x, group.a, group.b, group.segment, page_table, group.live
        )
        return y
    # The shrink and W0 x both only read x: the shrink runs beside the matmul, into a buffer
    # allocated here on the current stream (see side_stream).
    xa = lora_kernels.shrink_buffer(flat_x, group.a, page_table)  # (splits, T, n, M, R)
    with path.side.beside():
        lora_kernels.shrink(xa, flat_x, group.a, page_table, group.live)
    y = F.linear(x, weight, bias)
    path.side.join()
    flat_y = y.view(batch * seq, -1)  # (T, d_out), updated in place
    lora_kernels.expand(flat_y, xa, group.b, group.segment, page_table, group.live)
    return y


class LlamaForCausalLM(nn.Module):
    """The whole model; `forward` runs one step over a paged KV cache and returns logits."""

    def __init__(self, config, context: LoRAContext) -> None:
        super().__init__()
        self.config = config
        self.shape = LlamaShape.from_config(config)
        self.lora_index = LiveIndex()
        """Which pages are live in each group kind, over all layers (the executor's step
        inputs name the kinds to run from it)."""
        self.model = Backbone(self.shape, context, self.lora_index)
        self.lm_head = nn.Linear(self.shape.hidden, self.shape.vocab, bias=False)
        inv = rope_inv_freq(config, self.shape.head_dim)
        self.register_buffer("inv_freq", inv, persistent=False)  # (head_dim / 2,) float32
        self.lora_reuse_key: object = None
        """Set by the executor for a CPU decode step: identifies the rows' adapter routing, so
        the torch path reuses its gathered factors while the batch is unchanged."""
        self.lora_kernels = False
        """Run the adapter term with the Triton kernels (set by the executor once the page
        stacks are reserved and the kernels passed their self-check)."""
        self.lora_side: Beside | None = None
        """With lora_kernels: each projection's shrink runs on this stream beside its base matmul
        (set by the executor under --lora-overlap)."""
        self.paged_attention = False
        """Decode steps (one token per row) attend with paged_attention.decode instead of SDPA."""
        self.fused_ops = False
        """Norms, RoPE with the KV writes, and silu * mul as the Triton kernels of fused_ops (set
        by the executor where they run and passed their self-check); else their torch
        references."""

    def groups(self) -> list[LoRAGroup]:
        out: list[LoRAGroup] = []
        for layer in self.model.layers:
            out += [layer.self_attn.qkv, layer.self_attn.o, layer.mlp.gate_up, layer.mlp.down]
        return out

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos and sin per token, each (batch * seq, head_dim) in dtype."""
        freqs = positions.reshape(-1, 1).float() * self.inv_freq  # (batch * seq, head_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (batch * seq, head_dim)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, step: StepInputs, kv: PagedKV) -> torch.Tensor:
        """Returns hidden states (batch, seq, hidden) after the final norm."""
        s = self.shape
        batch, seq = step.input_ids.shape
        x = self.model.embed_tokens(step.input_ids)  # (batch, seq, hidden)
        cos, sin = self._rope(step.positions, x.dtype)  # (batch * seq, head_dim) each
        bs = kv.block_size
        block = step.positions // bs
        slot = step.block_tables.gather(1, block.clamp(max=step.block_tables.shape[1] - 1))
        slots = torch.where(step.valid, slot * bs + step.positions % bs, 0).reshape(-1)
        span = step.block_tables.shape[1] * bs
        group = s.heads // s.kv_heads
        kernel_decode = self.paged_attention and seq == 1
        if kernel_decode:
            decode_positions = step.positions[:, 0].contiguous()  # (batch,)
        else:
            key_pos = torch.arange(span, device=x.device)  # (span,)
            q_pos = step.positions[:, :, None]  # (batch, seq, 1)
            allowed = key_pos <= q_pos  # (batch, seq, span)
            if s.window is not None:
                allowed = allowed & (key_pos > q_pos - s.window)
            # Additive, in the activations' dtype, built once per step: SDPA would otherwise
            # turn a bool mask into this in every layer. Every query allows at least its own key.
            bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
            bias.masked_fill_(~allowed, float("-inf"))  # (batch, seq, span)
            # Queries of one KV head side by side along the query axis: GQA without repeating K/V.
            mask = bias[:, None, None].expand(batch, 1, group, seq, span)
            mask = mask.reshape(batch, 1, group * seq, span)
            flat_blocks = step.block_tables.reshape(-1)  # (batch * blocks,): rows' blocks in order
        q_out = s.heads * s.head_dim
        kinds = step.lora_kinds
        kern = self.lora_kernels
        path = AdapterPath(kern, self.lora_reuse_key, self.lora_side if kern else None)
        table = step.page_table  # (batch, n)
        if kern and table is not None and seq > 1:
            table = table.repeat_interleave(seq, 0)  # (batch * seq, n): each token's pages
        tables = {kind: table if kinds is None or kind in kinds else None for kind in GROUP_KINDS}
        fused = self.fused_ops
        layers = self.model.layers
        norms = [layer.input_layernorm for layer in layers[1:]] + [self.model.norm]
        # The residual stream x is added to and normed in one step (add_rms_norm): h is the
        # normed input of the next projection.
        first = layers[0].input_layernorm
        h, x = fused_ops.add_rms_norm(x, None, first.weight, first.eps, kernel=fused)
        with prefill_attention(x.device, seq):  # no cuDNN plan builds at new prefill shapes
            for i, layer in enumerate(layers):
                attn = layer.self_attn
                qkv = _project(h, attn.qkv_weight, attn.qkv_bias, attn.qkv, tables["qkv"], path)
                q = fused_ops.rope_write_kv(
                    qkv.view(batch * seq, -1),
                    cos,
                    sin,
                    kv.data[i, 0],  # (slots, kv_heads, head_dim)
                    kv.data[i, 1],
                    slots,
                    s.heads,
                    kernel=fused,
                ).view(batch, seq, s.heads, s.head_dim)
                if kernel_decode:
                    o = paged_attention.decode(
                        q.view(batch, s.heads, s.head_dim),
                        kv.data[i, 0],
                        kv.data[i, 1],
                        step.block_tables,
                        decode_positions,
                        s.window,
                        bs,
                    ).view(batch, seq, q_out)  # (batch, 1, heads * head_dim)
                else:
                    # Each row's blocks, K and V each in one index_select along dim 0 (whole blocks,
                    # contiguous rows: a vectorized copy on CUDA, memcpy on CPU).
                    paged = kv.data[i].view(2, -1, bs * s.kv_heads * s.head_dim)  # (2, blocks, ..)
                    keys, values = (
                        paged[j]
                        .index_select(0, flat_blocks)
                        .view(batch, span, s.kv_heads, s.head_dim)
                        .transpose(1, 2)  # (batch, kv_heads, span, head_dim)
                        for j in (0, 1)
                    )
                    qg = q.view(batch, seq, s.kv_heads, group, s.head_dim).permute(0, 2, 3, 1, 4)
                    qg = qg.reshape(batch, s.kv_heads, group * seq, s.head_dim)
                    o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask)
                    o = o.view(batch, s.kv_heads, group, seq, s.head_dim).permute(0, 3, 1, 2, 4)
                    o = o.reshape(batch, seq, q_out)  # (batch, seq, heads * head_dim)
                o_proj = attn.o_proj.base_layer
                attn_out = _project(o, o_proj.weight, o_proj.bias, attn.o, tables["o"], path)
                post = layer.post_attention_layernorm
                h, x = fused_ops.add_rms_norm(x, attn_out, post.weight, post.eps, kernel=fused)
                mlp = layer.mlp
                gu = _project(
                    h,
                    mlp.gate_up_weight,
                    mlp.gate_up_bias,
                    mlp.gate_up,
                    tables["gate_up"],
                    path,
                )
                act = fused_ops.silu_mul(gu, kernel=fused)  # (batch, seq, intermediate)
                down = mlp.down_proj.base_layer
                mlp_out = _project(act, down.weight, down.bias, mlp.down, tables["down"], path)
                h, x = fused_ops.add_rms_norm(
                    x, mlp_out, norms[i].weight, norms[i].eps, kernel=fused
                )
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (batch, hidden) -> (batch, vocab) float32."""
        return self.lm_head(hidden).float()


def _read_checkpoint(model_path: Path) -> dict[str, torch.Tensor]:
    index = model_path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(model_path / name), device="cpu"))
    return tensors


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def load_llama(
    model_path: Path, config, dtype: torch.dtype, device: torch.device, context: LoRAContext
) -> LlamaForCausalLM:
    """Builds the model on `device` from the checkpoint's safetensors files."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config, context)
    tensors = _read_checkpoint(model_path)

    def take(name: str) -> torch.Tensor | None:
        t = tensors.pop(name, None)
        return None if t is None else t.to(device=device, dtype=dtype)

    def need(name: str) -> torch.Tensor:
        t = take(name)
        if t is None:
            raise KeyError(f"checkpoint has no tensor {name!r}")
        return t

    def fuse(prefix: str, names: list[str], members: list[MultiLoRALinear]):
        weights = [need(f"{prefix}.{n}.weight") for n in names]
        biases = [take(f"{prefix}.{n}.bias") for n in names]
        fused = torch.cat(weights, dim=0)  # (sum(d_out), d_in)
        del weights
        has_bias = any(b is not None for b in biases)
        fused_bias = None
        if has_bias:
            fused_bias = torch.cat(
                [
                    b if b is not None else fused.new_zeros(m.out_features)
                    for b, m in zip(biases, members, strict=True)
                ]
            )
        offset = 0
        for member in members:
            out = member.out_features
            base = member.base_layer
            base.weight = _param(fused[offset : offset + out])  # view: W0 is stored once
            base.bias = _param(fused_bias[offset : offset + out]) if has_bias else None
            offset += out
        return fused, fused_bias

    prefix = "model"
    model.model.embed_tokens.weight = _param(need(f"{prefix}.embed_tokens.weight"))
    model.model.norm.weight = _param(need(f"{prefix}.norm.weight"))
    head = take("lm_head.weight")
    model.lm_head.weight = _param(head if head is not None else model.model.embed_tokens.weight)
    for i, layer in enumerate(model.model.layers):
        p = f"{prefix}.layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_weight, attn.qkv_bias = fuse(
            f"{p}.self_attn",
            ["q_proj", "k_proj", "v_proj"],
            [attn.q_proj, attn.k_proj, attn.v_proj],
        )
        fuse(f"{p}.self_attn", ["o_proj"], [attn.o_proj])
        mlp.gate_up_weight, mlp.gate_up_bias = fuse(
            f"{p}.mlp", ["gate_proj", "up_proj"], [mlp.gate_proj, mlp.up_proj]
        )
        fuse(f"{p}.mlp", ["down_proj"], [mlp.down_proj])
        layer.input_layernorm.weight = _param(need(f"{p}.input_layernorm.weight"))
        layer.post_attention_layernorm.weight = _param(need(f"{p}.post_attention_layernorm.weight"))
        for group in (attn.qkv, attn.o, mlp.gate_up, mlp.down):
            group.segment = (
                group.segment.to(device)
                if group.segment.device.type != "meta"
                else (
                    torch.tensor(
                        [j for j, out in enumerate(group.outs) for _ in range(out)],
                        dtype=torch.long,
                        device=device,
                    )
                )
            )
    model.inv_freq = rope_inv_freq(config, model.shape.head_dim).to(device)
    model.eval()
    model.requires_grad_(False)
    return model
