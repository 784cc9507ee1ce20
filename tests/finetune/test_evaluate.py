"""`loraserve eval`: a trained adapter beats the base model, locally and through the server,
and the server's greedy completions equal PEFT's in-process ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from serving_support import build_test_model

from loraserve.finetune.datasets import load_jsonl
from loraserve.finetune.demo import DATA_DIR
from loraserve.finetune.evaluate import evaluate_local, evaluate_server, format_table, main
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


def test_served_adapter_matches_local_peft(
    trained: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    model, adapter, data = trained
    config = ServerConfig(
        model_path=model, port=0, metrics_port=None, data_dir=tmp_path, access_log=""
    )
    server = BackgroundServer(config).start()
    try:
        from serving_support import client_for

        with client_for(server, None) as client:
            client.upload_adapter(adapter, "facts")
        served = evaluate_server(server.target, None, "facts", load_jsonl(data))
    finally:
        server.stop()
    local = evaluate_local(model, adapter, load_jsonl(data))
    # Greedy completions through loraserve equal PEFT's in-process ones, row for row.
    assert served["adapter"].exact_match == local["adapter"].exact_match
    assert served["base"].exact_match == local["base"].exact_match


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
