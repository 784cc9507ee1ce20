"""Loading PEFT-saved adapters into checked tensors (float32, or as stored for the server), and
refusing every mismatch by key."""

from __future__ import annotations

import ctypes
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from peft import LoraConfig, get_peft_model

from loraserve.adapters.config import resolve_target_modules
from loraserve.adapters.errors import AdapterValidationError
from loraserve.adapters.weights import AdapterWeights, load_adapter_weights, lora_keys

if TYPE_CHECKING:
    from conftest import ModelKit, SavedAdapter

MAX_RANK = 64
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def load(
    saved: SavedAdapter,
    *,
    config: bytes | None = None,
    weights: bytes | None = None,
    as_stored: bool = False,
) -> AdapterWeights:
    return load_adapter_weights(
        saved.config_bytes if config is None else config,
        saved.weights_bytes if weights is None else weights,
        saved.spec,
        max_rank=MAX_RANK,
        as_stored=as_stored,
    )


def refused(saved: SavedAdapter, **files: bytes) -> AdapterValidationError:
    with pytest.raises(AdapterValidationError) as info:
        load(saved, **files)
    return info.value


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_peft_adapters_load_and_match_the_saved_tensors(make_adapter: Callable, arch: str) -> None:
    saved = make_adapter(arch)
    weights = load(saved)
    saved_tensors = saved.tensors()
    assert len(saved_tensors) == 2 * len(weights.modules)
    for name, (a, b) in weights.modules.items():
        key_a, key_b = lora_keys(name)
        module = saved.spec.modules[name]
        assert a.shape == (4, module.in_features)  # A: (r, d_in)
        assert b.shape == (module.out_features, 4)  # B: (d_out, r)
        for tensor in (a, b):
            assert tensor.dtype == torch.float32 and tensor.is_contiguous()
            assert tensor.device.type == "cpu"
        torch.testing.assert_close(a, saved_tensors[key_a], rtol=0, atol=0)
        torch.testing.assert_close(b, saved_tensors[key_b], rtol=0, atol=0)
        assert b.abs().sum() > 0  # init_lora_weights=False: B is not the zero init
    assert weights.nbytes == sum(t.numel() * 4 for t in saved_tensors.values())
    assert weights.config.rank == 4


def test_gpt2_conv1d_adapters_use_linear_orientation(make_adapter: Callable) -> None:
    weights = load(make_adapter("gpt2"))
    a, b = weights.modules["transformer.h.0.attn.c_attn"]
    assert a.shape == (4, 32) and b.shape == (96, 4)  # (r, d_in), (d_out, r) despite Conv1D
    a, b = weights.modules["transformer.h.1.mlp.c_proj"]
    assert a.shape == (4, 128) and b.shape == (32, 4)
    # "c_proj" matches both attn.c_proj and mlp.c_proj, as in PEFT.
    assert len(weights.modules) == 8


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loaded_factors_reproduce_peft_forward(
    tmp_path: Path, model_kit: ModelKit, arch: str
) -> None:
    """y_peft = W0 x + scale * B (A x) with our A, B and scale, per targeted layer."""
    model = model_kit.tiny_model(arch)
    spec = model_kit.spec_for(model)
    base_layers = {name: module for name, module in model.named_modules() if name in spec.modules}
    kwargs: dict = {"r": 4, "lora_alpha": 12, "use_rslora": True, "init_lora_weights": False}
    kwargs["target_modules"] = ["c_attn", "c_fc"] if arch == "gpt2" else ["v_proj", "down_proj"]
    if arch == "gpt2":
        kwargs["fan_in_fan_out"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, LoraConfig(**kwargs))
        peft_model.save_pretrained(str(tmp_path))
    weights = load_adapter_weights(
        (tmp_path / "adapter_config.json").read_bytes(),
        (tmp_path / "adapter_model.safetensors").read_bytes(),
        spec,
        max_rank=MAX_RANK,
    )
    peft_layers = dict(peft_model.base_model.model.named_modules())
    torch.manual_seed(1)
    with torch.no_grad():
        for name, (a, b) in weights.modules.items():
            base = base_layers[name]  # the original layer, now wrapped by PEFT
            x = torch.randn(3, spec.modules[name].in_features)  # (3, d_in)
            expected = peft_layers[name](x)  # (3, d_out)
            ours = base(x) + weights.config.scale * (x @ a.T) @ b.T  # (3, d_out)
            torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize(("dtype", "code"), [(torch.float16, "F16"), (torch.bfloat16, "BF16")])
def test_half_precision_weights_become_float32(
    make_adapter: Callable, dtype: torch.dtype, code: str
) -> None:
    saved = make_adapter("llama")
    halves = {k: v.to(dtype) for k, v in saved.tensors().items()}
    weights = load(saved, weights=saved.with_tensors(halves))
    a, _ = weights.modules["model.layers.0.self_attn.q_proj"]
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, halves[f"{Q0}.lora_A.weight"].float(), rtol=0, atol=0)


def test_non_float_tensor_is_refused(make_adapter: Callable) -> None:
    saved = make_adapter("llama")
    tensors = saved.tensors()
    tensors[f"{Q0}.lora_A.weight"] = tensors[f"{Q0}.lora_A.weight"].to(torch.int32)
    error = refused(saved, weights=saved.with_tensors(tensors))
    assert error.field == f"adapter_model.safetensors:{Q0}.lora_A.weight"
    assert "dtype I32 is not a float type" in error.message


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_wrong_shape_is_refused_naming_key_and_shapes(make_adapter: Callable, arch: str) -> None:
    saved = make_adapter(arch)
    tensors = saved.tensors()
    key = sorted(k for k in tensors if k.endswith("lora_A.weight"))[0]
    tensors[key] = tensors[key].T.contiguous()  # (d_in, r) instead of (r, d_in)
    error = refused(saved, weights=saved.with_tensors(tensors))
    assert error.field == f"adapter_model.safetensors:{key}"
    d_in = tensors[key].shape[0]
    assert f"has shape [{d_in}, 4], expected [4, {d_in}]" in error.message


def test_rank_disagreeing_with_config_is_refused(make_adapter: Callable) -> None:
    saved = make_adapter("llama")
    error = refused(saved, config=saved.with_config(r=8))
    assert error.field.startswith("adapter_model.safetensors:")
    assert "expected [8, 32]" in error.message and "r=8" in error.message


def test_missing_tensor_is_refused_naming_it(make_adapter: Callable) -> None:
    saved = make_adapter("qwen2")
    tensors = saved.tensors()
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    del tensors[key]
    error = refused(saved, weights=saved.with_tensors(tensors))
    assert error.field == f"adapter_model.safetensors:{key}"
    assert "missing" in error.message


def test_config_targeting_more_than_the_file_has_is_refused(make_adapter: Callable) -> None:
    saved = make_adapter("llama", target_modules=["q_proj"])
    error = refused(saved, config=saved.with_config(target_modules=["q_proj", "k_proj"]))
    assert error.field == (
        "adapter_model.safetensors:base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    )


@pytest.mark.parametrize(
    ("extra_key", "shape", "message"),
    [
        ("base_model.model.model.embed_tokens.lora_embedding_A", (4, 128), "embedding LoRA"),
        (f"{Q0}.lora_B.bias", (32,), "LoRA biases are not supported"),
        (f"{Q0}.lora_magnitude_vector", (32,), "DoRA"),
        ("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight", (4, 32), "not selected"),
        (
            "model.layers.0.self_attn.q_proj.lora_A.weight",
            (4, 32),
            "start with 'base_model.model.'",
        ),
        (f"{Q0}.lora_C.weight", (4, 4), "unexpected tensor"),
    ],
)
def test_extra_tensor_is_refused_naming_it(
    make_adapter: Callable, extra_key: str, shape: tuple[int, ...], message: str
) -> None:
    saved = make_adapter("llama", target_modules=["q_proj", "v_proj"])
    tensors = saved.tensors()
    tensors[extra_key] = torch.zeros(shape)
    error = refused(saved, weights=saved.with_tensors(tensors))
    assert error.field == f"adapter_model.safetensors:{extra_key}"
    assert message in error.message


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused_naming_the_key(make_adapter: Callable, bad: float) -> None:
    saved = make_adapter("gpt2")
    tensors = saved.tensors()
    key = "base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight"
    tensors[key][5, 2] = bad
    error = refused(saved, weights=saved.with_tensors(tensors))
    assert error.field == f"adapter_model.safetensors:{key}"
    assert "contains NaN or Inf" in error.message


@pytest.mark.parametrize("where", ["first", "last"])
def test_non_finite_values_at_either_end_of_the_adapter_are_refused(
    make_adapter: Callable, where: str
) -> None:
    """The finiteness check runs once over every factor: the first element of the first tensor
    and the last of the last are in it too, and the error still names the tensor."""
    saved = make_adapter("llama")
    tensors = saved.tensors()
    names = [n for module in saved.spec.modules for n in lora_keys(module) if n in tensors]
    key = names[0] if where == "first" else names[-1]
    tensors[key].view(-1)[0 if where == "first" else -1] = float("nan")
    error = refused(saved, weights=saved.with_tensors(tensors))
    assert error.field == f"adapter_model.safetensors:{key}"
    assert "contains NaN or Inf" in error.message


def test_mixed_dtypes_load_as_float32_each_as_stored(make_adapter: Callable) -> None:
    """A file may hold each tensor in its own float type; each loads as its own values."""
    saved = make_adapter("llama")
    stored = {
        key: t.to((torch.bfloat16, torch.float16, torch.float32)[i % 3])
        for i, (key, t) in enumerate(sorted(saved.tensors().items()))
    }
    weights = load(saved, weights=saved.with_tensors(stored))
    for name, (a, b) in weights.modules.items():
        key_a, key_b = lora_keys(name)
        assert a.dtype == b.dtype == torch.float32 and a.is_contiguous() and b.is_contiguous()
        assert torch.equal(a, stored[key_a].float()) and torch.equal(b, stored[key_b].float())


def test_half_overflow_to_inf_is_refused(make_adapter: Callable) -> None:
    saved = make_adapter("llama")
    tensors = {k: v.half() for k, v in saved.tensors().items()}
    tensors[f"{Q0}.lora_A.weight"][0, 0] = 70000.0  # beyond float16's range: becomes inf
    error = refused(saved, weights=saved.with_tensors(tensors))
    assert "contains NaN or Inf" in error.message


def test_config_and_structure_errors_surface_first(make_adapter: Callable) -> None:
    saved = make_adapter("llama")
    assert refused(saved, config=saved.with_config(use_dora=True)).field == (
        "adapter_config.json:use_dora"
    )
    assert "trailing bytes" in refused(saved, weights=saved.weights_bytes + b"\x00").message
    assert (
        "embedding and lm_head"
        in refused(saved, config=saved.with_config(target_modules=["lm_head"])).message
    )


def test_regex_and_all_linear_adapters_load(tmp_path: Path, model_kit: ModelKit) -> None:
    save_adapter = model_kit.save_adapter
    regex = save_adapter("llama", tmp_path / "re", target_modules=r".*\.(q|v)_proj")
    weights = load(regex)
    assert len(weights.modules) == 4
    linear = save_adapter("qwen2", tmp_path / "all", target_modules="all-linear")
    weights = load(linear)
    assert set(weights.modules) == set(linear.spec.modules)
    assert resolve_target_modules(weights.config, linear.spec) == list(linear.spec.modules)


def _pad_header(weights: bytes, pad: int) -> bytes:
    """The same file with `pad` more spaces in its header (the format allows them): the data
    buffer starts `pad` bytes later, so its tensors' addresses shift by `pad`."""
    length = int.from_bytes(weights[:8], "little")
    header = weights[8 : 8 + length] + b" " * pad
    return len(header).to_bytes(8, "little") + header + weights[8 + length :]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pad", [0, 1, 2])
def test_factors_are_the_stored_values_read_in_place_or_copied_out(
    make_adapter: Callable, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, pad: int
) -> None:
    """One dtype at element-aligned offsets converts the data buffer in one pass; an offset
    that is not a multiple of the element size goes through the safetensors library. Either
    way the factors are the stored values."""
    import loraserve.adapters.weights as weights_module

    saved = make_adapter("llama")
    stored = {k: v.to(dtype) for k, v in saved.tensors().items()}
    data = _pad_header(saved.with_tensors(stored), pad)
    library_loads = []
    library = weights_module.load_safetensors_bytes
    monkeypatch.setattr(
        weights_module,
        "load_safetensors_bytes",
        lambda raw: library_loads.append(1) or library(raw),
    )
    weights = load(saved, weights=data)
    aligned = (8 + int.from_bytes(data[:8], "little")) % dtype.itemsize == 0
    assert library_loads == ([] if aligned else [1])
    for name, (a, b) in weights.modules.items():
        key_a, key_b = lora_keys(name)
        assert a.dtype == b.dtype == torch.float32 and a.is_contiguous() and b.is_contiguous()
        assert torch.equal(a, stored[key_a].float()) and torch.equal(b, stored[key_b].float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_factors_do_not_share_memory_with_the_file_bytes(
    make_adapter: Callable, dtype: torch.dtype
) -> None:
    saved = make_adapter("llama")
    stored = {k: v.to(dtype) for k, v in saved.tensors().items()}
    buffer = bytearray(saved.with_tensors(stored))
    weights = load(saved, weights=buffer)  # type: ignore[arg-type]
    before = {name: (a.clone(), b.clone()) for name, (a, b) in weights.modules.items()}
    length = int.from_bytes(buffer[:8], "little")
    buffer[8 + length :] = bytes(len(buffer) - 8 - length)  # zero the whole data buffer
    for name, (a, b) in weights.modules.items():
        assert torch.equal(a, before[name][0]) and torch.equal(b, before[name][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_as_stored_keeps_the_file_dtype_as_views_of_its_bytes(
    make_adapter: Callable, dtype: torch.dtype
) -> None:
    """The server's cold load: no conversion pass; the values are the file's, in its dtype,
    read in place from the immutable bytes (which the views keep alive)."""
    saved = make_adapter("llama")
    stored = {k: v.to(dtype) for k, v in saved.tensors().items()}
    data = saved.with_tensors(stored)
    weights = load(saved, weights=data, as_stored=True)
    converted = load(saved, weights=data)
    begin = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value  # the bytes' buffer
    assert begin is not None
    for name, (a, b) in weights.modules.items():
        key_a, key_b = lora_keys(name)
        assert a.dtype == b.dtype == dtype and a.is_contiguous() and b.is_contiguous()
        assert torch.equal(a, stored[key_a]) and torch.equal(b, stored[key_b])
        assert torch.equal(a.float(), converted.modules[name][0])
        for factor in (a, b):
            assert begin <= factor.data_ptr() < begin + len(data), "a view of the bytes, no copy"
    assert weights.numel == converted.numel
    assert weights.nbytes == converted.nbytes * dtype.itemsize // 4


def test_as_stored_copies_a_buffer_that_could_change(make_adapter: Callable) -> None:
    saved = make_adapter("llama")
    stored = {k: v.to(torch.bfloat16) for k, v in saved.tensors().items()}
    buffer = bytearray(saved.with_tensors(stored))
    weights = load(saved, weights=buffer, as_stored=True)  # type: ignore[arg-type]
    before = {name: (a.clone(), b.clone()) for name, (a, b) in weights.modules.items()}
    length = int.from_bytes(buffer[:8], "little")
    buffer[8 + length :] = bytes(len(buffer) - 8 - length)
    for name, (a, b) in weights.modules.items():
        assert a.dtype == torch.bfloat16
        assert torch.equal(a, before[name][0]) and torch.equal(b, before[name][1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_as_stored_still_refuses_non_finite_half_precision(
    make_adapter: Callable, bad: float
) -> None:
    saved = make_adapter("llama")
    stored = {k: v.to(torch.bfloat16) for k, v in saved.tensors().items()}
    key = sorted(stored)[3]
    stored[key] = stored[key].clone()
    stored[key].view(-1)[5] = bad
    with pytest.raises(AdapterValidationError, match="NaN or Inf"):
        load(saved, weights=saved.with_tensors(stored), as_stored=True)


def test_as_stored_loads_mixed_dtypes_as_float32(make_adapter: Callable) -> None:
    saved = make_adapter("llama")
    stored = {
        key: t.to((torch.bfloat16, torch.float32)[i % 2])
        for i, (key, t) in enumerate(sorted(saved.tensors().items()))
    }
    weights = load(saved, weights=saved.with_tensors(stored), as_stored=True)
    for a, b in weights.modules.values():
        assert a.dtype == b.dtype == torch.float32


@pytest.mark.parametrize(
    ("stored", "as_stored"),
    [("bfloat16", True), ("bfloat16", False), ("float32", True), ("mixed", False)],
)
def test_every_factor_is_a_view_of_the_one_buffer_the_weights_carry(
    make_adapter: Callable, stored: str, as_stored: bool
) -> None:
    """AdapterWeights.flat holds every factor (a cold load uploads it as it is and lays the
    pages out on the device), and `structure` is what they were read with."""
    saved = make_adapter("llama")
    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    tensors = {
        key: t.to(dtypes[i % 3] if stored == "mixed" else getattr(torch, stored))
        for i, (key, t) in enumerate(sorted(saved.tensors().items()))
    }
    weights = load(saved, weights=saved.with_tensors(tensors), as_stored=as_stored)
    flat = weights.flat
    assert flat is not None and flat.dim() == 1 and weights.structure is not None
    storage, base = flat.untyped_storage().data_ptr(), flat.storage_offset()
    covered = 0
    for a, b in weights.modules.values():
        for factor in (a, b):
            assert factor.untyped_storage().data_ptr() == storage and factor.dtype == flat.dtype
            assert base <= factor.storage_offset() <= base + flat.numel() - factor.numel()
            covered += factor.numel()
    assert covered == flat.numel(), "the buffer holds the factors and nothing else"
    assert weights.numel == covered and weights.nbytes == covered * flat.element_size()
