"""Test helpers for adapters/: tiny random base models, their BaseModelSpec, PEFT-saved adapters.

The spec builder here is for tests only (the engine has its own): every nn.Linear and GPT-2
Conv1D except lm_head is targetable; embeddings and lm_head are listed as untargetable.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.pytorch_utils import Conv1D

from loraserve.adapters.spec import BaseModelSpec, TargetModule

ARCHS = ("llama", "qwen2", "gpt2")
DEFAULT_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def tiny_model(arch: str) -> PreTrainedModel:
    """A randomly initialized 2-layer model with hidden size 32 and vocab 128."""
    torch.manual_seed(0)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128))
    common = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "vocab_size": 128,
    }
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common))
    raise ValueError(arch)


def spec_for(model: nn.Module) -> BaseModelSpec:
    """The targetable surface of `model` (before any PEFT injection)."""
    modules: dict[str, TargetModule] = {}
    untargetable: set[str] = set()
    for name, module in model.named_modules():
        if name == "lm_head" or isinstance(module, nn.Embedding):
            untargetable.add(name)
        elif isinstance(module, nn.Linear):
            # nn.Linear weight: (out_features, in_features)
            modules[name] = TargetModule(name, module.in_features, module.out_features)
        elif isinstance(module, Conv1D):
            # GPT-2 Conv1D weight: (in_features, out_features), transposed w.r.t. nn.Linear
            in_features, out_features = module.weight.shape
            modules[name] = TargetModule(name, in_features, out_features)
    model_type = getattr(getattr(model, "config", None), "model_type", "unknown")
    return BaseModelSpec(model_type, modules, frozenset(untargetable))


@dataclass(frozen=True)
class SavedAdapter:
    """An adapter as PEFT's save_pretrained wrote it, plus what it was made for."""

    arch: str
    spec: BaseModelSpec
    config_bytes: bytes
    weights_bytes: bytes

    @property
    def config(self) -> dict:
        return json.loads(self.config_bytes)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The saved tensors by key (a fresh copy each call)."""
        return load_safetensors_bytes(self.weights_bytes)

    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> bytes:
        """Weights file bytes holding `tensors` instead."""
        return save_safetensors_bytes(tensors, metadata={"format": "pt"})

    def with_config(self, **changes: object) -> bytes:
        """Config bytes with some keys replaced."""
        return json.dumps({**self.config, **changes}).encode()


def save_adapter(arch: str, directory: Path, **lora_kwargs: object) -> SavedAdapter:
    """Build a tiny `arch` model, wrap it with PEFT LoRA (random A and B) and save it."""
    model = tiny_model(arch)
    spec = spec_for(model)
    kwargs: dict[str, object] = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": DEFAULT_TARGETS[arch],
        "init_lora_weights": False,  # random B too, so the weights are not all zero
        "task_type": "CAUSAL_LM",
    }
    if arch == "gpt2":
        kwargs["fan_in_fan_out"] = True  # what PEFT wants for Conv1D; silences its warning
    kwargs.update(lora_kwargs)
    with warnings.catch_warnings():
        # transformers 5 deprecation noise from inside PEFT; nothing for us to act on.
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, LoraConfig(**kwargs))
        peft_model.save_pretrained(str(directory))
    return SavedAdapter(
        arch=arch,
        spec=spec,
        config_bytes=(directory / "adapter_config.json").read_bytes(),
        weights_bytes=(directory / "adapter_model.safetensors").read_bytes(),
    )


@pytest.fixture(scope="session")
def make_adapter(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[..., SavedAdapter]:
    """Factory fixture: make_adapter("llama", r=8, ...) -> SavedAdapter (cached per arguments)."""
    cache: dict[str, SavedAdapter] = {}

    def make(arch: str, **lora_kwargs: object) -> SavedAdapter:
        key = f"{arch}:{sorted(lora_kwargs.items())!r}"
        if key not in cache:
            cache[key] = save_adapter(arch, tmp_path_factory.mktemp(arch), **lora_kwargs)
        return cache[key]

    return make


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    """Hand-assemble a safetensors file: u64 header length, JSON header, data buffer."""
    raw = json.dumps(header).encode()
    buffer = io.BytesIO()
    buffer.write(len(raw).to_bytes(8, "little"))
    buffer.write(raw)
    buffer.write(data)
    return buffer.getvalue()


@pytest.fixture
def build_safetensors() -> Callable[[dict, bytes], bytes]:
    """The hand-assembler above, as a fixture (test modules do not import conftest)."""
    return safetensors_bytes


@dataclass(frozen=True)
class ModelKit:
    """The helpers above, for tests that build their own model (test modules do not import
    conftest: with several conftest.py files in the tree, "import conftest" is ambiguous)."""

    tiny_model: Callable[[str], PreTrainedModel]
    spec_for: Callable[[nn.Module], BaseModelSpec]
    save_adapter: Callable[..., SavedAdapter]


@pytest.fixture(scope="session")
def model_kit() -> ModelKit:
    return ModelKit(tiny_model=tiny_model, spec_for=spec_for, save_adapter=save_adapter)


@pytest.fixture
def version_meta() -> dict[str, object]:
    """The adapter summary a store commit records (UploadTransaction.commit's `meta`)."""
    return {
        "rank": 4,
        "alpha": 8.0,
        "use_rslora": False,
        "target_modules": ["m.layers.0.q"],
        "description": "",
    }
