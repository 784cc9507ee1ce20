"""Loads the frozen base model and tokenizer from a local checkpoint and wraps its LoRA targets.

Everything is local: HF_HUB_OFFLINE is forced and `local_files_only=True` is passed, so a hub id
or a missing directory fails fast instead of reaching a network.
"""

from __future__ import annotations

import inspect
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from loraserve.adapters.spec import BaseModelSpec, TargetModule
from loraserve.server.engine import llama
from loraserve.server.engine.lora import LoRAContext, MultiLoRALinear, is_lora_target

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The checkpoint cannot be loaded (missing, not a causal LM, unsupported)."""


@dataclass
class LoadedModel:
    """The frozen base model with its LoRA layers wrapped, and what the engine needs about it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: BaseModelSpec
    lora_layers: dict[str, MultiLoRALinear]
    context: LoRAContext
    device: torch.device
    dtype: torch.dtype
    model_path: Path
    max_context: int
    """Longest sequence (prompt + completion) the model's positions allow."""
    eos_token_ids: frozenset[int]
    pad_token_id: int
    cache_kwarg: str = "past_key_values"
    """Name of the forward argument taking the KV cache ("cache" in newer transformers)."""
    own_forward: bool = False
    """`model` is loraserve's own Llama-family forward (server.engine.llama, paged KV);
    otherwise a transformers model run through the generic path."""

    @property
    def architecture(self) -> str:
        names = getattr(self.model.config, "architectures", None)
        return str(names[0]) if names else type(self.model).__name__

    @property
    def model_type(self) -> str:
        return str(self.model.config.model_type)


def resolve_device(choice: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu; "cuda" without a GPU is an error."""
    if choice == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError("device: cuda was requested but torch sees no CUDA device")
        return torch.device("cuda:0")
    if choice == "cpu":
        return torch.device("cpu")
    raise ModelLoadError(f"device: unknown choice {choice!r}")


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    """ "auto" -> bfloat16 on CUDA (float16 where bf16 is unsupported), float32 on CPU."""
    if choice == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if choice not in _DTYPES:
        raise ModelLoadError(f"dtype: unknown choice {choice!r}")
    return _DTYPES[choice]


def _max_context(model: PreTrainedModel) -> int:
    config = model.config
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    return _eos_ids_from((model.generation_config, model.config), tokenizer)


def _eos_ids_from(sources: tuple, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    for source in sources:
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def find_lora_targets(model: PreTrainedModel) -> tuple[dict[str, nn.Module], frozenset[str]]:
    """Splits the model's linear layers into targetable ones and the untargetable rest.

    The output projection (lm_head, possibly tied to the embedding) and embeddings are not
    targetable: an adapter naming them is refused at upload.
    """
    output = model.get_output_embeddings()
    targets: dict[str, nn.Module] = {}
    untargetable: set[str] = set()
    for name, module in model.named_modules():
        if not name:
            continue
        if module is output or isinstance(module, nn.Embedding):
            untargetable.add(name)
        elif is_lora_target(module):
            targets[name] = module
    return targets, frozenset(untargetable)


def _spec_for(model: PreTrainedModel, targets: dict[str, nn.Module], untargetable: frozenset[str]):
    modules: dict[str, TargetModule] = {}
    for name, module in targets.items():
        if isinstance(module, nn.Linear):
            d_in, d_out = module.in_features, module.out_features
        else:  # Conv1D: weight is (d_in, d_out)
            d_in, d_out = module.weight.shape
        modules[name] = TargetModule(name=name, in_features=int(d_in), out_features=int(d_out))
    return BaseModelSpec(
        model_type=str(model.config.model_type), modules=modules, untargetable=untargetable
    )


def wrap_lora_layers(
    model: PreTrainedModel,
) -> tuple[BaseModelSpec, dict[str, MultiLoRALinear], LoRAContext]:
    """Replaces every targetable linear with a MultiLoRALinear sharing one LoRAContext."""
    targets, untargetable = find_lora_targets(model)
    spec = _spec_for(model, targets, untargetable)
    context = LoRAContext()
    layers: dict[str, MultiLoRALinear] = {}
    for name, module in targets.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = MultiLoRALinear(module, context=context)
        setattr(parent, child, wrapped)
        layers[name] = wrapped
    return spec, layers, context


def load_base_model(
    model_path: Path, *, device: str, dtype: str, implementation: str = "auto"
) -> LoadedModel:
    """Loads a local checkpoint directory, frozen in eval mode, with its LoRA layers wrapped.

    implementation: "auto" runs the Llama family (Llama, Mistral, Qwen2) on loraserve's own
    forward and everything else through transformers; "generic" forces transformers.
    """
    model_path = Path(model_path)
    if not (model_path / "config.json").is_file():
        raise ModelLoadError(
            f"model: {model_path} is not a Hugging Face checkpoint directory (no config.json); "
            "loraserve only loads local checkpoints"
        )
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if implementation not in ("auto", "generic"):
        raise ModelLoadError(f"implementation: unknown choice {implementation!r}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model: cannot load {model_path}: {exc}") from exc
    if implementation == "auto" and llama.unsupported_reason(config) is None:
        return _load_own(model_path, config, tokenizer, torch_device, torch_dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_path, local_files_only=True, dtype=torch_dtype, use_safetensors=True
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model: cannot load {model_path}: {exc}") from exc
    model.to(torch_device)
    model.eval()
    model.requires_grad_(False)
    spec, layers, context = wrap_lora_layers(model)
    model.eval()  # again: the wrappers are new modules and start in training mode
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = min(eos) if eos else 0
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        lora_layers=layers,
        context=context,
        device=torch_device,
        dtype=torch_dtype,
        model_path=model_path,
        max_context=_max_context(model),
        eos_token_ids=eos,
        pad_token_id=int(pad),
        cache_kwarg=_cache_kwarg(model),
    )


def _load_own(
    model_path: Path,
    config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device,
    dtype: torch.dtype,
) -> LoadedModel:
    """The Llama family on loraserve's own forward, read straight from the safetensors."""
    context = LoRAContext()
    try:
        model = llama.load_llama(model_path, config, dtype, device, context)
    except (OSError, KeyError, ValueError) as exc:
        raise ModelLoadError(f"model: cannot load {model_path}: {exc}") from exc
    layers = {n: m for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)}
    untargetable = frozenset(
        n for n, m in model.named_modules() if m is model.lm_head or isinstance(m, nn.Embedding)
    )
    spec = BaseModelSpec(
        model_type=str(config.model_type),
        modules={
            name: TargetModule(name=name, in_features=m.in_features, out_features=m.out_features)
            for name, m in layers.items()
        },
        untargetable=untargetable,
    )
    generation = None
    with contextlib.suppress(OSError, ValueError):
        generation = GenerationConfig.from_pretrained(model_path, local_files_only=True)
    eos = _eos_ids_from((generation, config), tokenizer)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = min(eos) if eos else 0
    return LoadedModel(
        model=model,  # type: ignore[arg-type]
        tokenizer=tokenizer,
        spec=spec,
        lora_layers=layers,  # type: ignore[arg-type]
        context=context,
        device=device,
        dtype=dtype,
        model_path=model_path,
        max_context=int(config.max_position_embeddings),
        eos_token_ids=eos,
        pad_token_id=int(pad),
        own_forward=True,
    )


def _cache_kwarg(model: PreTrainedModel) -> str:
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"
