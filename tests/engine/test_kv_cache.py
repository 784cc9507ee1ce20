"""The generic (transformers) KV path: layer types from public config fields, sliding windows.

`layer_windows` replaces a private transformers helper whose shape changed between releases, so
these tests pin what it reads on every admitted version (CI also runs them on the lowest). The
end-to-end tests drive a Hugging Face model through SlotKVCache (prefill, then decode steps, as
the runner does) with a window small enough to bite, and compare every position's logits with
the model's own full-sequence forward, which applies its own sliding-window mask.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
)

from loraserve.server.engine.kv_cache import ForwardPlan, SlotKVCache, layer_windows

SMALL = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}
WINDOW = 3


def test_llama_and_gpt2_layers_are_full_attention() -> None:
    assert layer_windows(LlamaConfig(**SMALL)) == (["full_attention"] * 3, {"full_attention": None})
    gpt2 = GPT2Config(n_layer=2, n_embd=32, n_head=4)
    assert layer_windows(gpt2) == (["full_attention"] * 2, {"full_attention": None})


def test_mistral_slides_every_layer() -> None:
    kinds, windows = layer_windows(MistralConfig(**SMALL, sliding_window=WINDOW))
    assert kinds == ["sliding_attention"] * 3
    assert windows == {"sliding_attention": WINDOW}
    kinds, windows = layer_windows(MistralConfig(**SMALL, sliding_window=None))
    assert kinds == ["full_attention"] * 3 and windows == {"full_attention": None}


def test_qwen2_slides_from_max_window_layers_and_only_when_enabled() -> None:
    mixed = Qwen2Config(
        **SMALL, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1
    )
    kinds, windows = layer_windows(mixed)
    assert kinds == ["full_attention", "sliding_attention", "sliding_attention"]
    assert windows == {"full_attention": None, "sliding_attention": WINDOW}
    off = Qwen2Config(**SMALL, use_sliding_window=False, sliding_window=WINDOW)
    assert layer_windows(off)[1] == {"full_attention": None}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"layer_types": ["full_attention", "chunked_attention"]}, "chunked_attention"),
        ({"layer_types": ["sliding_attention"], "sliding_window": None}, "positive sliding"),
        ({}, "neither layer_types nor a layer count"),
    ],
)
def test_unsupported_configs_are_refused_at_start(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        layer_windows(SimpleNamespace(**fields))  # type: ignore[arg-type]


def _cache_kwarg(model: torch.nn.Module) -> str:
    return (
        "cache"
        if "cache" in inspect.signature(type(model).forward).parameters
        else ("past_key_values")
    )


def _forward(model, cache: SlotKVCache, tokens: list[int], start: int) -> torch.Tensor:
    """One row's forward at positions start.. through the slot cache (as runner does)."""
    n = len(tokens)
    positions = torch.arange(start, start + n)[None]  # (1, n)
    valid = torch.ones((1, n), dtype=torch.bool)  # (1, n)
    cache.plan = ForwardPlan(
        rows=torch.tensor([0]), write_positions=positions, kv_len=start + n, contiguous=True
    )
    masks = cache.attention_masks(positions, valid, torch.float32)
    try:
        out = model(
            input_ids=torch.tensor([tokens]),  # (1, n)
            attention_mask=masks,
            position_ids=positions,
            use_cache=True,
            **{_cache_kwarg(model): cache},
        )
    finally:
        cache.plan = None
    return out.logits[0]  # (n, vocab)


MAKERS = {
    "mistral-sliding": lambda window: MistralConfig(**SMALL, sliding_window=window),
    "qwen2-mixed": lambda window: Qwen2Config(
        **SMALL, use_sliding_window=window is not None, sliding_window=window, max_window_layers=1
    ),
    "llama-full": lambda window: LlamaConfig(**SMALL),
}


def _model(config: PretrainedConfig) -> torch.nn.Module:
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("arch", sorted(MAKERS))
@torch.inference_mode()
def test_slot_cache_matches_the_models_own_masks(arch: str) -> None:
    config = MAKERS[arch](WINDOW)
    model = _model(config)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, SMALL["vocab_size"], (10,), generator=generator)  # (10,)
    reference = model(input_ids=tokens[None], use_cache=False).logits[0]  # (10, vocab)

    cache = SlotKVCache(
        config, max_rows=1, max_len=16, dtype=torch.float32, device=torch.device("cpu")
    )
    ids = tokens.tolist()
    got = [_forward(model, cache, ids[:6], 0)]  # prefill six tokens
    for position in range(6, 10):  # then decode one at a time
        got.append(_forward(model, cache, [ids[position]], position))
    logits = torch.cat(got)  # (10, vocab)
    scale = float(reference.abs().max())
    torch.testing.assert_close(logits, reference, atol=1e-5 * scale, rtol=1e-5)

    if arch != "llama-full":
        # The window bites: the same weights without it give different late logits.
        full = _model(MAKERS[arch](None))
        full.load_state_dict(model.state_dict())
        unwindowed = full(input_ids=tokens[None], use_cache=False).logits[0]  # (10, vocab)
        torch.testing.assert_close(unwindowed[:WINDOW], reference[:WINDOW])
        assert (unwindowed[WINDOW:] - reference[WINDOW:]).abs().max() > 1e-3 * scale
