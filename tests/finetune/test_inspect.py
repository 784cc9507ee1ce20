"""Rank advice (finetune.inspect): effective rank on updates of known rank, and SVD truncation.

The synthetic adapters have dW = scale * B @ A = U diag(s) V^T of exactly rank k < r, hidden
behind a random invertible r x r mix (A -> M A, B -> B M^-1), so no row or column is visibly zero.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from serving_support import AdapterShape, build_test_model, make_peft_adapter
from transformers import AutoModelForCausalLM

from loraserve.adapters.config import parse_adapter_config
from loraserve.adapters.weights import load_adapter_weights, lora_keys
from loraserve.finetune.inspect import (
    DriftReport,
    InspectReport,
    effective_rank,
    inspect_adapter,
    main,
    model_spec,
    output_drift,
    suggest_rank,
    thin_svd,
    truncate_adapter,
)

RANK = 8
ALPHA = 16.0
TARGETS = ["q_proj", "v_proj", "down_proj"]
TRUE_RANK = {"q_proj": 3, "v_proj": 1, "down_proj": 3}
"""Rank of each synthetic update, by layer kind; the adapter needs max = 3."""
SINGULAR_VALUES = [4.0, 3.0, 2.5]
PROMPTS = ["hello world, this is a test", "the quick brown fox jumps", "1 2 3 4 5 6 7"]


@pytest.fixture(scope="module")
def model_dir(model_cache: Path) -> Path:
    return build_test_model("llama", model_cache)


def _low_rank_factors(
    d_in: int, d_out: int, k: int, scale: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A (r, d_in), B (d_out, r), dW) with scale * B @ A == dW of rank exactly k."""
    u, _ = torch.linalg.qr(torch.randn(d_out, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d_in, k, generator=gen, dtype=torch.float64))
    s = torch.tensor(SINGULAR_VALUES[:k], dtype=torch.float64)
    root = torch.sqrt(s / scale)
    a = torch.zeros(RANK, d_in, dtype=torch.float64)
    b = torch.randn(d_out, RANK, generator=gen, dtype=torch.float64)  # extra columns hit A's zeros
    a[:k] = root[:, None] * v.T
    b[:, :k] = u * root[None, :]
    mix = torch.randn(RANK, RANK, generator=gen, dtype=torch.float64) + 3 * torch.eye(RANK)
    a, b = mix @ a, b @ torch.linalg.inv(mix)
    delta = u @ torch.diag(s) @ v.T
    return a.float(), b.float(), delta


@pytest.fixture(scope="module")
def known_rank_adapter(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, torch.Tensor]]:
    """A PEFT adapter (r=8) whose every update has rank TRUE_RANK[kind]; and the dense updates."""
    out = tmp_path_factory.mktemp("known-rank")
    make_peft_adapter(model_dir, out, AdapterShape(rank=RANK, alpha=ALPHA, targets=TARGETS))
    tensors = load_file(out / "adapter_model.safetensors")
    gen = torch.Generator().manual_seed(1)
    deltas: dict[str, torch.Tensor] = {}
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        name = key[len("base_model.model.") : -len(".lora_A.weight")]
        key_a, key_b = lora_keys(name)
        d_in, d_out = tensors[key_a].shape[1], tensors[key_b].shape[0]
        k = TRUE_RANK[name.rsplit(".", 1)[-1]]
        a, b, deltas[name] = _low_rank_factors(d_in, d_out, k, ALPHA / RANK, gen)
        tensors[key_a], tensors[key_b] = a.contiguous(), b.contiguous()
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out, deltas


def _dense_updates(adapter_dir: Path, spec) -> dict[str, torch.Tensor]:
    weights = load_adapter_weights(
        (adapter_dir / "adapter_config.json").read_bytes(),
        (adapter_dir / "adapter_model.safetensors").read_bytes(),
        spec,
        max_rank=64,
    )
    scale = weights.config.scale
    return {n: scale * b.double() @ a.double() for n, (a, b) in weights.modules.items()}


def test_effective_rank_and_suggestion_rules() -> None:
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert effective_rank(s, 0.5) == 1  # 9/14
    assert effective_rank(s, 0.9) == 2  # 13/14 = 0.93
    assert effective_rank(s, 0.99) == 3
    assert effective_rank(torch.zeros(4), 0.99) == 0
    assert suggest_rank(3, 8) == 4
    assert suggest_rank(5, 8) == 8
    assert suggest_rank(0, 8) == 1
    assert suggest_rank(6, 6) == 6  # never above r


def test_thin_svd_matches_dense() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 40, generator=gen), torch.randn(30, 6, generator=gen)
    u, s, v = thin_svd(a, b)
    dense = b.double() @ a.double()
    assert torch.allclose(s, torch.linalg.svdvals(dense)[:6], atol=1e-9)
    assert torch.allclose(u @ torch.diag(s) @ v.T, dense, atol=1e-9)


def test_inspect_finds_known_rank(model_dir: Path, known_rank_adapter) -> None:
    adapter_dir, deltas = known_rank_adapter
    spec = model_spec(model_dir)
    report = inspect_adapter(adapter_dir, spec)
    assert isinstance(report, InspectReport)
    assert report.rank == RANK and math.isclose(report.scale, ALPHA / RANK)
    assert {layer.name for layer in report.layers} == set(deltas)
    for layer in report.layers:
        k = TRUE_RANK[layer.name.rsplit(".", 1)[-1]]
        assert layer.rank_99 == k, layer.name
        assert 1 <= layer.rank_90 <= k
        assert layer.singular_values[:k] == pytest.approx(SINGULAR_VALUES[:k], rel=1e-4)
        # Rank k exactly: the rest is float32 storage noise, far below the largest value.
        assert max(layer.singular_values[k:], default=0.0) < 1e-5 * layer.singular_values[0]
        module = spec.modules[layer.name]
        assert (layer.d_in, layer.d_out) == (module.in_features, module.out_features)
        assert layer.lora_params == RANK * (module.in_features + module.out_features)
        assert layer.full_params == module.in_features * module.out_features
    assert report.needed_rank == 3
    assert 3 <= report.suggested_rank <= RANK
    assert report.lora_params == sum(layer.lora_params for layer in report.layers)
    # Without a model, the adapter's own shapes give the same answer.
    standalone = inspect_adapter(adapter_dir)
    assert sorted(standalone.layers, key=lambda x: x.name) == sorted(
        report.layers, key=lambda x: x.name
    )
    assert standalone.suggested_rank == report.suggested_rank


def test_inspect_random_adapter_matches_dense_svd(model_dir: Path, tmp_path: Path) -> None:
    adapter_dir = make_peft_adapter(
        model_dir, tmp_path / "a", AdapterShape(rank=4, alpha=8, targets=["o_proj"])
    )
    spec = model_spec(model_dir)
    dense = _dense_updates(adapter_dir, spec)
    report = inspect_adapter(adapter_dir, spec)
    for layer in report.layers:
        expected = torch.linalg.svdvals(dense[layer.name])[:4]
        assert layer.singular_values == pytest.approx(expected.tolist(), rel=1e-5)
        assert layer.rank_99 <= 4


def test_truncate_to_true_rank_preserves_outputs(
    model_dir: Path, known_rank_adapter, tmp_path: Path
) -> None:
    adapter_dir, deltas = known_rank_adapter
    spec = model_spec(model_dir)
    exact = truncate_adapter(adapter_dir, tmp_path / "r3", 3)
    config = json.loads((exact / "adapter_config.json").read_text())
    assert config["r"] == 3
    parsed = parse_adapter_config((exact / "adapter_config.json").read_bytes(), max_rank=64)
    assert math.isclose(parsed.scale, ALPHA / RANK)
    # Passes the server's validator against the real base model, with the same updates.
    truncated = _dense_updates(exact, spec)
    for name, delta in deltas.items():
        # Relative to the update's size: the factors are stored in float32 (relative rounding
        # ~6e-8), so any CPU reproduces the update to far better than 1e-5 of its norm.
        error = torch.linalg.matrix_norm(truncated[name] - delta)
        assert error <= 1e-5 * torch.linalg.matrix_norm(delta), (name, float(error))
    assert inspect_adapter(exact, spec).needed_rank == 3

    drift = output_drift(model_dir, adapter_dir, exact, PROMPTS)
    assert isinstance(drift, DriftReport)
    assert drift.tokens > 0
    assert drift.adapter_max_abs_diff > 0.1  # the adapter itself matters
    # The forward runs in float32 on whatever CPU this is (kernel choice and summation order
    # vary): the drift is bounded relative to how far the adapter itself moves the logits, not
    # by an absolute number. Exact truncation leaves float32 noise (~5e-6 of the adapter's
    # effect); dropping a real singular value moves the logits by a sizeable share of it.
    assert drift.max_abs_diff <= 1e-3 * drift.adapter_max_abs_diff, drift
    assert drift.top1_agreement == 1.0
    assert drift.mean_kl < 1e-8

    lossy = truncate_adapter(adapter_dir, tmp_path / "r2", 2)
    lossy_drift = output_drift(model_dir, adapter_dir, lossy, PROMPTS)
    assert lossy_drift.max_abs_diff > 0.05 * lossy_drift.adapter_max_abs_diff, lossy_drift
    assert lossy_drift.max_abs_diff > 100 * drift.max_abs_diff
    assert lossy_drift.mean_kl > drift.mean_kl


def test_truncated_adapter_loads_in_peft(
    model_dir: Path, known_rank_adapter, tmp_path: Path
) -> None:
    adapter_dir, _ = known_rank_adapter
    exact = truncate_adapter(adapter_dir, tmp_path / "r3", 3)
    ids = torch.tensor([[1, 5, 9, 17, 33, 2]])
    outputs = []
    for directory in (adapter_dir, exact):
        base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
        peft_model = PeftModel.from_pretrained(base, str(directory)).eval()
        with torch.no_grad():
            outputs.append(peft_model(input_ids=ids).logits)
    # Relative to the logits' scale: the float32 forward rounds differently on other CPUs.
    scale = float(outputs[0].abs().max())
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-5 * scale)


def test_truncate_preserves_rslora_scale(model_dir: Path, tmp_path: Path) -> None:
    src = make_peft_adapter(
        model_dir,
        tmp_path / "rs",
        AdapterShape(rank=8, alpha=4, targets=["k_proj"], use_rslora=True),
    )
    spec = model_spec(model_dir)
    dst = truncate_adapter(src, tmp_path / "rs4", 4)
    parsed = parse_adapter_config((dst / "adapter_config.json").read_bytes(), max_rank=64)
    assert parsed.use_rslora and parsed.rank == 4
    assert math.isclose(parsed.scale, 4 / math.sqrt(8))
    original, truncated = _dense_updates(src, spec), _dense_updates(dst, spec)
    for name, delta in original.items():
        u, s, vh = torch.linalg.svd(delta)
        best = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
        error = torch.linalg.matrix_norm(truncated[name] - best)
        assert error <= 1e-5 * torch.linalg.matrix_norm(best), (name, float(error))


def test_truncate_rejects_bad_rank(known_rank_adapter, tmp_path: Path) -> None:
    adapter_dir, _ = known_rank_adapter
    for rank in (0, RANK + 1):
        with pytest.raises(ValueError, match="truncate-rank"):
            truncate_adapter(adapter_dir, tmp_path / "bad", rank)


def test_cli_json_and_table(
    model_dir: Path, known_rank_adapter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter_dir, _ = known_rank_adapter
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(
        json.dumps({"prompt": "Q: who? A:", "completion": " me"})
        + "\n\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi there"}]})
        + "\n"
    )
    out = tmp_path / "cli-r3"
    argv = [str(adapter_dir), "--model", str(model_dir), "--truncate-rank", "3", "--out", str(out)]
    assert main([*argv, "--eval", str(eval_file), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["inspect"]["needed_rank"] == 3
    assert result["drift"]["prompts"] == 2
    drift = result["drift"]
    assert drift["max_abs_diff"] <= 1e-3 * drift["adapter_max_abs_diff"], drift
    assert (out / "adapter_model.safetensors").is_file()

    assert main([str(adapter_dir)]) == 0
    table = capsys.readouterr().out
    assert "rank@99" in table and "suggested rank: 4" in table

    assert main([str(tmp_path / "missing")]) == 2
    assert "error" in capsys.readouterr().err
    bad_eval = tmp_path / "bad.jsonl"
    bad_eval.write_text("{not json}\n")
    assert main([*argv, "--eval", str(bad_eval)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(adapter_dir), "--truncate-rank", "3"])
