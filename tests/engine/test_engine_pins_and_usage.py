"""Engine-level pins and usage: a pinned adapter computes exactly what an unpinned one does, only
finished requests are counted, and work handed to the engine thread fails cleanly once it stops.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from serving_support import AdapterShape, EngineHarness, make_peft_adapter, store_adapter

from loraserve.server.engine.engine import Residency
from loraserve.server.engine.types import (
    AdapterRef,
    EngineError,
    ErrorEvent,
    ErrorKind,
    FinishEvent,
)
from loraserve.testing.tiny_model import default_model_path

TENANT = "t"
PROMPT = [5, 17, 42, 9, 3]


@pytest.fixture(scope="module")
def model_dir(model_cache: Path) -> Path:
    return default_model_path(model_cache)


@pytest.fixture(scope="module")
def adapter_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    shape = AdapterShape(rank=8, alpha=16, targets=["q_proj", "v_proj"], seed=3)
    return make_peft_adapter(model_dir, tmp_path_factory.mktemp("pin-adapter") / "a", shape)


@pytest.fixture
def harness(model_dir: Path, adapter_dir: Path, tmp_path: Path) -> Iterator[EngineHarness]:
    made = EngineHarness(model_dir, tmp_path / "data", price_per_device_hour=7200.0)
    store_adapter(made.service, TENANT, "a", adapter_dir)
    yield made
    made.close()


def generate(harness: EngineHarness, adapter: str | None, **sampling: object) -> list:
    events = harness.submit(PROMPT, adapter, tenant=TENANT, max_new_tokens=6, **sampling)
    harness.run([events])
    return events


def test_a_pinned_adapter_gives_the_same_tokens_as_one_loaded_by_a_request(
    harness: EngineHarness,
) -> None:
    engine = harness.engine
    engine.start()
    key = harness.service.resolve(AdapterRef(TENANT, "a"))
    assert engine.residency(key) is Residency.DISK
    engine.pin(key, follow_latest=True)  # loaded by the pin, on the engine thread
    assert engine.pinned(key) and engine.residency(key) is Residency.DEVICE
    pinned = generate(harness, "a")[-1]
    assert isinstance(pinned, FinishEvent)
    assert engine.unpin(TENANT, "a") and not engine.pinned(key)
    assert not engine.unpin(TENANT, "a")
    # Dropped from every tier (as a delete would), then loaded again by a request.
    engine.device_pool.forget(TENANT, "a")
    engine.host_cache.forget(TENANT, "a")
    engine.scheduler.request_collect()
    unpinned = generate(harness, "a")[-1]
    assert isinstance(unpinned, FinishEvent)
    assert unpinned.token_ids == pinned.token_ids
    base = generate(harness, None)[-1]
    assert isinstance(base, FinishEvent)
    assert base.token_ids != pinned.token_ids, "the adapter must change the output"
    assert harness.engine.usage.get(TENANT, "a").requests == 2


def test_only_finished_requests_are_counted_and_cost_is_priced_like_usage(
    harness: EngineHarness,
) -> None:
    finished = generate(harness, "a")[-1]
    assert isinstance(finished, FinishEvent)
    base = generate(harness, None)[-1]
    assert isinstance(base, FinishEvent)
    missing = generate(harness, "nope")[-1]
    assert isinstance(missing, ErrorEvent)
    totals = harness.engine.usage.get(TENANT, "a")
    assert totals.requests == 1
    assert totals.prompt_tokens == finished.usage.prompt_tokens == len(PROMPT)
    assert totals.completion_tokens == finished.usage.completion_tokens == 6
    assert totals.compute_seconds == finished.usage.compute_seconds > 0
    assert totals.cost == pytest.approx(2 * totals.compute_seconds, rel=1e-9)  # 7200 / hour
    assert len(harness.engine.usage) == 1, "base-model and failed requests count for nobody"


def test_work_for_the_engine_thread_fails_once_it_stops(harness: EngineHarness) -> None:
    generate(harness, None)  # starts the engine thread
    assert harness.engine.scheduler.run_on_engine(lambda: 42).result(30) == 42
    harness.engine.stop(10)
    with pytest.raises(EngineError) as caught:
        harness.engine.scheduler.run_on_engine(lambda: 42)
    assert caught.value.kind is ErrorKind.UNAVAILABLE
    key = harness.service.resolve(AdapterRef(TENANT, "a"))
    with pytest.raises(EngineError) as caught:
        harness.engine.pin(key, follow_latest=True)
    assert caught.value.kind is ErrorKind.UNAVAILABLE
    assert not harness.engine.pinned(key)
