"""Prefill graphs (server.engine.prefill_graphs): the smallest graph that holds a prefill group,
and, captured with an eager stand-in on CPU, the same logits and KV as the eager prefill.

CUDA graph capture itself needs a GPU (the decode graphs' capture, which these share, is
checked on CUDA by tests/engine/test_cuda.py, and the executor compares one prefill graph with
the eager prefill at start); what these check is everything around it: the buckets, the padding
rows and tokens, the fixed KV span, the page-table widths and kinds, the static buffer and the
shared output, against the eager prefill on the same executor.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch
from serving_support import (
    AdapterShape,
    EngineHarness,
    build_test_model,
    eager_capture,
    make_peft_adapter,
    store_adapter,
)

from loraserve.server.engine.llama import ATTENTION_KINDS, LlamaForCausalLM
from loraserve.server.engine.planner import BLOCK_SIZE, RowPlan, StepPlan, blocks_for
from loraserve.server.engine.prefill_graphs import PrefillGraphs, prefill_shapes
from loraserve.server.engine.types import AdapterRef, FinishEvent, TokenEvent


def _row(tokens: int, start: int = 0, pages: tuple[int, ...] = ()) -> RowPlan:
    return RowPlan(slot=0, tokens=(1,) * tokens, start=start, blocks=(), pages=pages)


# ---- bucketing, without a model ----------------------------------------------------------------


def test_shapes_stay_within_the_token_budget_and_the_longest_request() -> None:
    shapes = prefill_shapes(256, 128)
    assert all(b * s <= 256 and s <= 128 for b, s in shapes)
    assert (8, 32) in shapes and (2, 128) in shapes and (4, 128) not in shapes
    assert shapes[0][0] * shapes[0][1] == 256  # largest first
    assert prefill_shapes(0, 128) == []
    # Seq buckets up to the first that holds the longest request: 100 tokens fit in 128.
    assert {s for _, s in prefill_shapes(2048, 100)} == {32, 64, 128}
    assert {s for _, s in prefill_shapes(2048, 20)} == {32}


def test_the_smallest_graph_that_holds_the_group_is_chosen() -> None:
    graphs = PrefillGraphs(prefill_shapes(512, 256), [0, 2, 8], torch.device("cpu"))
    graphs.capture_all(lambda key: torch.zeros(key[0], 5), eager_capture)
    assert graphs.span == blocks_for(256)
    assert graphs.key_for([_row(20)], 0, None) == (1, 32, 0, None)
    assert graphs.key_for([_row(20), _row(33), _row(5)], 0, None) == (4, 64, 0, None)
    assert graphs.key_for([_row(200)], 0, None) == (1, 256, 0, None)
    # A gRPC-sized wave of 10 arrivals pads to 12 rows, not 16.
    assert graphs.key_for([_row(20)] * 10, 0, None) == (12, 32, 0, None)
    assert graphs.key_for([_row(20)] * 13, 0, None) == (16, 32, 0, None)
    # Widths round up to a captured one; attention-only adapters get their variant.
    assert graphs.key_for([_row(9)], 1, frozenset({"qkv"})) == (1, 32, 2, ATTENTION_KINDS)
    assert graphs.key_for([_row(9)], 3, frozenset({"qkv", "down"})) == (1, 32, 8, None)
    # Eager: more rows or tokens than any graph, a wider table, a row past the KV span.
    assert graphs.key_for([_row(40)] * 9, 0, None) is None
    assert graphs.key_for([_row(300)], 0, None) is None
    assert graphs.key_for([_row(9)], 9, frozenset({"qkv"})) is None
    assert graphs.key_for([_row(9, start=250)], 0, None) is None
    assert graphs.key_for([_row(9, start=240)], 0, None) == (1, 32, 0, None)
    graphs.clear()
    assert graphs.key_for([_row(20)], 0, None) is None


# ---- against the eager prefill, on the engine's own executor ------------------------------------


@pytest.fixture(scope="module")
def harness(model_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("prefill-graphs")
    model_dir = build_test_model("llama", model_cache)
    harness = EngineHarness(model_dir, tmp / "data")
    model = harness.loaded.model
    assert isinstance(model, LlamaForCausalLM)
    executor = harness.engine.scheduler.executor
    # As on CUDA: the stacks reserved at start, so adapter graphs exist too.
    for group in model.groups():
        group.reserve(executor._settings.adapter_pages, executor._settings.page_rank)
    shapes = {
        "qv": AdapterShape(rank=4, alpha=8, targets=["q_proj", "v_proj"], seed=1),
        "all": AdapterShape(rank=12, alpha=16, targets=["q_proj", "o_proj", "down_proj"], seed=2),
    }
    for name, shape in shapes.items():
        store_adapter(harness.service, "t", name, make_peft_adapter(model_dir, tmp / name, shape))
    # Smaller shapes than the settings give: quick to capture, and a 70-token row stays eager.
    executor.prefill_graphs = PrefillGraphs(
        prefill_shapes(256, 64), executor._graph_widths(), torch.device("cpu")
    )
    executor.prefill_graphs.capture_all(executor._static_prefill_forward, eager_capture)
    yield harness
    harness.close()


def _pages(harness: EngineHarness, name: str) -> tuple[int, ...]:
    pool = harness.engine.device_pool
    return tuple(pool.acquire(harness.service.resolve(AdapterRef("t", name))).pages)


def _rows(harness: EngineHarness, specs: list[tuple[int, int, str | None]]) -> list[RowPlan]:
    """Rows of (prompt length, start, adapter), each in fresh KV blocks, distinct tokens."""
    allocator = harness.engine.scheduler.executor.allocator
    rows = []
    for i, (length, start, adapter) in enumerate(specs):
        blocks = allocator.allocate(blocks_for(start + length + 1))
        assert blocks is not None
        tokens = tuple(3 + (7 * i + 5 * j) % 90 for j in range(length))
        pages = _pages(harness, adapter) if adapter else ()
        rows.append(RowPlan(slot=i, tokens=tokens, start=start, blocks=tuple(blocks), pages=pages))
    return rows


def _free(harness: EngineHarness, rows: list[RowPlan]) -> None:
    for row in rows:
        harness.engine.scheduler.executor.allocator.free(list(row.blocks))


@pytest.mark.parametrize(
    "specs",
    [
        [(12, 0, None)],
        [(12, 0, "qv")],
        [(5, 0, "qv"), (31, 0, None), (17, 0, "all")],  # 3 rows: a padding row in bucket 4
        [(40, 0, "all"), (9, 0, None)],
        [(6, 16, "qv")],  # a later chunk of a prompt (its first 16 positions already cached)
    ],
    ids=["one-base", "one-adapter", "mixed-three", "two-padded", "later-chunk"],
)
def test_graph_prefill_gives_the_eager_logits_and_kv(harness: EngineHarness, specs) -> None:
    executor = harness.engine.scheduler.executor
    rows = _rows(harness, specs)
    try:
        plan = StepPlan("prefill", tuple(rows))
        # The KV slots the prefill writes: each row's fed positions.
        index = torch.tensor(
            [
                r.blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
                for r in rows
                for p in range(r.start, r.start + len(r.tokens))
            ]
        )
        want = executor._prefill(plan, graphs=False)
        kv_want = executor.kv.data[:, :, index].clone()
        executor.kv.data[:, :, index] = 0
        before = executor.prefill_graphs.replays
        got = executor.execute(plan)
        assert executor.prefill_graphs.replays == before + 1, "the group ran eagerly"
        assert got.shape == want.shape
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= 1e-4 * scale
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        kv_got = executor.kv.data[:, :, index]
        assert (kv_got - kv_want).abs().max().item() <= 1e-4 * kv_want.abs().max().item()
    finally:
        _free(harness, rows)


def test_groups_of_one_shape_in_one_step_keep_their_own_logits(
    harness: EngineHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two groups that replay the same graph: the first group's logits are copied out before
    the second overwrites the shared output."""
    executor = harness.engine.scheduler.executor
    rows = _rows(harness, [(10, 0, "qv"), (11, 0, None), (12, 0, "all")])
    plan = StepPlan("prefill", tuple(rows))
    try:
        want = executor._prefill(plan, graphs=False)
        # A 12-token budget: one row per group, all three in graph (1, 32).
        monkeypatch.setattr(
            executor, "_settings", dataclasses.replace(executor._settings, max_batch_tokens=12)
        )
        before = executor.prefill_graphs.replays
        got = executor.execute(plan)
        assert executor.prefill_graphs.replays == before + 3
        assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    finally:
        _free(harness, rows)


def test_what_no_graph_holds_runs_eagerly(harness: EngineHarness) -> None:
    executor = harness.engine.scheduler.executor
    rows = _rows(harness, [(70, 0, None)])  # longer than the largest seq bucket here (64)
    try:
        before = executor.prefill_graphs.replays
        executor.execute(StepPlan("prefill", tuple(rows)))
        assert executor.prefill_graphs.replays == before
    finally:
        _free(harness, rows)


def test_the_setting_reaches_the_executor_and_cpu_captures_nothing(
    model_cache: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    harness = EngineHarness(
        build_test_model("llama", model_cache), tmp_path / "data", prefill_graph_tokens=512
    )
    try:
        executor = harness.engine.scheduler.executor
        assert executor._settings.prefill_graph_tokens == 512
        if request.config.getoption("--emulate-prefill-graphs"):
            assert max(b * s for b, s in executor.prefill_graphs.shapes) == 512
        else:
            # Graphs are captured on CUDA only (and not with enforce_eager): CPU prefills eagerly.
            assert len(executor.prefill_graphs) == 0 and executor.prefill_graphs.shapes == []
    finally:
        harness.close()


def test_the_start_check_compares_a_graph_with_the_eager_prefill(harness: EngineHarness) -> None:
    """What the executor runs after capturing on CUDA: true here, false for a graph whose
    replay leaves the output wrong, and the scratch KV block it borrowed goes back."""
    executor = harness.engine.scheduler.executor
    free = executor.allocator.free_count
    assert executor._prefill_graphs_agree()
    assert executor.allocator.free_count == free
    graphs = executor.prefill_graphs
    key = graphs.key_for([_row(12)], 0, None)
    assert key is not None
    replay, out = graphs._graphs[key]
    try:
        graphs._graphs[key] = (_Broken(out), out)
        assert not executor._prefill_graphs_agree()
        assert executor.allocator.free_count == free
    finally:
        graphs._graphs[key] = (replay, out)


class _Broken:
    """A replay that leaves its output as garbage (a capture gone wrong)."""

    def __init__(self, out: torch.Tensor) -> None:
        self.out = out

    def replay(self) -> None:
        self.out.fill_(1e4)


def test_requests_through_the_engine_generate_what_eager_prefills_give(
    harness: EngineHarness, model_cache: Path, tmp_path: Path
) -> None:
    """The scheduler's prefills (a batch of mixed adapters, then a joiner while they decode)
    run from the graphs, and every request's greedy tokens are the ones an engine without
    prefill graphs generates."""
    executor = harness.engine.scheduler.executor
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13], list(range(20, 45))]
    adapters = [None, "qv", "all"]

    def generate(engine: EngineHarness) -> list[tuple[int, ...]]:
        jobs = [
            engine.submit(p, a, max_new_tokens=12, ignore_eos=True)
            for p, a in zip(prompts, adapters, strict=True)
        ]
        engine.engine.start()
        deadline = time.monotonic() + 60
        while not any(isinstance(e, TokenEvent) for e in jobs[0]):
            assert time.monotonic() < deadline, "the batch never started decoding"
            time.sleep(0.001)
        late = engine.submit([30, 31, 32, 33], "qv", max_new_tokens=6, ignore_eos=True)
        engine.run([*jobs, late])
        assert all(isinstance(job[-1], FinishEvent) for job in [*jobs, late])
        return [tuple(job[-1].token_ids) for job in [*jobs, late]]

    before = executor.prefill_graphs.replays
    with_graphs = generate(harness)
    assert executor.prefill_graphs.replays > before
    plain = EngineHarness(build_test_model("llama", model_cache), tmp_path / "data")
    try:
        for name, source in (("qv", "qv"), ("all", "all")):
            record = harness.service.get("t", source)
            store_adapter(plain.service, "t", name, record.path)
        assert generate(plain) == with_graphs
    finally:
        plain.close()
