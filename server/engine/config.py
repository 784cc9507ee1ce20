"""The engine's own configuration: batching bounds, request limits, adapter tier budgets.

A subset of the server's settings; `ServerConfig.engine_config()` derives it, and the bench and
tests build it the same way (through `loraserve.server.runtime.build_runtime`).
"""

from __future__ import annotations

from dataclasses import dataclass

ATTENTION_BACKENDS = ("sdpa", "triton")
"""Decode attention choices of the own Llama-family forward (EngineConfig.attention)."""


@dataclass(frozen=True)
class EngineConfig:
    """What the engine, its scheduler and its adapter tiers need; nothing about the network."""

    max_batch_size: int = 32
    """Requests running at once (one KV row each)."""
    max_waiting_requests: int = 1024
    """Queue bound; beyond it submissions get RESOURCE_EXHAUSTED."""
    max_batch_tokens: int = 2048
    """Tokens per engine iteration: prompt chunks plus one per decoding request."""
    max_seq_len: int = 2048
    """Longest request, prompt plus completion (also bounded by the model's context)."""
    max_prompt_tokens: int = 4096
    """Longest prompt (also bounded by max_seq_len - 1)."""
    max_new_tokens_limit: int = 1024
    """Largest max_new_tokens a request may ask for."""
    default_max_new_tokens: int = 64
    """max_new_tokens when a request does not set it."""
    max_stop_sequences: int = 8
    """Stop sequences per request, at most."""
    adapter_device_bytes: int = 1 << 30
    """Device tier budget for adapter pages, in bytes."""
    adapter_host_bytes: int = 4 << 30
    """Host-memory tier budget (LRU) for validated adapters, in bytes."""
    price_per_device_hour: float = 0.0
    """Prices each request's attributed compute seconds (Usage.cost)."""
    max_lora_rank: int = 64
    """Largest adapter rank; sizes the fused adapter stacks the CUDA graphs read."""
    kv_cache_bytes: int = 0
    """Paged KV pool (Llama family), in bytes; 0 takes kv_cache_fraction of the device memory
    free after loading on CUDA, and room for max_batch_size full-length requests on CPU."""
    kv_cache_fraction: float = 0.5
    """Share of free device memory the paged KV pool takes when kv_cache_bytes is 0."""
    enforce_eager: bool = False
    """Run without CUDA graphs, decode and prefill alike (debugging)."""
    prefill_graph_tokens: int = 2048
    """Prefills of up to this many padded tokens (rows x tokens per row, padded to the graphs'
    buckets) replay CUDA graphs captured at start, as decode steps do; larger ones, and every
    prefill on CPU or with enforce_eager, run eagerly. 0: no prefill graphs."""
    attention: str = "sdpa"
    """Decode attention of the own forward: "sdpa" or "triton" (ATTENTION_BACKENDS)."""
    lora_overlap: bool = False
    """Each fused projection's adapter shrink runs on a side CUDA stream beside the base matmul
    (both read only the projection's input), the expand after both (server.engine.side_stream).
    Needs CUDA; with the torch adapter path (kernels off or failed their self-check) it does
    nothing. Off by default until measured on a GPU (README "Performance")."""
    async_decode: bool = True
    """Launch each decode step before reading the previous one's tokens (own forward only): the
    host's work on step N (text, stops, events) overlaps the device computing step N+1, whose
    input tokens come from step N's output on the device (on an H200, 1b model, batch 32:
    base rows 6,850 -> 8,833 tokens/s end to end). A step with a row that asks for logprobs
    runs synchronously. False (--no-async-decode) reads every step's tokens before the next."""
    cold_join_hold_seconds: float = 0.02
    """While rows decode, how long a request whose adapter finished loading in the background
    may wait for other queued requests' loads still in flight, so that they join in one prefill
    (each prefill stalls the running rows) instead of one each; 0 admits each at once."""
