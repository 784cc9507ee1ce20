"""Side-by-side decode throughput: base model only vs many tenants' adapters in one batch.

    python bench/multi_lora_ratio.py [--device cpu|cuda] [--dtype float32|bfloat16]
        [--size small|1b] [--batch 16] [--adapters 16] [--rank 16] [--steps 64] [--repeats 3]

All modes run in one process on the same model and the same prompts, interleaved per repeat
(machines are noisy; compare ratios, not absolute numbers):
  base       every row has no adapter (page 0 only): the physical limit of this engine
  identical  every row uses the same adapter
  distinct   rows spread over --adapters different adapters (one per row when equal to --batch)
Adapters are random rank --rank on q/k/v/o, written into device pages before timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from server.engine import runner
from server.engine.device_pool import DEFAULT_PAGE_RANK as PAGE_RANK
from server.engine.embedded import build_tokenizer
from server.engine.kv_cache import SlotKVCache
from server.engine.model import load_base_model

SIZES = {
    # The CPU bench model: hidden 512, 8 layers, 8 heads, vocab 32,000.
    "small": {
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "intermediate_size": 1376,
    },
    # About 1.2B parameters, Llama-3.2-1B-like.
    "1b": {
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 8192,
    },
}


def build_model(size: str, out: Path) -> Path:
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=32000,
        max_position_embeddings=2048,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        **SIZES[size],
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def load_random_adapters(loaded, count: int, rank: int) -> list[tuple[int, ...]]:
    """Writes `count` random adapters into device pages; returns each adapter's pages."""
    generator = torch.Generator().manual_seed(1)
    targets = [
        n
        for n in loaded.lora_layers
        if n.rsplit(".", 1)[-1] in {"q_proj", "k_proj", "v_proj", "o_proj"}
    ]
    per = -(-rank // PAGE_RANK)
    placements = [tuple(range(1 + i * per, 1 + (i + 1) * per)) for i in range(count)]
    for pages in placements:
        for name in targets:
            layer = loaded.lora_layers[name]
            a = torch.randn(rank, layer.in_features, generator=generator) * 0.01  # (r, d_in)
            b = torch.randn(layer.out_features, rank, generator=generator) * 0.01  # (d_out, r)
            layer.write(list(pages), PAGE_RANK, count * per, a, b, 2.0)
    return placements


def time_mode(
    loaded,
    prompts: list[list[int]],
    pages: list[tuple[int, ...]],
    steps: int,
) -> float:
    """Seconds for one prefill plus `steps` decode steps of the whole batch (rows 0..batch-1)."""
    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)
    cache = SlotKVCache(
        loaded.model.config,
        max_rows=len(prompts),
        max_len=max(len(p) for p in prompts) + steps + 1,
        dtype=loaded.dtype,
        device=loaded.device,
    )
    lora = runner.lora_state(pages, loaded.device)
    sync()
    start = time.perf_counter()
    inputs = [runner.RowInput(row=i, tokens=p, start=0) for i, p in enumerate(prompts)]
    logits = runner.forward_rows(loaded, cache, inputs, lora)
    positions = [len(p) for p in prompts]
    for _ in range(steps):
        tokens = logits.argmax(-1).tolist()
        inputs = [
            runner.RowInput(row=i, tokens=[t], start=positions[i]) for i, t in enumerate(tokens)
        ]
        positions = [p + 1 for p in positions]
        logits = runner.forward_rows(loaded, cache, inputs, lora)
    sync()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(args.size, Path(tmp) / "model")
        loaded = load_base_model(
            model_dir,
            device=args.device,
            dtype=args.dtype,
        )
    placements = load_random_adapters(loaded, args.adapters, args.rank)
    prompts = [
        [(7 * i + j) % 31000 + 100 for j in range(args.prompt_len)] for i in range(args.batch)
    ]
    modes: dict[str, list[tuple[int, ...]]] = {
        "base": [()] * args.batch,
        "identical": [placements[0]] * args.batch,
        "distinct": [placements[i % args.adapters] for i in range(args.batch)],
    }
    time_mode(loaded, prompts, modes["distinct"], 4)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode, pages in modes.items():
            times[mode].append(time_mode(loaded, prompts, pages, args.steps))
    tokens = args.batch * (args.steps + 1)
    result = {
        "device": str(loaded.device),
        "dtype": args.dtype,
        "size": args.size,
        "batch": args.batch,
        "adapters": args.adapters,
        "rank": args.rank,
        "steps": args.steps,
        "tokens_per_s": {m: tokens / statistics.median(t) for m, t in times.items()},
    }
    base = result["tokens_per_s"]["base"]
    result["ratio_vs_base"] = {m: v / base for m, v in result["tokens_per_s"].items()}
    print(
        f"{'mode':<10} {'tokens/s':>10} {'vs base':>8}   ({result['device']}, {args.dtype}, "
        f"{args.size}, batch {args.batch}, {args.adapters} adapters r{args.rank})"
    )
    for mode in modes:
        tps, ratio = result["tokens_per_s"][mode], result["ratio_vs_base"][mode]
        print(f"{mode:<10} {tps:>10.1f} {ratio:>8.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
