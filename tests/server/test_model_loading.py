"""load_base_model: LoRA wrapping and spec per architecture, freezing, dtype/device, refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from serving_support import build_test_model, model_spec_for, prefill_then_decode
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from loraserve.server.engine.lora import MultiLoRALinear
from loraserve.server.engine.model import (
    LoadedModel,
    ModelLoadError,
    load_base_model,
    resolve_device,
    resolve_dtype,
)

ARCHS = ["llama", "qwen2", "gpt2"]
HIDDEN = model_spec_for("llama").hidden_size
INTERMEDIATE = model_spec_for("llama").intermediate_size


def _load(model_dir: Path, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    return load_base_model(model_dir, device=device, dtype=dtype)


@pytest.fixture(scope="module", params=ARCHS)
def loaded(request: pytest.FixtureRequest, model_cache: Path) -> LoadedModel:
    return _load(build_test_model(request.param, model_cache))


def test_every_linear_except_lm_head_is_wrapped(loaded: LoadedModel) -> None:
    modules = dict(loaded.model.named_modules())
    linears = {n for n, m in modules.items() if isinstance(m, nn.Linear | Conv1D)}
    assert "lm_head" in linears
    assert not isinstance(modules["lm_head"], MultiLoRALinear)
    wrapped = {n for n, m in modules.items() if isinstance(m, MultiLoRALinear)}
    assert wrapped, "nothing was wrapped"
    assert wrapped == set(loaded.lora_layers) == set(loaded.spec.modules)
    for name in linears - {"lm_head"}:
        # Each remaining linear is the frozen W0 inside exactly one wrapper.
        parent, _, leaf = name.rpartition(".")
        assert leaf == "base_layer" and parent in wrapped, name
        assert modules[parent].base_layer is modules[name]
    for name, layer in loaded.lora_layers.items():
        assert modules[name] is layer
        assert layer.context is loaded.context, "wrappers must share one LoRAContext"
        assert layer.lora_a is None, "page stacks are allocated only when an adapter arrives"


def test_expected_targets_per_architecture(loaded: LoadedModel) -> None:
    layers = 2
    if loaded.model_type == "gpt2":
        leaves = {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
        expected = {f"transformer.h.{i}.{leaf}" for i in range(layers) for leaf in leaves}
    else:
        leaves = {
            *(f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
            *(f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")),
        }
        expected = {f"model.layers.{i}.{leaf}" for i in range(layers) for leaf in leaves}
    assert set(loaded.spec.modules) == expected
    assert loaded.spec.model_type == loaded.model_type


def test_spec_shapes_match_the_wrapped_layers(loaded: LoadedModel) -> None:
    for name, target in loaded.spec.modules.items():
        layer = loaded.lora_layers[name]
        assert target.name == name
        assert (target.in_features, target.out_features) == (
            layer.in_features,
            layer.out_features,
        )
        # Feed a vector through W0 to check the orientation, whatever the storage layout.
        x = torch.zeros(1, 1, target.in_features)
        assert layer.base_layer(x).shape == (1, 1, target.out_features), name


def test_known_shapes(loaded: LoadedModel) -> None:
    mods = loaded.spec.modules
    if loaded.model_type == "gpt2":
        c_attn = mods["transformer.h.0.attn.c_attn"]
        assert (c_attn.in_features, c_attn.out_features) == (HIDDEN, 3 * HIDDEN)
        c_proj = mods["transformer.h.0.attn.c_proj"]
        assert (c_proj.in_features, c_proj.out_features) == (HIDDEN, HIDDEN)
        c_fc = mods["transformer.h.1.mlp.c_fc"]
        mlp_proj = mods["transformer.h.1.mlp.c_proj"]
        assert c_fc.in_features == HIDDEN and c_fc.out_features > HIDDEN
        assert (mlp_proj.in_features, mlp_proj.out_features) == (c_fc.out_features, HIDDEN)
        assert isinstance(loaded.lora_layers["transformer.h.0.attn.c_attn"].base_layer, Conv1D)
    else:
        spec = model_spec_for(loaded.model_type)
        kv = HIDDEN // spec.num_heads * spec.num_kv_heads
        q = mods["model.layers.0.self_attn.q_proj"]
        k = mods["model.layers.0.self_attn.k_proj"]
        down = mods["model.layers.1.mlp.down_proj"]
        assert (q.in_features, q.out_features) == (HIDDEN, HIDDEN)
        assert (k.in_features, k.out_features) == (HIDDEN, kv)
        assert (down.in_features, down.out_features) == (INTERMEDIATE, HIDDEN)


def test_lm_head_and_embeddings_are_untargetable(loaded: LoadedModel) -> None:
    untargetable = loaded.spec.untargetable
    assert "lm_head" in untargetable
    embeddings = {n for n, m in loaded.model.named_modules() if isinstance(m, nn.Embedding) and n}
    assert embeddings and embeddings <= untargetable
    assert not untargetable & set(loaded.spec.modules)
    if loaded.model_type == "gpt2":
        assert {"transformer.wte", "transformer.wpe"} <= untargetable
    else:
        assert "model.embed_tokens" in untargetable


def test_model_is_frozen_in_eval_mode(loaded: LoadedModel) -> None:
    # Every submodule, the LoRA wrappers included: load_base_model promises eval mode, and a
    # wrapper left in training mode would switch on any dropout a LoRA layer ever gains.
    training = [n or "<root>" for n, m in loaded.model.named_modules() if m.training]
    assert training == [], f"modules left in training mode: {training[:4]}"
    params = list(loaded.model.named_parameters())
    assert params
    assert [n for n, p in params if p.requires_grad] == []
    assert all(p.device.type == "cpu" for _, p in params)
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32


def test_loaded_model_metadata(loaded: LoadedModel, model_cache: Path) -> None:
    assert loaded.max_context == model_spec_for(loaded.model_type).max_position_embeddings
    assert loaded.eos_token_ids and loaded.pad_token_id >= 0
    assert loaded.cache_kwarg in ("cache", "past_key_values")
    assert loaded.model_path == build_test_model(loaded.model_type, model_cache)


def test_auto_resolves_to_cpu_float32_without_a_gpu(
    model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    loaded = _load(build_test_model("llama", model_cache), dtype="auto", device="auto")
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}


def test_cuda_without_a_gpu_is_a_model_load_error(
    model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="cuda"):
        resolve_device("cuda")
    with pytest.raises(ModelLoadError, match="no CUDA device"):
        _load(build_test_model("llama", model_cache), device="cuda")


@pytest.mark.parametrize("choice", ["tpu", "gpu", ""])
def test_unknown_device_is_refused(choice: str) -> None:
    with pytest.raises(ModelLoadError, match="device"):
        resolve_device(choice)


@pytest.mark.parametrize(
    ("choice", "expected"),
    [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)],
)
def test_explicit_dtypes(choice: str, expected: torch.dtype) -> None:
    assert resolve_dtype(choice, torch.device("cpu")) == expected
    with pytest.raises(ModelLoadError, match="dtype"):
        resolve_dtype("int8", torch.device("cpu"))


def test_bfloat16_loads_bf16_weights(model_cache: Path) -> None:
    loaded = _load(build_test_model("qwen2", model_cache), dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    floats = {p.dtype for p in loaded.model.parameters() if p.is_floating_point()}
    assert floats == {torch.bfloat16}
    for layer in loaded.lora_layers.values():
        assert layer.base_layer.weight.dtype == torch.bfloat16
    # The own Llama-family forward computes in bf16 and returns float32 logits for sampling.
    logits, _, _ = prefill_then_decode(loaded, [[1, 2, 3]], [()])
    assert logits.shape[0] == 1 and bool(torch.isfinite(logits).all())


def test_directory_without_config_json(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as err:
        _load(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "config.json" in message
    assert "not a Hugging Face checkpoint directory" in message


def test_missing_directory_and_hub_id_are_refused(tmp_path: Path) -> None:
    for path in (tmp_path / "missing", Path("gpt2"), Path("meta-llama/Llama-3.2-1B")):
        with pytest.raises(ModelLoadError, match=r"no config\.json"):
            _load(path)


def test_pickle_only_checkpoint_is_never_unpickled(
    model_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = build_test_model("llama", model_cache)
    target = tmp_path / "pickled"
    shutil.copytree(source, target)
    state = AutoModelForCausalLM.from_pretrained(source, local_files_only=True).state_dict()
    (target / "model.safetensors").unlink()
    torch.save(state, target / "pytorch_model.bin")
    assert (target / "pytorch_model.bin").stat().st_size > 0

    calls: list[object] = []

    def forbidden_load(*args: object, **kwargs: object) -> object:
        calls.append(args)
        raise AssertionError("torch.load must never be called on a checkpoint")

    monkeypatch.setattr(torch, "load", forbidden_load)
    with pytest.raises((ModelLoadError, OSError)) as err:
        _load(target)
    assert calls == [], "load_base_model unpickled pytorch_model.bin"
    # Whatever the exact wording, a person should see which directory was refused.
    assert str(target) in str(err.value) or "safetensors" in str(err.value)
