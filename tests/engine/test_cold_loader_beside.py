"""Loads that stage beside the checksum: ColdLoader(read_beside=) and an idle engine's own load
(DevicePool(cold_read=)), both reading through HostCache.get in the engine.

On a disk read the pages are laid out while the checksum is still being computed; they are kept
(staged, or committed) only if the read then returns, the checksum matched. A read that never
calls back (a host-tier hit) is staged after it, as without `read_beside`.
"""

from __future__ import annotations

import pytest
import torch

from loraserve.adapters.config import LoraAdapterConfig
from loraserve.adapters.weights import AdapterWeights
from loraserve.server.engine import cold_loader as cold_loader_module
from loraserve.server.engine.cold_loader import ColdLoader, PageLayout
from loraserve.server.engine.host_cache import BesideChecksum
from loraserve.server.engine.types import AdapterKey, EngineError, ErrorKind

KEY = AdapterKey("t", "a", 1, rank=4)
LAYOUT = PageLayout(page_rank=4, dtype=torch.float32, device=torch.device("cpu"))


def _weights() -> AdapterWeights:
    gen = torch.Generator().manual_seed(3)
    modules = {"q": (torch.randn(4, 8, generator=gen), torch.randn(6, 4, generator=gen))}
    config = LoraAdapterConfig(rank=4, alpha=8.0, use_rslora=False, target_modules=["q"], raw={})
    return AdapterWeights(config=config, modules=modules)


@pytest.fixture
def stage_calls(monkeypatch: pytest.MonkeyPatch) -> list[AdapterKey]:
    calls: list[AdapterKey] = []
    real = cold_loader_module.stage

    def counting(key, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(key)
        return real(key, *args, **kwargs)

    monkeypatch.setattr(cold_loader_module, "stage", counting)
    return calls


def _run(read_beside) -> ColdLoader:  # type: ignore[no-untyped-def]
    def plain_read(key: AdapterKey) -> AdapterWeights:
        raise AssertionError("with read_beside the plain read is not used")

    loader = ColdLoader(plain_read, LAYOUT, read_beside=read_beside)
    assert loader.start(KEY)
    loader.wait(KEY)
    return loader


def test_a_disk_read_is_staged_once_beside_its_checksum(stage_calls: list) -> None:
    weights = _weights()

    def read(key: AdapterKey, *, beside_checksum: BesideChecksum) -> AdapterWeights:
        beside_checksum(weights)
        return weights  # the checksum matched

    loader = _run(read)
    try:
        staged = loader.take_staged(KEY)
        assert staged is not None and stage_calls == [KEY], "staged once, in the callback"
        arena, shapes, plan = cold_loader_module.lay_out(weights, 4, 1, torch.float32, pin=False)
        reference, _ = cold_loader_module.plan_views(arena, shapes, plan, 1, 4)
        assert torch.equal(staged.modules["q"][0], reference["q"][0])
        assert torch.equal(staged.modules["q"][1], reference["q"][1])
    finally:
        loader.close()


def test_a_checksum_mismatch_after_staging_keeps_nothing(stage_calls: list) -> None:
    def read(key: AdapterKey, *, beside_checksum: BesideChecksum) -> AdapterWeights:
        beside_checksum(_weights())
        raise EngineError(ErrorKind.INTERNAL, "adapter 'a' is unusable (see the server log)")

    loader = _run(read)
    try:
        assert stage_calls == [KEY], "the pages were laid out before the mismatch was known"
        assert loader.staged(KEY) is None and loader.staged_keys() == []
        error = loader.take_error(KEY)
        assert error is not None and error.kind is ErrorKind.INTERNAL
    finally:
        loader.close()


def test_a_read_that_never_calls_back_is_staged_after_it(stage_calls: list) -> None:
    weights = _weights()

    def read(key: AdapterKey, *, beside_checksum: BesideChecksum) -> AdapterWeights:
        return weights  # a host-tier hit: validated and verified long ago

    loader = _run(read)
    try:
        assert loader.take_staged(KEY) is not None and stage_calls == [KEY]
    finally:
        loader.close()


def _pool(read_beside):  # type: ignore[no-untyped-def]
    from torch import nn

    from loraserve.server.engine.device_pool import DevicePool
    from loraserve.server.engine.lora import LoRAContext, MultiLoRALinear

    layers = {"q": MultiLoRALinear(nn.Linear(8, 6), context=LoRAContext())}

    def plain_read(key: AdapterKey) -> AdapterWeights:
        raise AssertionError("with cold_read the plain loader is not used")

    return DevicePool(
        layers, budget_bytes=1 << 20, loader=plain_read, page_rank=4, cold_read=read_beside
    ), layers["q"]


def test_an_idle_engines_own_load_stages_beside_the_checksum_too(stage_calls: list) -> None:
    """DevicePool.acquire with nothing staged loads on the calling thread (an idle engine):
    through cold_read, laid out beside the checksum, then committed."""
    weights = _weights()

    def read(key: AdapterKey, *, beside_checksum: BesideChecksum) -> AdapterWeights:
        beside_checksum(weights)
        return weights

    pool, layer = _pool(read)
    try:
        placement = pool.acquire(KEY)
        assert stage_calls == [KEY] and pool.resident() == {KEY: 1}
        assert layer.lora_a is not None
        assert torch.equal(layer.lora_a[placement.pages[0]], weights.modules["q"][0])
    finally:
        pool.close()


def test_an_idle_engines_load_with_a_checksum_mismatch_commits_nothing(
    stage_calls: list,
) -> None:
    def read(key: AdapterKey, *, beside_checksum: BesideChecksum) -> AdapterWeights:
        beside_checksum(_weights())
        raise EngineError(ErrorKind.INTERNAL, "adapter 'a' is unusable (see the server log)")

    pool, layer = _pool(read)
    try:
        with pytest.raises(EngineError) as err:
            pool.acquire(KEY)
        assert err.value.kind is ErrorKind.INTERNAL and stage_calls == [KEY]
        assert pool.resident() == {} and not layer.occupied
    finally:
        pool.close()
