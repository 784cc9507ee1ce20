"""What the base model offers to adapters: its LoRA-targetable linear layers and their shapes.

The engine builds a BaseModelSpec once from the loaded model; validation and the store use it
as plain data, so neither needs torch devices nor the model itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TargetModule:
    """One linear layer an adapter may change: y = W0 x, W0 of shape (out_features, in_features)."""

    name: str
    """Full dotted module name inside the base model, e.g. "model.layers.0.self_attn.q_proj"."""
    in_features: int
    """d_in: lora_A has shape (r, in_features)."""
    out_features: int
    """d_out: lora_B has shape (out_features, r)."""


@dataclass(frozen=True)
class BaseModelSpec:
    """The targetable surface of one base model."""

    model_type: str
    """Hugging Face model_type, e.g. "llama", "qwen2", "gpt2"."""
    modules: dict[str, TargetModule]
    """Every targetable linear layer by full name (transformer blocks only; never lm_head)."""
    untargetable: frozenset[str] = field(default_factory=frozenset)
    """Names of layers that exist but cannot be targeted (lm_head, embeddings): a clear error."""

    def leaf_names(self) -> list[str]:
        """The distinct last name components of targetable modules, e.g. ["k_proj", "q_proj"]."""
        return sorted({name.rsplit(".", 1)[-1] for name in self.modules})
