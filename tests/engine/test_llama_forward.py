"""loraserve's own Llama-family forward against transformers, and its fused multi-LoRA term.

Configs the PEFT parity suite does not cover: llama3 rope scaling, a Mistral sliding window
shorter than the prompt, Qwen2's q/k/v bias with untied embeddings. Logits must match
transformers' within float32 tolerance, through the paged KV executor, with decode attention
through SDPA and through the paged Triton kernel, and with the fused_ops kernels (both under
Triton's interpreter on CPU).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from serving_support import build_test_model, prefill_then_decode
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from loraserve.server.engine import paged_attention
from loraserve.server.engine.executor import (
    ExecutorSettings,
    PagedExecutor,
    StartupError,
    make_executor,
)
from loraserve.server.engine.lora import LoRAGroup, MultiLoRALinear, lora_delta_reference
from loraserve.server.engine.model import load_base_model

COMMON = dict(
    vocab_size=1024,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
CONFIGS = {
    "llama3-rope": lambda: LlamaConfig(
        **COMMON,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "linear-rope": lambda: LlamaConfig(
        **COMMON, rope_scaling={"rope_type": "linear", "factor": 2.0}
    ),
    "mistral-window": lambda: MistralConfig(**COMMON, sliding_window=8),
    "qwen2-bias": lambda: Qwen2Config(**COMMON),
}


def _checkpoint(name: str, tmp_path: Path, model_cache: Path) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name]())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # well-separated logits (default init is near-uniform)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer_source = build_test_model("llama", model_cache)
    for f in tokenizer_source.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, tmp_path / f.name)
    return tmp_path


TRITON_ATTENTION = pytest.mark.skipif(
    not paged_attention.available(torch.device("cpu")),
    reason="needs Triton's CPU interpreter (Triton installed, TRITON_INTERPRET=1)",
)


@pytest.mark.parametrize(
    ("attention", "fused"),
    [
        ("sdpa", False),
        pytest.param("triton", False, marks=TRITON_ATTENTION),
        pytest.param("sdpa", True, marks=TRITON_ATTENTION, id="sdpa-fused_ops"),
    ],
)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_own_forward_matches_transformers(
    name: str, attention: str, fused: bool, tmp_path: Path, model_cache: Path
) -> None:
    """Decode attends through SDPA or the paged Triton kernel (interpreted here), and the norms,
    RoPE with the KV writes and SwiGLU run as torch or as the fused_ops kernels; same logits."""
    path = _checkpoint(name, tmp_path, model_cache)
    loaded = load_base_model(path, device="cpu", dtype="float32")
    assert loaded.own_forward
    hf = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    prompts = [[(7 * i + 3 * j) % 1000 + 4 for i in range(20 + 3 * j)] for j in range(3)]
    logits, next_tokens, step2 = prefill_then_decode(
        loaded, prompts, [(), (), ()], attention, fused_ops=fused
    )
    for row, ids in enumerate(prompts):
        with torch.no_grad():
            expected = hf(input_ids=torch.tensor([[*ids, next_tokens[row]]])).logits[0]
        scale = expected.abs().max()
        torch.testing.assert_close(logits[row], expected[-2], atol=2e-5 * scale, rtol=1e-4)
        torch.testing.assert_close(step2[row], expected[-1], atol=2e-5 * scale, rtol=1e-4)


def test_generic_implementation_can_be_forced(model_cache: Path) -> None:
    loaded = load_base_model(
        build_test_model("llama", model_cache),
        device="cpu",
        dtype="float32",
        implementation="generic",
    )
    assert not loaded.own_forward and loaded.architecture == "LlamaForCausalLM"


def test_triton_attention_is_refused_where_it_cannot_run(
    model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An explicit --attention triton fails at start with the reason, never falls back silently."""
    gpt2 = load_base_model(build_test_model("gpt2", model_cache), device="cpu", dtype="float32")
    with pytest.raises(StartupError, match="own Llama-family forward"):
        make_executor(gpt2, ExecutorSettings(4, 64, 64, attention="triton"))
    llama = load_base_model(build_test_model("llama", model_cache), device="cpu", dtype="float32")
    monkeypatch.setattr(paged_attention, "available", lambda device: False)  # CPU, no interpreter
    with pytest.raises(StartupError, match="needs Triton and a CUDA device"):
        make_executor(llama, ExecutorSettings(4, 64, 64, attention="triton"))


def test_lora_overlap_is_refused_where_it_cannot_run(model_cache: Path) -> None:
    """--lora-overlap overlaps CUDA streams under the own forward: anywhere else it fails at
    start with the reason."""
    gpt2 = load_base_model(build_test_model("gpt2", model_cache), device="cpu", dtype="float32")
    with pytest.raises(StartupError, match="--lora-overlap applies to the own Llama-family"):
        make_executor(gpt2, ExecutorSettings(4, 64, 64, lora_overlap=True))
    llama = load_base_model(build_test_model("llama", model_cache), device="cpu", dtype="float32")
    with pytest.raises(StartupError, match="--lora-overlap needs a CUDA device; this is cpu"):
        make_executor(llama, ExecutorSettings(4, 64, 64, lora_overlap=True))


def test_kv_pool_smaller_than_one_request_fails_at_start(model_cache: Path) -> None:
    loaded = load_base_model(build_test_model("llama", model_cache), device="cpu", dtype="float32")
    settings = ExecutorSettings(
        max_batch_size=4, max_seq_len=256, max_batch_tokens=64, kv_cache_bytes=1 << 12
    )
    with pytest.raises(StartupError, match="KV pool"):
        PagedExecutor(loaded, settings)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_group_delta_matches_the_reference_per_member(dtype: torch.dtype) -> None:
    """q/k/v adapters of mixed ranks (and rows without an adapter) as one shrink + expand."""
    torch.manual_seed(0)
    d_in, outs, page_rank, num_pages = 32, [32, 16, 16], 4, 8
    members = [MultiLoRALinear(torch.nn.Linear(d_in, o).to(dtype), context=None) for o in outs]
    group = LoRAGroup(members)
    # Adapter X (rank 6, 2 pages) on all three; adapter Y (rank 3, 1 page) on k only.
    factors: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {"X": {}, "Y": {}}
    for j, o in enumerate(outs):
        a, b = torch.randn(6, d_in), torch.randn(o, 6)
        members[j].write([1, 2], page_rank, num_pages, a, b, scale=0.5)
        factors["X"][j] = (a, b * 0.5)
    a, b = torch.randn(3, d_in), torch.randn(outs[1], 3)
    members[1].write([3], page_rank, num_pages, a, b, scale=2.0)
    factors["Y"][1] = (a, b * 2.0)
    rows = ["X", None, "Y", "X"]
    table = torch.tensor([[1, 2], [0, 0], [3, 0], [1, 2]])  # (batch, n)
    x = torch.randn(len(rows), 5, d_in).to(dtype)  # (batch, seq, d_in)
    got = group.delta(x, table).float()  # (batch, seq, sum(outs))
    offset = 0
    for j, o in enumerate(outs):
        per_row = [
            None
            if r is None or j not in factors[r]
            else tuple(t.to(dtype).float() for t in factors[r][j])
            for r in rows
        ]
        want = lora_delta_reference(x.float(), per_row, o)  # (batch, seq, o)
        tol = 1e-5 if dtype == torch.float32 else 5e-2
        scale = want.abs().max()
        torch.testing.assert_close(got[..., offset : offset + o], want, atol=tol * scale, rtol=tol)
        offset += o
    assert got[1].abs().max() == 0, "a row without an adapter gets exactly nothing"


def test_reused_gathers_are_refreshed_after_a_page_write() -> None:
    """The CPU decode path keeps gathered rows across steps of an unchanged batch; a page
    write (a new adapter in a freed page) must never be served from the old gather."""
    torch.manual_seed(1)
    members = [MultiLoRALinear(torch.nn.Linear(16, o), context=None) for o in (16, 8)]
    group = LoRAGroup(members)
    members[0].write([1], 4, 4, torch.randn(4, 16), torch.randn(16, 4), scale=1.0)
    table = torch.tensor([[1], [0]])
    x = torch.randn(2, 1, 16)
    first = group.delta(x, table, reuse_key="step")
    assert torch.equal(group.delta(x, table, reuse_key="step"), first)
    members[0].write([1], 4, 4, torch.randn(4, 16), torch.randn(16, 4), scale=1.0)
    fresh = group.delta(x, table)  # no key: always gathers
    again = group.delta(x, table, reuse_key="step")
    assert torch.equal(again, fresh) and not torch.equal(again, first)


def test_group_live_flags_follow_the_members_pages() -> None:
    """`live` (what the kernels skip by) is 1 exactly where some member holds the page: set by
    a write, kept while another member still holds it, cleared with the last one, grown with
    the stacks."""
    members = [MultiLoRALinear(torch.nn.Linear(16, o), context=None) for o in (16, 8)]
    group = LoRAGroup(members)
    assert group.live is None
    members[0].write([1, 2], 4, 20, torch.randn(8, 16), torch.randn(16, 8), scale=1.0)
    members[1].write([2], 4, 20, torch.randn(4, 16), torch.randn(8, 4), scale=1.0)
    assert group.live is not None and group.live.dtype == torch.int32
    assert group.live.tolist()[:4] == [0, 1, 1, 0]
    members[0].clear([1, 2])
    assert group.live.tolist()[:4] == [0, 0, 1, 0]  # member 1 still holds page 2
    members[1].write([12], 4, 20, torch.randn(4, 16), torch.randn(8, 4), scale=1.0)
    assert group.live.shape[0] == group.a.shape[0] > 12  # grown with the stacks
    assert group.live.nonzero().flatten().tolist() == [2, 12]
    members[1].clear([2, 12])
    group.release_memory()
    assert group.live is None and group.a is None
