"""The CUDA path: the same PEFT parity on a GPU, in float32 and bfloat16 (skipped without CUDA).

CI has no GPU; these run on a lent GPU machine (see README, "GPU checks").
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from serving_support import (
    AdapterShape,
    EngineHarness,
    build_test_model,
    make_peft_adapter,
    prefill_then_decode,
    store_adapter,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraserve.server.engine.types import AdapterRef, FinishEvent

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SHAPES = {
    "llama": [
        AdapterShape(rank=4, alpha=8, targets=["q_proj", "v_proj"], seed=1),
        AdapterShape(rank=16, alpha=16, use_rslora=True, targets="all-linear", seed=2),
    ],
    "qwen2": [
        AdapterShape(rank=8, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj"], seed=3),
        AdapterShape(rank=2, alpha=4, targets=["down_proj"], seed=4),
    ],
    "gpt2": [
        AdapterShape(rank=8, alpha=16, targets=["c_attn", "c_proj", "c_fc"], seed=5),
        AdapterShape(rank=4, alpha=4, targets=["c_fc"], seed=6),
    ],
}
PROMPTS = ["The quick brown fox", "Hi", "A longer prompt about rivers, hills and the sea"]
TOLERANCE = {"float32": (2e-4, 1e-4), "bfloat16": (1.5e-1, 5e-2)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    ("arch", "attention"),
    [
        *((arch, "sdpa") for arch in sorted(SHAPES)),
        ("llama", "triton"),
        ("qwen2", "triton"),
        ("llama", "sdpa+overlap"),
    ],
)
def test_cuda_mixed_batch_matches_peft(
    arch: str, attention: str, dtype: str, model_cache: Path, tmp_path: Path
) -> None:
    """attention="triton": decode steps attend with the paged Triton kernel (own forward);
    "+overlap": --lora-overlap, each adapter shrink on a side stream beside its base matmul."""
    attention, _, overlap = attention.partition("+")
    model_dir = build_test_model(arch, model_cache)
    dirs = [make_peft_adapter(model_dir, tmp_path / f"a{i}", s) for i, s in enumerate(SHAPES[arch])]
    harness = EngineHarness(
        model_dir,
        tmp_path / "data",
        device="cuda",
        dtype=dtype,
        attention=attention,
        lora_overlap=overlap == "overlap",
    )
    if overlap:
        assert harness.loaded.model.lora_kernels and harness.loaded.model.lora_side is not None
    names = [f"a{i}" for i in range(len(dirs))]
    for name, directory in zip(names, dirs, strict=True):
        store_adapter(harness.service, "t", name, directory)
    torch_dtype = getattr(torch, dtype)
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch_dtype)
    peft = PeftModel.from_pretrained(base.cuda(), dirs[0], adapter_name=names[0]).eval()
    peft.load_adapter(dirs[1], adapter_name=names[1])
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    rows = [(a, tokenizer(p)["input_ids"]) for p in PROMPTS for a in [None, *names]]
    pool = harness.engine.device_pool
    pages = [
        () if a is None else pool.acquire(harness.service.resolve(AdapterRef("t", a))).pages
        for a, _ in rows
    ]
    logits, _, _ = prefill_then_decode(harness.loaded, [ids for _, ids in rows], pages)
    atol, rtol = TOLERANCE[dtype]
    for row, (adapter, ids) in enumerate(rows):
        with torch.no_grad():
            if adapter is None:
                with peft.disable_adapter():
                    expected = peft(input_ids=torch.tensor([ids], device="cuda")).logits[0, -1]
            else:
                peft.set_adapter(adapter)
                expected = peft(input_ids=torch.tensor([ids], device="cuda")).logits[0, -1]
        torch.testing.assert_close(logits[row].float(), expected.float(), atol=atol, rtol=rtol)
    if dtype == "float32":
        # Greedy tokens through the scheduler, all rows in one batch, equal PEFT's one by one.
        for adapter, _ in rows:
            if adapter is not None:
                harness.engine.device_pool.release(
                    harness.service.resolve(AdapterRef("t", adapter))
                )
        jobs = [(a, ids, harness.submit(ids, a, max_new_tokens=10)) for a, ids in rows]
        harness.run([job for *_, job in jobs])
        for adapter, ids, job in jobs:
            assert isinstance(job[-1], FinishEvent)
            if adapter is None:
                with peft.disable_adapter():
                    out = peft.generate(
                        input_ids=torch.tensor([ids], device="cuda"),
                        max_new_tokens=10,
                        do_sample=False,
                        pad_token_id=tokenizer.eos_token_id,
                    )
            else:
                peft.set_adapter(adapter)
                out = peft.generate(
                    input_ids=torch.tensor([ids], device="cuda"),
                    max_new_tokens=10,
                    do_sample=False,
                    pad_token_id=tokenizer.eos_token_id,
                )
            assert list(job[-1].token_ids) == out[0, len(ids) :].tolist(), adapter
    harness.close()


@pytest.mark.parametrize("rank", [12, 16])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_cold_load_on_the_loader_stream(
    dtype: str, rank: int, model_cache: Path, tmp_path: Path
) -> None:
    """A background load (laid out on the GPU from one upload, on the loader's own stream, an
    event) lands exactly the pages a direct load writes, and a request admitted mid-decode that
    way generates what it generates alone. Rank 12 in pages of 8 has its q/k/v groups stacked
    on the device, rank 16 laid out in their stacks' layout by the gather itself."""
    from loraserve.server.engine.lora import adapter_pages
    from loraserve.server.engine.types import TokenEvent

    model_dir = build_test_model("llama", model_cache)
    shape = AdapterShape(rank=rank, alpha=16, targets="all-linear", seed=9)
    adapter_dir = make_peft_adapter(model_dir, tmp_path / "cold", shape)
    harness = EngineHarness(model_dir, tmp_path / "data", device="cuda", dtype=dtype)
    try:
        store_adapter(harness.service, "t", "cold", adapter_dir)
        key = harness.service.resolve(AdapterRef("t", "cold"))
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        ids = tokenizer("The quick brown fox")["input_ids"]

        base = harness.submit(ids, None, max_new_tokens=200, ignore_eos=True)
        harness.engine.start()
        deadline = time.monotonic() + 60
        while not any(isinstance(e, TokenEvent) for e in base):
            assert time.monotonic() < deadline, "the base request never started decoding"
            time.sleep(0.001)
        cold = harness.submit(ids, "cold", max_new_tokens=10, ignore_eos=True)
        harness.run([cold, base])
        pool = harness.engine.device_pool
        placement = pool.placement(key)
        assert placement is not None and pool.cold_pending() == 0
        on_device = pool._layout.on_device
        assert on_device is not None and on_device.builds == 1, "laid out on the GPU"

        weights = harness.service.load(key)
        for name, (lora_a, lora_b) in weights.modules.items():
            layer = harness.loaded.lora_layers[name]
            assert layer.lora_a is not None and layer.lora_b is not None
            want_a, want_b = adapter_pages(
                lora_a,
                lora_b,
                weights.config.scale,
                pool.page_rank,
                len(placement.pages),
                layer.lora_a.dtype,
            )
            index = torch.tensor(placement.pages, device="cuda")
            assert torch.equal(layer.lora_a[index].cpu(), want_a), name
            assert torch.equal(layer.lora_b[index].cpu(), want_b), name

        if dtype == "float32":
            alone = harness.submit(ids, "cold", max_new_tokens=10, ignore_eos=True)
            harness.run([alone])
            assert isinstance(cold[-1], FinishEvent) and isinstance(alone[-1], FinishEvent)
            assert cold[-1].token_ids == alone[-1].token_ids
    finally:
        harness.close()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_prefill_graphs_match_the_eager_prefill(
    dtype: str, model_cache: Path, tmp_path: Path
) -> None:
    """Prefill groups replayed from the graphs captured at start (padding rows and tokens, both
    adapter variants) give the eager prefill's logits; a request then generates the tokens it
    generates with every prefill eager."""
    from loraserve.server.engine.planner import RowPlan, StepPlan, blocks_for

    model_dir = build_test_model("llama", model_cache)
    shapes = [
        AdapterShape(rank=4, alpha=8, targets=["q_proj", "v_proj"], seed=1),
        AdapterShape(rank=12, alpha=16, targets="all-linear", seed=2),
    ]
    dirs = [make_peft_adapter(model_dir, tmp_path / f"p{i}", s) for i, s in enumerate(shapes)]
    harness = EngineHarness(model_dir, tmp_path / "data", device="cuda", dtype=dtype)
    try:
        for i, directory in enumerate(dirs):
            store_adapter(harness.service, "t", f"p{i}", directory)
        executor = harness.engine.scheduler.executor
        assert len(executor.prefill_graphs) > 0, "no prefill graphs were captured"
        pool = harness.engine.device_pool
        pages = [()] + [
            tuple(pool.acquire(harness.service.resolve(AdapterRef("t", f"p{i}"))).pages)
            for i in range(len(dirs))
        ]
        rows = []
        for i, (length, adapter) in enumerate([(5, 1), (19, 0), (11, 2)]):
            blocks = executor.allocator.allocate(blocks_for(length + 1))
            assert blocks is not None
            tokens = tuple(3 + (7 * i + 5 * j) % 90 for j in range(length))
            rows.append(RowPlan(i, tokens, 0, tuple(blocks), pages[adapter]))
        for group in (rows, rows[:1], [rows[1]]):
            plan = StepPlan("prefill", tuple(group))
            want = executor._prefill(plan, graphs=False).float()
            before = executor.prefill_graphs.replays
            got = executor.execute(plan).float()
            assert executor.prefill_graphs.replays == before + 1
            atol, rtol = TOLERANCE[dtype]
            assert torch.allclose(got, want, atol=atol * want.abs().max().item(), rtol=rtol)
            assert torch.equal(got.argmax(-1), want.argmax(-1))
        for row in rows:
            executor.allocator.free(list(row.blocks))

        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        ids = tokenizer("The quick brown fox")["input_ids"]
        job = harness.submit(ids, "p1", max_new_tokens=8, ignore_eos=True)
        harness.run([job])
        eager = EngineHarness(
            model_dir, tmp_path / "eager", device="cuda", dtype=dtype, prefill_graph_tokens=0
        )
        try:
            store_adapter(eager.service, "t", "p1", dirs[1])
            assert len(eager.engine.scheduler.executor.prefill_graphs) == 0
            again = eager.submit(ids, "p1", max_new_tokens=8, ignore_eos=True)
            eager.run([again])
        finally:
            eager.close()
        assert isinstance(job[-1], FinishEvent) and isinstance(again[-1], FinishEvent)
        if dtype == "float32":
            assert job[-1].token_ids == again[-1].token_ids
    finally:
        harness.close()


def test_cuda_batched_sampling_is_seeded_filtered_and_faults_alone() -> None:
    """The sampled rows run on the device: same seeds, same draws; filtered tokens never."""
    from loraserve.server.engine.sampling import SamplingFault, make_generator, select_next_tokens
    from loraserve.server.engine.types import SamplingParams

    vocab = 32_000
    torch.manual_seed(0)
    logits = (torch.randn(6, vocab) * 4).cuda()  # (rows, vocab)
    logits[4, 7] = float("nan")
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, seed=1),
        SamplingParams(temperature=1.0, top_k=5, seed=2),
        SamplingParams(),  # greedy
        SamplingParams(temperature=0.7, top_k=50, top_p=0.95, seed=3),
        SamplingParams(temperature=1.0, seed=4),  # NaN logits: fails alone
        SamplingParams(temperature=2.0, seed=5),
    ]
    top5 = set(torch.topk(logits[1], 5).indices.tolist())

    def draw() -> list[list[int | SamplingFault]]:
        generators = [make_generator(p) for p in params]
        return [select_next_tokens(logits, params, generators) for _ in range(20)]

    first, again = draw(), draw()
    assert [[str(t) for t in step] for step in first] == [[str(t) for t in s] for s in again]
    for step in first:
        assert step[2] == int(torch.argmax(logits[2]))
        assert step[1] in top5
        assert isinstance(step[4], SamplingFault)
        assert all(isinstance(t, int) and 0 <= t < vocab for i, t in enumerate(step) if i != 4)
