"""async_decode: each decode step is launched before the previous step's tokens are read, rows
fed from that step's output on the device. Whatever the mix (adapters, seeded sampling, stop
sequences, end of sequence, lengths, logprobs, cancellation, preemption, joins), every request
gets exactly what it gets with steps read one at a time. (async_decode is the default; CI also
runs the whole engine suite with it off: `pytest tests/engine --sync-decode`.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from serving_support import (
    AdapterShape,
    EngineHarness,
    build_test_model,
    make_peft_adapter,
    store_adapter,
)

from loraserve.server.engine.types import ErrorEvent, FinishEvent, LogprobOptions, TokenEvent


@pytest.fixture(scope="module")
def model_and_adapters(model_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    model = build_test_model("llama", model_cache)
    root = tmp_path_factory.mktemp("async")
    adapters = {
        "qv": make_peft_adapter(
            model, root / "qv", AdapterShape(4, 8, ["q_proj", "v_proj"], seed=1)
        ),
        "all": make_peft_adapter(model, root / "all", AdapterShape(8, 16, "all-linear", seed=2)),
    }
    return model, adapters


def _harness(model_and_adapters, data: Path, **overrides: object) -> EngineHarness:
    model, adapters = model_and_adapters
    harness = EngineHarness(model, data, **overrides)
    for name, directory in adapters.items():
        store_adapter(harness.service, "t", name, directory)
    return harness


def _workload(harness: EngineHarness, tokenizer_eos: int) -> list[list]:
    """Fourteen requests: base and both adapters; greedy and seeded sampled; lengths from 1;
    stop sequences; end of sequence honoured; one asking for logprobs."""
    jobs = []
    for i in range(14):
        prompt = [(5 * i + 7 * j) % 250 + 3 for j in range(4 + i % 5)]
        adapter = (None, "qv", "all")[i % 3]
        sampling: dict = {"max_new_tokens": (1, 2, 5, 17, 30)[i % 5]}
        if i % 4 == 1:
            sampling.update(temperature=0.9, top_p=0.95, seed=1000 + i)
        if i % 6 == 2:
            sampling["stop"] = ("e", "a ")
        sampling["ignore_eos"] = i % 2 == 0
        logprobs = LogprobOptions(logprobs=True, top_logprobs=2) if i == 6 else None
        jobs.append(harness.submit(prompt, adapter, logprobs=logprobs, **sampling))
    return jobs


def _outcome(job: list) -> tuple:
    last = job[-1]
    if isinstance(last, ErrorEvent):
        return ("error", last.error.kind)
    assert isinstance(last, FinishEvent)
    streamed = [t for e in job[:-1] if isinstance(e, TokenEvent) for t in e.token_ids]
    text = "".join(e.text for e in job[:-1] if isinstance(e, TokenEvent)) + last.text_delta
    assert streamed + list(last.new_token_ids) == list(last.token_ids), "each token sent once"
    assert text == last.text
    return (
        tuple(last.token_ids),
        last.text,
        last.finish_reason,
        tuple((e.token_id, round(e.logprob, 4)) for e in last.logprobs),
    )


def _run(model_and_adapters, data: Path, *, async_decode: bool, **overrides: object):
    harness = _harness(model_and_adapters, data, async_decode=async_decode, **overrides)
    try:
        jobs = _workload(harness, harness.loaded.tokenizer.eos_token_id)
        harness.run(jobs)
        return [_outcome(j) for j in jobs], harness.engine.scheduler
    finally:
        harness.close()


def test_launching_ahead_changes_no_request(model_and_adapters, tmp_path: Path) -> None:
    synchronous, plain = _run(model_and_adapters, tmp_path / "sync", async_decode=False)
    ahead, scheduler = _run(model_and_adapters, tmp_path / "async", async_decode=True)
    assert plain.launched_ahead == 0
    assert scheduler.launched_ahead > 10, "the async path was meant to run"
    assert ahead == synchronous
    reasons = {o[2] for o in synchronous if o[0] != "error"}
    assert len(reasons) >= 2, f"the workload should end in several ways, got {reasons}"


def test_launching_ahead_under_preemption(model_and_adapters, tmp_path: Path) -> None:
    """A KV pool too small for everyone: requests are preempted (their launched tokens read
    first) and still finish exactly as they do with steps read one at a time."""
    probe = _harness(model_and_adapters, tmp_path / "probe")
    per_block = probe.engine.scheduler.executor.kv.data[:, :, :16].nbytes
    probe.close()
    small = {"kv_cache_bytes": 8 * per_block, "max_seq_len": 48}
    synchronous, _ = _run(model_and_adapters, tmp_path / "sync", async_decode=False, **small)
    ahead, scheduler = _run(model_and_adapters, tmp_path / "async", async_decode=True, **small)
    assert scheduler.preemptions > 0, "the pool was meant to run out"
    assert scheduler.launched_ahead > 0
    assert ahead == synchronous
    allocator = scheduler.executor.allocator
    assert allocator.free_count == allocator.capacity, "every block came back"


def test_a_cancelled_request_leaves_and_the_others_go_on(
    model_and_adapters, tmp_path: Path
) -> None:
    harness = _harness(model_and_adapters, tmp_path / "data", async_decode=True)
    try:
        from loraserve.server.engine.engine import SamplingOverrides
        from loraserve.server.engine.types import ErrorKind

        keep = harness.submit([3, 4, 5], "qv", max_new_tokens=40, ignore_eos=True)
        events: list = []
        handle = harness.engine.submit(
            tenant="t",
            adapter=None,
            prompt_ids=[6, 7, 8],
            sampling=harness.engine.sampling(
                SamplingOverrides(max_new_tokens=200, ignore_eos=True)
            ),
            sink=lambda e: (events.append(e), len(events) == 3 and handle.cancel()),
        )
        harness.run([keep, events])
    finally:
        harness.close()
    assert isinstance(events[-1], ErrorEvent) and events[-1].error.kind == ErrorKind.CANCELLED
    assert isinstance(keep[-1], FinishEvent) and len(keep[-1].token_ids) == 40


def test_the_generic_path_reads_every_step(model_cache: Path, tmp_path: Path) -> None:
    """GPT-2 runs on transformers (no fed tokens): async_decode leaves it synchronous."""
    harness = EngineHarness(build_test_model("gpt2", model_cache), tmp_path, async_decode=True)
    try:
        job = harness.submit([3, 4, 5], None, max_new_tokens=6, ignore_eos=True)
        harness.run([job])
        assert isinstance(job[-1], FinishEvent) and len(job[-1].token_ids) == 6
        assert harness.engine.scheduler.launched_ahead == 0
    finally:
        harness.close()


def test_fed_tokens_read_back_for_the_eager_fallback(model_and_adapters, tmp_path: Path) -> None:
    """A decode step the graphs' page tables cannot hold runs through prefill, which needs
    the fed tokens on the host: they are read from the remembered step, a fault code as 0."""
    import torch

    from loraserve.server.engine.planner import RowPlan, StepPlan

    harness = _harness(model_and_adapters, tmp_path / "data")
    try:
        executor = harness.engine.scheduler.executor
        executor.remember_tokens(torch.tensor([5, -1, 7]))
        rows = tuple(
            RowPlan(slot=i, tokens=(100 + i,), start=3, blocks=(1,), pages=(), feed=feed)
            for i, feed in enumerate((0, -1, 2, 1))
        )
        read = executor._with_tokens_read(StepPlan("decode", rows))
        assert [r.tokens for r in read.rows] == [(5,), (101,), (7,), (0,)]
        assert all(r.feed == -1 for r in read.rows)
    finally:
        harness.close()


def test_a_launched_token_is_read_before_its_request_is_preempted(
    model_and_adapters, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A preempted request recomputes its context from its tokens so far: when the KV pool
    runs out while a step is launched and unread, that step is read first, then the growth
    is planned again and the preemption applied."""
    import torch

    from loraserve.server.engine.planner import GrowthPlan
    from loraserve.server.engine.scheduler import LaunchedDecode

    harness = _harness(model_and_adapters, tmp_path / "data", async_decode=True)
    try:
        scheduler = harness.engine.scheduler
        victim = object()
        order: list[str] = []
        plans = iter([GrowthPlan((victim,), ()), GrowthPlan((victim,), ())])

        def read() -> None:
            order.append("read")
            scheduler._launched = None

        monkeypatch.setattr(scheduler.planner, "plan_growth", lambda *args: next(plans))
        monkeypatch.setattr(scheduler, "_read_launched", read)
        monkeypatch.setattr(
            scheduler, "_preempt", lambda seq: order.append(f"preempt {seq is victim}")
        )
        scheduler._launched = LaunchedDecode(
            batch=[], codes=torch.zeros(0, dtype=torch.long), copied=None, started=0.0
        )
        scheduler._grow_blocks()
        assert order == ["read", "preempt True"]
    finally:
        scheduler._launched = None
        harness.close()
