"""Bench adapters are byte-for-byte PEFT's format, valid for loraserve, and cheap to make."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from loraserve.bench.adapter_factory import AdapterFactory, LoraShape, target_shapes
from loraserve.bench.models import bench_model_path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bench_model_path("tiny", cache_dir=tmp_path_factory.mktemp("bench-cache"))


def _peft_reference(model_dir: Path, out: Path, shape: LoraShape) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    config = LoraConfig(
        r=shape.rank,
        lora_alpha=shape.alpha,
        target_modules=list(shape.targets),
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    get_peft_model(base, config).save_pretrained(out)
    return out


def test_files_match_what_peft_writes(tiny_model: Path, tmp_path: Path) -> None:
    shape = LoraShape(rank=4, alpha=8.0)
    ours = AdapterFactory(tiny_model, shape, seed=1).write(tmp_path / "ours", 0)
    ref = _peft_reference(tiny_model, tmp_path / "ref", shape)

    ours_config = json.loads((ours / "adapter_config.json").read_text())
    ref_config = json.loads((ref / "adapter_config.json").read_text())
    ours_config.pop("base_model_name_or_path")
    ref_config.pop("base_model_name_or_path")
    assert sorted(ours_config.pop("target_modules")) == sorted(ref_config.pop("target_modules"))
    assert ours_config == ref_config

    def tensors(directory: Path) -> tuple[dict, dict[str, tuple[int, ...]]]:
        with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
            return f.metadata(), {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118

    ours_meta, ours_shapes = tensors(ours)
    ref_meta, ref_shapes = tensors(ref)
    assert ours_shapes == ref_shapes
    assert ours_meta == ref_meta


def test_adapters_are_random_deterministic_and_non_trivial(
    tiny_model: Path, tmp_path: Path
) -> None:
    factory = AdapterFactory(tiny_model, LoraShape(rank=4, alpha=8.0), seed=3)
    a0, a0_again, a1 = factory.tensors(0), factory.tensors(0), factory.tensors(1)
    assert a0.keys() == a1.keys()
    for key in a0:
        assert torch.equal(a0[key], a0_again[key])
        assert not torch.equal(a0[key], a1[key])
        assert a0[key].abs().sum() > 0  # lora_B too: the adapter changes the output
    paths = factory.ensure(tmp_path / "pool", 3)
    assert [p.name for p in paths] == ["a0000", "a0001", "a0002"]
    assert all((p / "adapter_model.safetensors").is_file() for p in paths)


def test_loraserve_accepts_them(tiny_model: Path, tmp_path: Path) -> None:
    from loraserve.adapters.weights import load_adapter_weights
    from loraserve.server.adapter_service import AdapterService  # noqa: F401  (import check)
    from loraserve.server.engine.model import load_base_model

    directory = AdapterFactory(tiny_model, LoraShape(rank=4, alpha=8.0)).write(tmp_path / "a", 0)
    loaded = load_base_model(tiny_model, device="cpu", dtype="float32")
    weights = load_adapter_weights(
        (directory / "adapter_config.json").read_bytes(),
        (directory / "adapter_model.safetensors").read_bytes(),
        loaded.spec,
        max_rank=8,
    )
    assert set(weights.modules) == set(target_shapes(tiny_model, LoraShape().targets))
