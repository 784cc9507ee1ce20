"""Bench base models: Llama configs with random weights from a fixed seed, cached on disk.

The checkpoint is an ordinary Hugging Face directory (safetensors weights plus the embedded
byte-level BPE tokenizer from loraserve.testing.tiny_model), so loraserve, PEFT and the gRPC server
all load exactly the same model. The tokenizer has 1,024 tokens while the model's vocabulary is
32,000: prompts are built from tokenizer ids (< 1,024), generated ids above that decode to nothing,
which is harmless for throughput.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass(frozen=True)
class ModelSize:
    """Shape of a Llama-style bench model."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int = 32000
    max_position_embeddings: int = 2048


SIZES: dict[str, ModelSize] = {
    # Unit-test smoke model: builds and runs in well under a second.
    "tiny": ModelSize(
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=128
    ),
    # The CPU bench model: hidden 512, 8 layers, 8 heads, vocab 32,000.
    "small": ModelSize(
        hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, intermediate_size=1376
    ),
    # About 1.2B parameters, Llama-3.2-1B-like (for a GPU run).
    "1b": ModelSize(
        hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192
    ),
}

FORMAT_VERSION = 1
"""Bump when the recipe changes, so cached checkpoints are rebuilt."""


def default_cache_dir() -> Path:
    """$LORASERVE_CACHE/bench, else ~/.cache/loraserve/bench."""
    root = os.environ.get("LORASERVE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "loraserve") / "bench"


def model_digest(size: ModelSize, seed: int, storage_dtype: str) -> str:
    payload = json.dumps(
        {"format": FORMAT_VERSION, "size": asdict(size), "seed": seed, "dtype": storage_dtype},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _write_checkpoint(out: Path, size: ModelSize, seed: int, storage_dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    from loraserve.testing.tiny_model import build_tokenizer

    tokenizer = build_tokenizer(model_max_length=size.max_position_embeddings)
    eos = int(tokenizer.eos_token_id)
    config = LlamaConfig(
        vocab_size=size.vocab_size,
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_kv_heads,
        intermediate_size=size.intermediate_size,
        max_position_embeddings=size.max_position_embeddings,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=int(tokenizer.pad_token_id),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to(getattr(torch, storage_dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=eos, eos_token_id=eos, pad_token_id=int(tokenizer.pad_token_id)
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def bench_model_path(
    size_name: str, *, seed: int = 0, storage_dtype: str = "float32", cache_dir: Path | None = None
) -> Path:
    """The checkpoint of `size_name` with random weights from `seed`, built on first use.

    Built in a temporary sibling and renamed into place, so a cached directory is always whole.
    `storage_dtype` is the dtype written to disk (bfloat16 halves a 1b model's size).
    """
    size = SIZES[size_name]
    root = cache_dir if cache_dir is not None else default_cache_dir()
    path = root / "models" / f"llama-{size_name}-{model_digest(size, seed, storage_dtype)}"
    if (path / "config.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        from loraserve.server.engine.compute_threads import in_passing_thread

        # A passing thread: building the weights is parallel, and its OpenMP pool must not
        # outlive it beside an engine thread (server.engine.compute_threads).
        in_passing_thread(
            lambda: _write_checkpoint(tmp, size, seed, storage_dtype), name="bench-build-model"
        )
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
