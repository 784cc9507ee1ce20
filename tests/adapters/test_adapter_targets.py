"""target_modules resolution against a base model, with PEFT's matching rules."""

from __future__ import annotations

import json

import pytest

from loraserve.adapters.config import parse_adapter_config, resolve_target_modules
from loraserve.adapters.errors import AdapterValidationError
from loraserve.adapters.spec import BaseModelSpec, TargetModule


def make_spec() -> BaseModelSpec:
    names = []
    for layer in range(2):
        for leaf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj"):
            names.append(f"model.layers.{layer}.{leaf}")
    modules = {name: TargetModule(name, 32, 32) for name in names}
    return BaseModelSpec("llama", modules, frozenset({"lm_head", "model.embed_tokens"}))


SPEC = make_spec()


def resolve(targets: object) -> list[str]:
    data = json.dumps({"peft_type": "LORA", "r": 4, "target_modules": targets}).encode()
    return resolve_target_modules(parse_adapter_config(data, max_rank=8), SPEC)


def refused(targets: object) -> str:
    with pytest.raises(AdapterValidationError) as info:
        resolve(targets)
    assert info.value.field == "adapter_config.json:target_modules"
    return info.value.message


def test_list_entries_match_by_dotted_suffix_in_model_order() -> None:
    assert resolve(["v_proj", "q_proj"]) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]


def test_list_entries_match_longer_suffixes_and_full_names() -> None:
    assert resolve(["layers.1.mlp.up_proj", "model.layers.0.self_attn.k_proj"]) == [
        "model.layers.0.self_attn.k_proj",
        "model.layers.1.mlp.up_proj",
    ]


def test_suffix_must_start_at_a_dot() -> None:
    # "proj" is a suffix of "q_proj" as a string, but not a module-name component.
    assert "'proj' matches no targetable layer" in refused(["proj"])


def test_regex_must_match_the_whole_name() -> None:
    assert resolve(r".*layers\.1\..*_proj") == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.k_proj",
        "model.layers.1.self_attn.v_proj",
        "model.layers.1.mlp.up_proj",
    ]
    assert "matches no targetable layer" in refused("q_proj")  # fullmatch, not search


def test_all_linear_is_every_targetable_layer() -> None:
    assert resolve("all-linear") == list(SPEC.modules)


@pytest.mark.parametrize(
    "targets", [["q_proj", "lm_head"], ["embed_tokens"], "lm_head", r".*", r"model\.embed_.*"]
)
def test_embedding_and_lm_head_targets_are_refused(targets: object) -> None:
    assert "embedding and lm_head targets are not supported" in refused(targets)


def test_entry_matching_nothing_is_named() -> None:
    message = refused(["q_proj", "c_attn"])
    assert "'c_attn' matches no targetable layer" in message
    assert "q_proj" in message  # the available leaf names are listed


def test_invalid_regex_is_refused() -> None:
    assert "not a valid regular expression" in refused(r"model\.(q_proj")
