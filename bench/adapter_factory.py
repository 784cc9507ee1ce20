"""Random, non-trivial LoRA adapters written as real PEFT directories, fast enough for 1,000.

Each adapter is `adapter_config.json` + `adapter_model.safetensors` exactly as PEFT's
`save_pretrained` writes them (the config is rendered once by PEFT's own LoraConfig; the weights
use PEFT's key names and safetensors metadata), with lora_B non-zero (as `init_lora_weights=False`
gives), so an adapter really changes the output. tests/bench checks the files against a real
`get_peft_model(...).save_pretrained(...)`. Adapter `i` depends only on (seed, i).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraShape:
    """The adapters to make: rank, alpha and target projections."""

    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = DEFAULT_TARGETS


def target_shapes(model_dir: Path, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Full module name -> (d_in, d_out) of every targeted Llama projection."""
    config = json.loads((model_dir / "config.json").read_text())
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    inter = int(config["intermediate_size"])
    dims = {
        "q_proj": ("self_attn", hidden, heads * head_dim),
        "k_proj": ("self_attn", hidden, kv_heads * head_dim),
        "v_proj": ("self_attn", hidden, kv_heads * head_dim),
        "o_proj": ("self_attn", heads * head_dim, hidden),
        "gate_proj": ("mlp", hidden, inter),
        "up_proj": ("mlp", hidden, inter),
        "down_proj": ("mlp", inter, hidden),
    }
    shapes: dict[str, tuple[int, int]] = {}
    for layer in range(int(config["num_hidden_layers"])):
        for target in targets:
            block, d_in, d_out = dims[target]
            shapes[f"model.layers.{layer}.{block}.{target}"] = (d_in, d_out)
    return shapes


def peft_config_bytes(model_dir: Path, shape: LoraShape) -> bytes:
    """adapter_config.json as PEFT writes it for a PeftModel over `model_dir` (inference mode)."""
    from peft import LoraConfig

    config = LoraConfig(
        r=shape.rank,
        lora_alpha=shape.alpha,
        target_modules=list(shape.targets),
        init_lora_weights=False,
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(model_dir),
        inference_mode=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        return (Path(tmp) / "adapter_config.json").read_bytes()


class AdapterFactory:
    """Writes adapter directories for one base model; the config is rendered once."""

    def __init__(
        self, model_dir: Path, shape: LoraShape, *, seed: int = 0, dtype: torch.dtype | None = None
    ) -> None:
        self.model_dir = Path(model_dir)
        self.shape = shape
        self.seed = seed
        self.dtype = dtype or torch.float32
        self._shapes = target_shapes(self.model_dir, shape.targets)
        self._config = peft_config_bytes(self.model_dir, shape)

    def tensors(self, index: int) -> dict[str, torch.Tensor]:
        """PEFT state dict of adapter `index`: A ~ N(0, 1/d_in), B ~ N(0, 0.1^2/r)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        rank = self.shape.rank
        out: dict[str, torch.Tensor] = {}
        for module, (d_in, d_out) in self._shapes.items():
            a = torch.randn(rank, d_in, generator=gen) * d_in**-0.5  # (r, d_in)
            b = torch.randn(d_out, rank, generator=gen) * (0.1 * rank**-0.5)  # (d_out, r)
            out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.to(self.dtype).contiguous()
            out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.to(self.dtype).contiguous()
        return out

    def write(self, out_dir: Path, index: int) -> Path:
        """Writes adapter `index` into `out_dir` (created) and returns it."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "adapter_config.json").write_bytes(self._config)
        # Written aside and renamed, so a cached directory never holds half a weights file.
        tmp = out_dir / ".adapter_model.safetensors.tmp"
        save_file(self.tensors(index), str(tmp), {"format": "pt"})
        os.replace(tmp, out_dir / "adapter_model.safetensors")
        return out_dir

    def ensure(self, root: Path, count: int) -> list[Path]:
        """Adapter directories root/a0000.. for indexes 0..count-1, writing the missing ones."""
        paths = []
        for index in range(count):
            path = Path(root) / f"a{index:04d}"
            if not (path / "adapter_model.safetensors").is_file():
                self.write(path, index)
            paths.append(path)
        return paths
