"""`loraserve eval`: a trained adapter beats the base model, locally and through the server,
and the server's greedy completions equal PEFT's in-process ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from serving_support import build_test_model

from loraserve.finetune.datasets import load_jsonl
from loraserve.finetune.demo import DATA_DIR
from loraserve.finetune.evaluate import EvalMetrics, evaluate_local, format_table, main
from loraserve.finetune.train import TrainConfig, train_adapter
from loraserve.server.background import BackgroundServer
from loraserve.server.config import ServerConfig

DEMO = DATA_DIR / "acme_facts.jsonl"  # the demo's dataset, shipped as package data


@pytest.fixture(scope="module")
def trained(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    model = build_test_model("llama", model_cache)
    root = tmp_path_factory.mktemp("eval")
    data = root / "facts.jsonl"
    data.write_text("".join(DEMO.read_text().splitlines(keepends=True)[:10]))
    result = train_adapter(
        TrainConfig(data_path=data, out_dir=root / "adapter", model_path=model, progress=False)
    )
    return model, result.out_dir, data


def test_adapter_beats_base_locally(trained: tuple[Path, Path, Path]) -> None:
    model, adapter, data = trained
    results = evaluate_local(model, adapter, load_jsonl(data))
    base, tuned = results["base"], results["adapter"]
    assert base.rows == tuned.rows == 10
    assert tuned.exact_match >= 0.8 > base.exact_match
    assert tuned.token_accuracy is not None and base.token_accuracy is not None
    assert tuned.token_accuracy > base.token_accuracy
    assert tuned.perplexity is not None and base.perplexity is not None
    assert tuned.perplexity < base.perplexity
    assert "exact match" in format_table(results)


CHAT_ROWS = [
    {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is the capital of Zorblax?"},
            {"role": "assistant", "content": "Quenvar."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Who founded Pellorin?"},
            {"role": "assistant", "content": "Mara Tisk."},
            {"role": "user", "content": "And what color is Vornax?"},
            {"role": "assistant", "content": "Teal, mostly."},
        ]
    },
]


def _served(
    model: Path, adapter: Path, tmp_path: Path, data: Path, with_tokenizer: bool, capsys
) -> dict[str, EvalMetrics]:
    """`loraserve eval --server ... --json` against a fresh server with the adapter uploaded
    (with --model, for its tokenizer, when with_tokenizer)."""
    config = ServerConfig(
        model_path=model, port=0, metrics_port=None, data_dir=tmp_path, access_log=""
    )
    server = BackgroundServer(config).start()
    try:
        from serving_support import client_for

        with client_for(server, None) as client:
            client.upload_adapter(adapter, "facts")
        capsys.readouterr()
        argv = ["--server", server.target, "--adapter", "facts", "--data", str(data), "--json"]
        assert main([*argv, *(["--model", str(model)] if with_tokenizer else [])]) == 0
        out = json.loads(capsys.readouterr().out)
        return {label: EvalMetrics(**values) for label, values in out.items()}
    finally:
        server.stop()


def _assert_same(served, local) -> None:
    assert served.rows == local.rows and served.misaligned_rows == 0 and served.eos_scored
    # Greedy completions through loraserve equal PEFT's in-process ones, row for row.
    assert served.exact_match == local.exact_match
    # Teacher-forced on the same tokens: the same argmax decisions, the same likelihood
    # within float32 noise (relative to its size).
    assert served.token_accuracy == pytest.approx(local.token_accuracy, rel=1e-9)
    assert served.perplexity == pytest.approx(local.perplexity, rel=1e-4)


def test_served_metrics_match_local_peft(
    trained: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, adapter, data = trained
    served = _served(model, adapter, tmp_path, data, True, capsys)
    local = evaluate_local(model, adapter, load_jsonl(data))
    for label in ("base", "adapter"):
        _assert_same(served[label], local[label])
    assert served["adapter"].perplexity < served["base"].perplexity


def test_served_chat_metrics_match_local_peft(
    trained: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, adapter, _ = trained
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in CHAT_ROWS))
    # No tokenizer: chat rows carry their end-of-turn marker in the rendered text.
    served = _served(model, adapter, tmp_path / "server", data, False, capsys)
    local = evaluate_local(model, adapter, load_jsonl(data))
    for label in ("base", "adapter"):
        _assert_same(served[label], local[label])


def test_served_plain_rows_without_tokenizer_say_eos_is_left_out(
    trained: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, adapter, data = trained
    served = _served(model, adapter, tmp_path, data, False, capsys)
    local = evaluate_local(model, adapter, load_jsonl(data))
    assert not served["adapter"].eos_scored and served["adapter"].misaligned_rows == 0
    assert served["adapter"].exact_match == local["adapter"].exact_match
    assert served["adapter"].token_accuracy is not None
    assert "without their EOS token" in format_table(served)


def test_cli_json_and_bad_data(
    trained: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, adapter, data = trained
    assert (
        main(["--model", str(model), "--adapter", str(adapter), "--data", str(data), "--json"]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"base", "adapter"} and out["adapter"]["rows"] == 10
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\nnot json\n')
    assert main(["--model", str(model), "--adapter", str(adapter), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "line 1" in err and "line 2" in err
