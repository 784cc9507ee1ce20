"""The CUDA path: the same PEFT parity on a GPU, in float32 and bfloat16 (skipped without CUDA).

CI has no GPU; these run on a lent GPU machine (see README, "GPU checks").
"""

from __future__ import annotations

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
@pytest.mark.parametrize("arch", sorted(SHAPES))
def test_cuda_mixed_batch_matches_peft(
    arch: str, dtype: str, model_cache: Path, tmp_path: Path
) -> None:
    model_dir = build_test_model(arch, model_cache)
    dirs = [make_peft_adapter(model_dir, tmp_path / f"a{i}", s) for i, s in enumerate(SHAPES[arch])]
    harness = EngineHarness(model_dir, tmp_path / "data", device="cuda", dtype=dtype)
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
