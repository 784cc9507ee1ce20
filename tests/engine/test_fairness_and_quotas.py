"""Per-tenant limits (requests, queued tokens, stored adapters and bytes) and fair admission."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from serving_support import (
    AdapterShape,
    EngineHarness,
    build_test_model,
    make_peft_adapter,
    store_adapter,
)

from loraserve.adapters.errors import AdapterQuotaError
from loraserve.server.api.errors import status_for
from loraserve.server.engine.types import EngineError, ErrorKind, FinishEvent


@pytest.fixture(scope="module")
def model(model_cache: Path) -> Path:
    return build_test_model("llama", model_cache)


def test_tenant_request_limit_is_per_tenant(model: Path, tmp_path: Path) -> None:
    harness = EngineHarness(model, tmp_path, tenant_max_requests=2)
    try:
        jobs = [harness.submit([5, 6], None, tenant="heavy", max_new_tokens=4) for _ in range(2)]
        with pytest.raises(EngineError) as err:
            harness.submit([5, 6], None, tenant="heavy", max_new_tokens=4)
        assert err.value.kind is ErrorKind.RESOURCE_EXHAUSTED
        assert (
            "'heavy'" in err.value.message
            and "limit 2, the server default --tenant-max-requests" in err.value.message
        )
        jobs.append(harness.submit([5, 6], None, tenant="light", max_new_tokens=4))
        harness.run(jobs)
        assert all(isinstance(j[-1], FinishEvent) for j in jobs)
        # Finished requests no longer count.
        again = harness.submit([5, 6], None, tenant="heavy", max_new_tokens=4)
        harness.run([again])
        assert isinstance(again[-1], FinishEvent)
    finally:
        harness.close()


def test_tenant_queued_token_limit(model: Path, tmp_path: Path) -> None:
    harness = EngineHarness(model, tmp_path, tenant_max_queued_tokens=40)
    try:
        first = harness.submit([1] * 10, None, tenant="t", max_new_tokens=20)  # 30 tokens
        with pytest.raises(EngineError) as err:
            harness.submit([1] * 10, None, tenant="t", max_new_tokens=20)
        assert (
            err.value.kind is ErrorKind.RESOURCE_EXHAUSTED and "tokens queued" in err.value.message
        )
        # The limit is per tenant: another tenant's request is queued and served.
        other = harness.submit([1] * 10, None, tenant="u", max_new_tokens=20, ignore_eos=True)
        harness.run([first, other])
        assert isinstance(first[-1], FinishEvent), first[-1]
        assert isinstance(other[-1], FinishEvent) and len(other[-1].token_ids) == 20, other[-1]
        # Tokens of a finished request no longer count against its tenant.
        again = harness.submit([1] * 10, None, tenant="t", max_new_tokens=20)
        harness.run([again])
        assert isinstance(again[-1], FinishEvent), again[-1]
    finally:
        harness.close()


def test_a_flooding_tenant_cannot_starve_a_light_one(model: Path, tmp_path: Path) -> None:
    harness = EngineHarness(model, tmp_path, max_batch_size=2)
    admitted: list[str] = []
    scheduler = harness.engine.scheduler
    real_admit = scheduler._admit

    def recording_admit() -> None:
        before = {id(s) for s in scheduler.running}
        real_admit()
        admitted.extend(s.tenant for s in scheduler.running if id(s) not in before)

    scheduler._admit = recording_admit  # type: ignore[method-assign]
    try:
        # The flood is queued first; with plain FIFO the light tenant would start 13th.
        flood = [
            harness.submit([7, 8, 9], None, tenant="flood", max_new_tokens=6, ignore_eos=True)
            for _ in range(12)
        ]
        light = [
            harness.submit([7, 8, 9], None, tenant="light", max_new_tokens=6, ignore_eos=True)
            for _ in range(2)
        ]
        harness.run([*flood, *light])
    finally:
        harness.close()
    assert len(admitted) == 14
    # Each free row goes to the tenant with the fewest running requests: the light tenant's two
    # requests start in the first admissions, not after the flood's backlog.
    assert admitted[:4].count("light") == 2, admitted


def test_adapter_count_and_byte_quotas(model: Path, tmp_path: Path) -> None:
    adapter = make_peft_adapter(model, tmp_path / "a", AdapterShape(4, 8, ["q_proj"], seed=1))
    size = (adapter / "adapter_model.safetensors").stat().st_size
    harness = EngineHarness(model, tmp_path / "d", tenant_max_adapters=2)
    try:
        store_adapter(harness.service, "t", "one", adapter)
        store_adapter(harness.service, "t", "two", adapter)
        with pytest.raises(AdapterQuotaError) as err:
            store_adapter(harness.service, "t", "three", adapter)
        assert "limit 2, the server default --tenant-max-adapters" in str(err.value)
        assert status_for(err.value)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        store_adapter(harness.service, "t", "two", adapter)  # a re-upload replaces: allowed
        store_adapter(harness.service, "other", "three", adapter)  # quotas are per tenant
        assert [r.name for r in harness.service.list("t")] == ["one", "two"]
        assert list((tmp_path / "d" / "adapters" / "tmp").iterdir()) == []
    finally:
        harness.close()
    by_bytes = EngineHarness(model, tmp_path / "e", tenant_max_adapter_bytes=2 * size)
    try:
        store_adapter(by_bytes.service, "t", "one", adapter)
        store_adapter(by_bytes.service, "t", "two", adapter)
        with pytest.raises(AdapterQuotaError) as err:
            store_adapter(by_bytes.service, "t", "three", adapter)
        assert "bytes" in str(err.value)
    finally:
        by_bytes.close()


def test_out_of_memory_fails_only_that_step_with_resource_exhausted(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    harness = EngineHarness(model, tmp_path)
    executor = harness.engine.scheduler.executor
    real = executor.execute
    calls: list[int] = []

    def oom_once(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:  # the first decode step
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(executor, "execute", oom_once)
    try:
        victims = [harness.submit([5, 6, 7], None, max_new_tokens=5) for _ in range(2)]
        harness.run(victims)
        for events in victims:
            error = events[-1].error
            assert error.kind is ErrorKind.RESOURCE_EXHAUSTED and "out of memory" in error.message
        later = harness.submit([5, 6, 7], None, max_new_tokens=5, ignore_eos=True)
        harness.run([later])
        assert isinstance(later[-1], FinishEvent) and len(later[-1].token_ids) == 5
        assert harness.engine.scheduler.running == []
    finally:
        harness.close()


def test_a_tenants_own_request_limits_override_the_defaults(model: Path, tmp_path: Path) -> None:
    harness = EngineHarness(
        model,
        tmp_path,
        limits={"small": {"max_requests": 1}, "thin": {"max_queued_tokens": 40}},
        tenant_max_requests=3,
    )
    try:
        jobs = [harness.submit([5, 6], None, tenant="small", max_new_tokens=4)]
        with pytest.raises(EngineError) as err:
            harness.submit([5, 6], None, tenant="small", max_new_tokens=4)
        assert err.value.kind is ErrorKind.RESOURCE_EXHAUSTED
        assert "limit 1, this tenant's max_requests in the tenants file" in err.value.message
        jobs += [harness.submit([5, 6], None, tenant="big", max_new_tokens=4) for _ in range(3)]
        with pytest.raises(EngineError) as err:
            harness.submit([5, 6], None, tenant="big", max_new_tokens=4)
        assert "limit 3, the server default --tenant-max-requests" in err.value.message
        jobs.append(harness.submit([1] * 10, None, tenant="thin", max_new_tokens=20))  # 30
        with pytest.raises(EngineError) as err:
            harness.submit([1] * 10, None, tenant="thin", max_new_tokens=20)
        assert "would have 60 tokens queued" in err.value.message
        assert "limit 40, this tenant's max_queued_tokens" in err.value.message
        # A reload raises small's limit: the next request is taken while the first still waits.
        harness.limits.update({"small": {"max_requests": 2}})
        jobs.append(harness.submit([5, 6], None, tenant="small", max_new_tokens=4))
        harness.run(jobs)
        assert all(isinstance(j[-1], FinishEvent) for j in jobs), [j[-1] for j in jobs]
    finally:
        harness.close()
