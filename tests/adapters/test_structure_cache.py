"""The structure-check cache: a hit skips only the structure checks, never the value checks, and
nothing that failed is kept."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
import torch
from safetensors.torch import load as load_safetensors_bytes

from loraserve.adapters.errors import AdapterValidationError
from loraserve.adapters.structure_cache import StructureCache, structure_key
from loraserve.adapters.weights import check_structure, load_adapter_weights, lora_keys

if TYPE_CHECKING:
    from conftest import SavedAdapter

MAX_RANK = 64


def _cache(saved: SavedAdapter, entries: int = 4, max_key_bytes: int = 1 << 20) -> StructureCache:
    return StructureCache(
        saved.spec, max_rank=MAX_RANK, entries=entries, max_key_bytes=max_key_bytes
    )


def _same_shape_other_values(saved: SavedAdapter, seed: int) -> bytes:
    """Another adapter of the same shape: byte-identical header, other tensor values."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(v.shape, generator=generator) for k, v in saved.tensors().items()}
    return saved.with_tensors(tensors)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapters_of_one_shape_share_one_checked_structure(
    make_adapter: Callable, arch: str
) -> None:
    saved = make_adapter(arch)
    other = _same_shape_other_values(saved, 1)
    cache = _cache(saved)
    first = cache.check(saved.config_bytes, saved.weights_bytes)
    second = cache.check(saved.config_bytes, other)
    assert second is first and (cache.hits, cache.misses, len(cache)) == (1, 1, 1)
    want = check_structure(saved.config_bytes, other, saved.spec, max_rank=MAX_RANK)
    assert first == want  # what the checks find, field for field
    # The factors read through the kept structure are the second file's own.
    weights = load_adapter_weights(
        saved.config_bytes, other, saved.spec, max_rank=MAX_RANK, structure=second
    )
    other_tensors = load_safetensors_bytes(other)
    for name, (a, b) in weights.modules.items():
        key_a, key_b = lora_keys(name)
        assert torch.equal(a, other_tensors[key_a]) and torch.equal(b, other_tensors[key_b])


def test_a_hit_still_checks_every_value(make_adapter: Callable) -> None:
    saved = make_adapter("llama")
    cache = _cache(saved)
    cache.check(saved.config_bytes, saved.weights_bytes)
    tensors = saved.tensors()
    key = sorted(tensors)[-1]
    tensors[key].view(-1)[-1] = float("nan")
    poisoned = saved.with_tensors(tensors)  # same header, one NaN
    structure = cache.check(saved.config_bytes, poisoned)
    assert cache.hits == 1
    with pytest.raises(AdapterValidationError, match="NaN or Inf") as info:
        load_adapter_weights(
            saved.config_bytes, poisoned, saved.spec, max_rank=MAX_RANK, structure=structure
        )
    assert info.value.field == f"adapter_model.safetensors:{key}"


def test_any_change_to_the_config_or_header_is_checked_again(make_adapter: Callable) -> None:
    saved = make_adapter("llama")
    cache = _cache(saved)
    cache.check(saved.config_bytes, saved.weights_bytes)
    # Another alpha: another config, so another structure (its scale differs).
    scaled = cache.check(saved.with_config(lora_alpha=2), saved.weights_bytes)
    assert cache.misses == 2 and scaled.config.scale == 2 / 4  # alpha / r
    # A header that differs (a tensor renamed) is refused by the full checks, and not kept.
    tensors = saved.tensors()
    key = sorted(tensors)[0]
    tensors[key.replace("lora_A", "lora_X")] = tensors.pop(key)
    for _ in range(2):
        with pytest.raises(AdapterValidationError):
            cache.check(saved.config_bytes, saved.with_tensors(tensors))
    assert len(cache) == 2 and cache.misses == 2


def test_the_oldest_structure_is_dropped_beyond_its_entries(make_adapter: Callable) -> None:
    saved = make_adapter("llama")
    cache = _cache(saved, entries=2)
    configs = [saved.with_config(lora_alpha=alpha) for alpha in (1, 2, 3)]
    for config in configs:
        cache.check(config, saved.weights_bytes)
    assert len(cache) == 2
    cache.check(configs[0], saved.weights_bytes)  # dropped: checked again
    cache.check(configs[2], saved.weights_bytes)  # kept
    assert (cache.hits, cache.misses) == (1, 4)


def test_files_that_cannot_be_keyed_are_checked_every_time(make_adapter: Callable) -> None:
    saved = make_adapter("llama")
    assert structure_key(saved.config_bytes, b"short") is None
    too_long = (1 << 40).to_bytes(8, "little") + b"{}"
    assert structure_key(saved.config_bytes, too_long) is None
    bound = len(saved.config_bytes) + len(saved.weights_bytes)  # more than config + header
    assert structure_key(saved.config_bytes, saved.weights_bytes, bound) is not None
    assert structure_key(saved.config_bytes, saved.weights_bytes, 64) is None
    cache = _cache(saved, max_key_bytes=64)
    for _ in range(2):
        with pytest.raises(AdapterValidationError):
            cache.check(saved.config_bytes, b"short")
        cache.check(saved.config_bytes, saved.weights_bytes)  # valid, but too big to keep
    assert len(cache) == 0 and cache.misses == 2
