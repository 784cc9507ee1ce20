"""Adapters stored in half precision serve as PEFT serves them.

A cold load keeps the file's dtype (load_adapter_weights(as_stored=True)): no float32 copy on the
host, the pages laid out straight from the stored values. The golden check: an adapter saved
in bfloat16 or float16 gives PeftModel's greedy tokens (PEFT loads the same rounded values),
mixed in one batch with a float32 adapter and the base model, on the own Llama forward and on
the generic path (GPT-2); and the host tier holds it at its stored size.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from serving_support import (
    AdapterShape,
    EngineHarness,
    build_test_model,
    make_peft_adapter,
    store_adapter,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraserve.server.engine.types import AdapterKey, FinishEvent

MAX_NEW = 8
SHAPES = {
    "llama": AdapterShape(
        rank=8, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj"], seed=21
    ),
    "gpt2": AdapterShape(rank=8, alpha=16, targets=["c_attn", "c_proj"], seed=22),
}


def _convert(adapter_dir: Path, out_dir: Path, dtype: torch.dtype) -> Path:
    """A copy of a PEFT adapter directory with every tensor stored in `dtype`."""
    out_dir.mkdir(parents=True)
    for path in adapter_dir.iterdir():
        if path.name == "adapter_model.safetensors":
            tensors = {k: v.to(dtype).contiguous() for k, v in load_file(path).items()}
            save_file(tensors, out_dir / path.name, metadata={"format": "pt"})
        else:
            (out_dir / path.name).write_bytes(path.read_bytes())
    return out_dir


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("arch", sorted(SHAPES))
def test_half_precision_adapter_matches_peft_beside_float32_and_base(
    arch: str, dtype: torch.dtype, model_cache: Path, tmp_path: Path
) -> None:
    model_dir = build_test_model(arch, model_cache)
    full = make_peft_adapter(model_dir, tmp_path / "wide", SHAPES[arch])
    half = _convert(full, tmp_path / "low", dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    prompt = tokenizer("The quick brown fox")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    peft = PeftModel.from_pretrained(base, half, adapter_name="low").eval()
    peft.load_adapter(full, adapter_name="wide")
    reference: dict[str | None, list[int]] = {}
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        for adapter in ("low", "wide", None):
            ids = torch.tensor([prompt])  # (1, prompt)
            if adapter is None:
                with peft.disable_adapter():
                    out = peft.generate(
                        ids, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=eos
                    )
            else:
                peft.set_adapter(adapter)
                out = peft.generate(ids, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=eos)
            reference[adapter] = out[0, len(prompt) :].tolist()
    assert reference["low"] != reference[None], "the adapter must change the output"

    harness = EngineHarness(model_dir, tmp_path / "data")
    try:
        store_adapter(harness.service, "t", "low", half)
        store_adapter(harness.service, "t", "wide", full)
        jobs = {a: harness.submit(prompt, a, max_new_tokens=MAX_NEW) for a in ("low", "wide", None)}
        harness.run(list(jobs.values()))
        for adapter, events in jobs.items():
            assert isinstance(events[-1], FinishEvent), events[-1]
            assert list(events[-1].token_ids) == reference[adapter], adapter
        held = harness.engine.host_cache.get(AdapterKey("t", "low", 1))
        assert {a.dtype for pair in held.modules.values() for a in pair} == {dtype}
        full_held = harness.engine.host_cache.get(AdapterKey("t", "wide", 1))
        assert held.nbytes * 2 == full_held.nbytes, "held at its stored size, not as float32"
    finally:
        harness.close()
