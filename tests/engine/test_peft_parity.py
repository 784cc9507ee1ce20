"""Golden parity with PEFT: loraserve's outputs equal PeftModel's for every supported adapter shape.

Per architecture (Llama, Qwen2, Mistral, GPT-2), three adapters of different rank, alpha,
rsLoRA and target sets (list, regex, all-linear) are made with PEFT. loraserve must produce
PEFT's greedy tokens exactly and its logits within float32 tolerance, both one request at a
time and with base and all adapters mixed in ONE batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from serving_support import (
    AdapterShape,
    CheckedSide,
    EngineHarness,
    build_test_model,
    make_peft_adapter,
    prefill_then_decode,
    store_adapter,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraserve.server.engine import paged_attention
from loraserve.server.engine.triton_support import runs_here
from loraserve.server.engine.types import FinishEvent

MAX_NEW = 12
PROMPTS = ["The quick brown fox", "Hello", "What is the capital of the small island, and why?"]

SHAPES = {
    "llama": {
        "qv": AdapterShape(rank=4, alpha=8, targets=["q_proj", "v_proj"], seed=1),
        "all-rs": AdapterShape(
            rank=8,
            alpha=16,
            use_rslora=True,
            targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            seed=2,
        ),
        "mlp-re": AdapterShape(rank=16, alpha=8, targets=r".*\.mlp\.(gate|up|down)_proj", seed=3),
    },
    "qwen2": {
        "qkv": AdapterShape(rank=2, alpha=4, targets=["q_proj", "k_proj", "v_proj"], seed=4),
        "all-linear-rs": AdapterShape(
            rank=8, alpha=32, use_rslora=True, targets="all-linear", seed=5
        ),
        "o-down": AdapterShape(rank=12, alpha=6, targets=["o_proj", "down_proj"], seed=6),
    },
    "mistral": {
        "qo": AdapterShape(rank=6, alpha=12, targets=["q_proj", "o_proj"], seed=10),
        "mlp-rs": AdapterShape(
            rank=8, alpha=8, use_rslora=True, targets=["gate_proj", "up_proj"], seed=11
        ),
        "all-linear": AdapterShape(rank=3, alpha=9, targets="all-linear", seed=12),
    },
    "gpt2": {
        "attn": AdapterShape(rank=4, alpha=8, targets=["c_attn"], seed=7),
        "all": AdapterShape(rank=8, alpha=16, targets=["c_attn", "c_proj", "c_fc"], seed=8),
        "mlp-re-rs": AdapterShape(
            rank=16, alpha=16, use_rslora=True, targets=r".*\.mlp\.c_(fc|proj)", seed=9
        ),
    },
}


@dataclass
class ArchCase:
    arch: str
    model_dir: Path
    adapter_dirs: dict[str, Path]
    prompts: list[list[int]]
    reference: dict[tuple[str | None, int], list[int]]
    """(adapter or None, prompt index) -> PEFT greedy completion ids."""
    peft: PeftModel


@pytest.fixture(scope="module", params=sorted(SHAPES))
def case(request: pytest.FixtureRequest, model_cache: Path, tmp_path_factory) -> ArchCase:
    arch = request.param
    model_dir = build_test_model(arch, model_cache)
    root = tmp_path_factory.mktemp(f"adapters-{arch}")
    adapter_dirs = {
        name: make_peft_adapter(model_dir, root / name, shape)
        for name, shape in SHAPES[arch].items()
    }
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    names = list(adapter_dirs)
    peft = PeftModel.from_pretrained(base, adapter_dirs[names[0]], adapter_name=names[0]).eval()
    for name in names[1:]:
        peft.load_adapter(adapter_dirs[name], adapter_name=name)
    reference: dict[tuple[str | None, int], list[int]] = {}
    for adapter in [None, *names]:
        for i, ids in enumerate(prompts):
            reference[(adapter, i)] = _peft_generate(peft, adapter, ids, tokenizer.eos_token_id)
    return ArchCase(arch, model_dir, adapter_dirs, prompts, reference, peft)


def _peft_generate(peft: PeftModel, adapter: str | None, ids: list[int], eos: int) -> list[int]:
    input_ids = torch.tensor([ids])  # (1, prompt)
    with torch.no_grad():
        if adapter is None:
            with peft.disable_adapter():
                out = peft.generate(
                    input_ids=input_ids, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=eos
                )
        else:
            peft.set_adapter(adapter)
            out = peft.generate(
                input_ids=input_ids, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=eos
            )
    return out[0, len(ids) :].tolist()


def _harness(case: ArchCase, tmp_path: Path, **overrides: object) -> EngineHarness:
    harness = EngineHarness(case.model_dir, tmp_path, **overrides)
    for name, directory in case.adapter_dirs.items():
        store_adapter(harness.service, "t", name, directory)
    return harness


def _tokens(events: list) -> list[int]:
    assert isinstance(events[-1], FinishEvent), events[-1]
    return list(events[-1].token_ids)


def test_greedy_tokens_match_peft_one_at_a_time(case: ArchCase, tmp_path: Path) -> None:
    harness = _harness(case, tmp_path)
    try:
        for adapter in [None, *case.adapter_dirs]:
            for i, ids in enumerate(case.prompts):
                job = harness.submit(ids, adapter, max_new_tokens=MAX_NEW)
                harness.run([job])
                assert _tokens(job) == case.reference[(adapter, i)], (adapter, i)
        scheduler = harness.engine.scheduler
        assert max(scheduler.prefill_sizes) == 1 and max(scheduler.decode_sizes) == 1
    finally:
        harness.close()


def test_greedy_tokens_match_peft_mixed_in_one_batch(case: ArchCase, tmp_path: Path) -> None:
    harness = _harness(case, tmp_path)
    try:
        jobs = {}
        # Interleave tenants' adapters and the base model row by row.
        for i, ids in enumerate(case.prompts):
            for adapter in [None, *case.adapter_dirs]:
                jobs[(adapter, i)] = harness.submit(ids, adapter, max_new_tokens=MAX_NEW)
        harness.run(list(jobs.values()))
        scheduler = harness.engine.scheduler
        assert scheduler.prefill_sizes == [len(jobs)], "all prompts must share one prefill"
        assert scheduler.decode_sizes[0] == len(jobs), "all rows must decode together"
        for key, events in jobs.items():
            assert _tokens(events) == case.reference[key], key
    finally:
        harness.close()


@pytest.mark.skipif(
    not paged_attention.available(torch.device("cpu")),
    reason="needs Triton's CPU interpreter (Triton installed, TRITON_INTERPRET=1)",
)
def test_greedy_tokens_match_peft_with_triton_decode_attention(
    case: ArchCase, tmp_path: Path
) -> None:
    """--attention triton: the paged decode kernel (interpreted on CPU) gives PEFT's tokens."""
    if case.arch == "gpt2":
        pytest.skip("GPT-2 runs on the generic path, which has no --attention choice")
    harness = _harness(case, tmp_path, attention="triton")
    try:
        assert harness.engine.scheduler.executor._model.paged_attention
        jobs = {
            (adapter, i): harness.submit(ids, adapter, max_new_tokens=MAX_NEW)
            for i, ids in enumerate(case.prompts)
            for adapter in [None, *case.adapter_dirs]
        }
        harness.run(list(jobs.values()))
        for key, events in jobs.items():
            assert _tokens(events) == case.reference[key], key
    finally:
        harness.close()


_INTERPRETER = pytest.mark.skipif(
    not runs_here(torch.device("cpu")),
    reason="needs Triton's CPU interpreter (Triton installed, TRITON_INTERPRET=1)",
)


@pytest.mark.parametrize(
    "adapter_path",
    ["torch", *(pytest.param(path, marks=_INTERPRETER) for path in ("kernels", "beside"))],
)
def test_logits_match_peft_in_mixed_batch(
    case: ArchCase, tmp_path: Path, adapter_path: str
) -> None:
    """kernels: the adapter term through the Triton shrink / expand kernels (what a GPU runs:
    prefill tables repeated per token, decode one row each), interpreted on CPU; beside: the
    same with each shrink on a side stream beside its base matmul (--lora-overlap; inline
    here, checking the forward joins every fork)."""
    lora_kernels = adapter_path != "torch"
    side = CheckedSide() if adapter_path == "beside" else None
    if lora_kernels and case.arch == "gpt2":
        pytest.skip("GPT-2 runs on the generic path, whose adapter term is the torch one")
    harness = _harness(case, tmp_path)
    try:
        from loraserve.server.engine.types import AdapterRef

        rows: list[tuple[str | None, list[int]]] = [
            (adapter, ids) for ids in case.prompts for adapter in [None, *case.adapter_dirs]
        ]
        pages = [
            ()
            if adapter is None
            else harness.engine.device_pool.acquire(
                harness.service.resolve(AdapterRef("t", adapter))
            ).pages
            for adapter, _ in rows
        ]
        logits, next_tokens, step2 = prefill_then_decode(
            harness.loaded,
            [ids for _, ids in rows],
            pages,
            lora_kernels=lora_kernels,
            lora_side=side,
        )
        if side is not None:
            side.assert_joined()
            assert side.log.count("beside") >= 2  # the prefill's projections and the decode's
        for row, (adapter, ids) in enumerate(rows):
            full = torch.tensor([[*ids, next_tokens[row]]])  # (1, prompt + 1)
            with torch.no_grad():
                if adapter is None:
                    with case.peft.disable_adapter():
                        expected = case.peft(input_ids=full).logits[0]
                else:
                    case.peft.set_adapter(adapter)
                    expected = case.peft(input_ids=full).logits[0]  # (prompt + 1, vocab)
            torch.testing.assert_close(logits[row], expected[-2], atol=2e-4, rtol=1e-4)
            torch.testing.assert_close(step2[row], expected[-1], atol=2e-4, rtol=1e-4)
            # The adapter must really change the output (otherwise this test proves nothing).
            if adapter is not None:
                with torch.no_grad(), case.peft.disable_adapter():
                    base_logits = case.peft(input_ids=full).logits[0]
                assert (base_logits[-1] - expected[-1]).abs().max() > 1e-2
    finally:
        harness.close()
