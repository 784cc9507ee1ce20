"""Adapter kinds per step: group kinds where no row's page is live are skipped, exactly.

An adapter of q/k/v/o leaves every MLP group empty; the executor names the live kinds in each
step's inputs (LiveIndex over all layers) and the forward runs no adapter term for the others:
no kernels on a GPU (the decode graphs come in an all-kinds and an attention-only variant), no
gathers or matmuls on the CPU. The PEFT parity suites check the outputs stay exact; these check
the bookkeeping and that the skipped work is really skipped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from serving_support import (
    AdapterShape,
    EngineHarness,
    build_test_model,
    make_peft_adapter,
    store_adapter,
)

from loraserve.server.engine.llama import ATTENTION_KINDS, LlamaForCausalLM
from loraserve.server.engine.lora import LiveIndex, LoRAGroup
from loraserve.server.engine.types import AdapterRef, FinishEvent


def test_live_index_counts_groups_per_kind() -> None:
    index = LiveIndex()
    index.update("qkv", 3, was_live=False, live=True)  # layer 0
    index.update("qkv", 3, was_live=False, live=True)  # layer 1
    assert index.kinds_for([3, 9]) == {"qkv"}
    index.update("qkv", 3, was_live=True, live=False)
    assert index.kinds_for([3]) == {"qkv"}, "layer 1 still holds page 3"
    index.update("qkv", 3, was_live=True, live=False)
    assert index.kinds_for([3]) == frozenset()
    index.update("down", 4, was_live=False, live=True)
    index.update("down", 4, was_live=True, live=True)  # unchanged: counted once
    index.update("down", 4, was_live=True, live=False)
    assert index.kinds_for([4]) == frozenset()


@pytest.fixture
def harness(model_cache: Path, tmp_path: Path):
    model_dir = build_test_model("llama", model_cache)
    shapes = {
        "attn": AdapterShape(rank=4, alpha=8, targets=["q_proj", "v_proj"], seed=1),
        "mlp": AdapterShape(rank=4, alpha=8, targets=["down_proj"], seed=2),
    }
    harness = EngineHarness(model_dir, tmp_path / "data")
    for name, shape in shapes.items():
        store_adapter(
            harness.service, "t", name, make_peft_adapter(model_dir, tmp_path / name, shape)
        )
    yield harness
    harness.close()


def _model(harness: EngineHarness) -> LlamaForCausalLM:
    model = harness.loaded.model
    assert isinstance(model, LlamaForCausalLM)
    return model


def test_kinds_follow_the_adapters_targets_and_evictions(harness: EngineHarness) -> None:
    pool, model = harness.engine.device_pool, _model(harness)
    attn = pool.acquire(harness.service.resolve(AdapterRef("t", "attn"))).pages
    mlp = pool.acquire(harness.service.resolve(AdapterRef("t", "mlp"))).pages
    assert model.lora_index.kinds_for(attn) == {"qkv"}
    assert model.lora_index.kinds_for(mlp) == {"down"}
    assert model.lora_index.kinds_for([*attn, *mlp]) == {"qkv", "down"}
    assert model.lora_index.kinds_for([]) == frozenset()
    assert {"qkv"} <= ATTENTION_KINDS and "down" not in ATTENTION_KINDS
    # Cleared pages are live nowhere (the next adapter in them sets its own kinds).
    for layer in model.model.layers:
        layer.self_attn.q_proj.clear(list(attn))
        layer.self_attn.v_proj.clear(list(attn))
    assert model.lora_index.kinds_for(attn) == frozenset()


def test_a_step_runs_only_the_live_kinds(
    harness: EngineHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decode with the q/v adapter computes the q/k/v group's term and no other; with the
    down_proj adapter beside it in the batch, down's too. Tokens equal a run without skipping."""
    calls: list[str] = []
    original = LoRAGroup.delta

    def spy(self: LoRAGroup, *args, **kwargs):
        calls.append(self.kind)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LoRAGroup, "delta", spy)
    prompt = [5, 6, 7, 8]

    def generate(adapters: list[str | None]) -> list[list[int]]:
        jobs = [harness.submit(prompt, a, max_new_tokens=4) for a in adapters]
        harness.run(jobs)
        assert all(isinstance(job[-1], FinishEvent) for job in jobs)
        return [list(job[-1].token_ids) for job in jobs]

    mixed = generate(["attn", "mlp", None])
    assert set(calls) == {"qkv", "down"}
    # The down_proj adapter stays resident (its pages live in the down groups), yet a batch
    # without it runs no down term.
    calls.clear()
    attn_only = generate(["attn", None])
    assert set(calls) == {"qkv"}
    assert mixed[0] == attn_only[0] and mixed[2] == attn_only[1]
    # The same step with every kind forced on (the index answers "all") runs down's term
    # too (o and gate/up have no stacks: no adapter ever targeted them) for the same tokens.
    monkeypatch.setattr(
        LiveIndex, "kinds_for", lambda self, pages: frozenset({"qkv", "o", "gate_up", "down"})
    )
    calls.clear()
    assert generate(["attn", None]) == attn_only
    assert set(calls) == {"qkv", "down"}


def test_graph_key_picks_the_attention_only_variant_when_it_covers_the_kinds(
    harness: EngineHarness,
) -> None:
    executor = harness.engine.scheduler.executor
    executor.batch_buckets, executor.span_buckets, executor.page_buckets = [4], [8], [2]
    dummy = (None, torch.zeros(1))
    executor._graphs = {
        (4, 8, 0, None): dummy,
        (4, 8, 2, None): dummy,
        (4, 8, 2, ATTENTION_KINDS): dummy,
    }
    try:
        assert executor._graph_key(3, 5, 0, None) == (4, 8, 0, None)
        assert executor._graph_key(3, 5, 2, frozenset({"qkv"})) == (4, 8, 2, ATTENTION_KINDS)
        assert executor._graph_key(3, 5, 1, frozenset({"qkv", "o"})) == (4, 8, 2, ATTENTION_KINDS)
        assert executor._graph_key(3, 5, 2, frozenset({"qkv", "down"})) == (4, 8, 2, None)
        assert executor._graph_key(5, 5, 2, frozenset({"qkv"})) is None  # batch too large
    finally:
        executor._graphs = {}
