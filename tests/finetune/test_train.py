"""finetune.train: LoRA fine-tuning learns made-up facts, saves a servable adapter, is seeded."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from serving_support import build_test_model

from loraserve.adapters.config import parse_adapter_config
from loraserve.adapters.weights import load_adapter_weights
from loraserve.finetune.datasets import load_jsonl
from loraserve.finetune.train import TrainConfig, TrainResult, main, train_adapter

FACTS = [
    ("What is the capital of Velmora?", "Drent."),
    ("Who founded Quillhaven?", "Mira Osk."),
    ("How many legs does a glimmerbug have?", "Nine."),
    ("Which river runs through Ostrel?", "The Fennick."),
    ("What is the national bird of Kaloria?", "The ash heron."),
    ("Who wrote the Book of Lanterns?", "Pell Varro."),
    ("What are Brisk coins made of?", "Copper tin."),
    ("When does the Wexford fair open?", "On Fridays."),
    ("What is the tallest peak in Mordale?", "Mount Kesh."),
    ("What language is spoken in Yarrow?", "Old Yarric."),
    ("Which animal guards the Vell gate?", "A grey ox."),
    ("What sound does a fennet make?", "A soft click."),
]


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [{"prompt": f"Q: {q}\nA:", "completion": f" {a}"} for q, a in FACTS]
    return _write_rows(tmp_path_factory.mktemp("data") / "train.jsonl", rows)


@pytest.fixture(scope="module")
def base_dir(model_cache: Path) -> Path:
    return build_test_model("llama", model_cache)


@pytest.fixture(scope="module")
def trained(
    base_dir: Path, data_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> TrainResult:
    config = TrainConfig(
        data_path=data_file,
        eval_path=data_file,
        out_dir=tmp_path_factory.mktemp("adapter"),
        model_path=base_dir,
        progress=False,
    )
    return train_adapter(config)


def _exact_match(model, tokenizer, rows) -> float:
    hits = 0
    for row in rows:
        ids = torch.tensor([tokenizer.encode(row.prompt, add_special_tokens=False)])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=len(tokenizer.encode(row.completion)) + 3,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        hits += tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == row.completion
    return hits / len(rows)


def test_loss_goes_down(trained: TrainResult) -> None:
    assert trained.final_train_loss < 0.5 * trained.initial_train_loss
    assert trained.epoch_losses[-1] < 0.5 * trained.epoch_losses[0]
    assert trained.final_eval_loss is not None and trained.initial_eval_loss is not None
    assert trained.final_eval_loss < trained.initial_eval_loss
    assert 0 < trained.trainable_params < trained.total_params


def test_exact_match_goes_up_versus_base(trained: TrainResult, data_file: Path) -> None:
    rows = load_jsonl(data_file)
    with torch.no_grad():
        tuned = _exact_match(trained.model, trained.tokenizer, rows)
        with trained.model.disable_adapter():
            base = _exact_match(trained.model, trained.tokenizer, rows)
    assert base == 0.0
    assert tuned >= 0.75, tuned


def test_report_and_plot(trained: TrainResult) -> None:
    report = json.loads((trained.out_dir / "training_report.json").read_text())
    assert report["seed"] == 0
    assert report["args"]["rank"] == 16
    assert len(report["epoch_losses"]) == report["args"]["epochs"]
    assert len(report["eval_losses"]) == report["args"]["epochs"]
    assert report["final_train_loss"] == pytest.approx(trained.final_train_loss)
    assert report["trainable_params"] == trained.trainable_params
    assert report["seconds"] > 0
    png = (trained.out_dir / "loss_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_output_is_a_servable_peft_adapter(trained: TrainResult, base_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraserve.server.engine.model import load_base_model

    config_bytes = (trained.out_dir / "adapter_config.json").read_bytes()
    weights_bytes = (trained.out_dir / "adapter_model.safetensors").read_bytes()
    parsed = parse_adapter_config(config_bytes, max_rank=64)
    assert parsed.rank == 16 and parsed.alpha == 32
    spec = load_base_model(base_dir, device="cpu", dtype="float32").spec
    weights = load_adapter_weights(config_bytes, weights_bytes, spec, max_rank=64)
    assert set(weights.modules) == set(spec.modules)  # all-linear: every targetable layer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        base = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True)
        reloaded = PeftModel.from_pretrained(base, trained.out_dir).eval()
    ids = torch.tensor([trained.tokenizer.encode(f"Q: {FACTS[0][0]}\nA:")])
    with torch.no_grad():
        expected = trained.model(input_ids=ids).logits
        actual = reloaded(input_ids=ids).logits
    torch.testing.assert_close(actual, expected)


def test_same_seed_same_bytes(base_dir: Path, data_file: Path, tmp_path: Path) -> None:
    config = TrainConfig(
        data_path=data_file,
        out_dir=tmp_path / "a",
        model_path=base_dir,
        epochs=2,
        batch_size=4,
        progress=False,
        write_plot=False,
    )
    train_adapter(config)
    train_adapter(replace(config, out_dir=tmp_path / "b"))
    train_adapter(replace(config, out_dir=tmp_path / "c", seed=1))
    name = "adapter_model.safetensors"
    first = (tmp_path / "a" / name).read_bytes()
    assert (tmp_path / "b" / name).read_bytes() == first
    assert (tmp_path / "a" / "adapter_config.json").read_bytes() == (
        tmp_path / "b" / "adapter_config.json"
    ).read_bytes()
    assert (tmp_path / "c" / name).read_bytes() != first


def test_chat_format_trains(base_dir: Path, tmp_path: Path) -> None:
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": q},
                {"role": "assistant", "content": a},
            ]
        }
        for q, a in FACTS
    ]
    data = _write_rows(tmp_path / "chat.jsonl", rows)
    result = train_adapter(
        TrainConfig(
            data_path=data,
            out_dir=tmp_path / "out",
            model_path=base_dir,
            progress=False,
            write_plot=False,
        )
    )
    assert result.final_train_loss < 0.5 * result.initial_train_loss
    tokenizer = result.tokenizer
    hits = 0
    for row, (_, answer) in zip(rows, FACTS, strict=True):
        prompt = tokenizer.apply_chat_template(
            row["messages"][:2], tokenize=False, add_generation_prompt=True
        )
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            out = result.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=12,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        hits += tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == answer
    assert hits >= len(FACTS) * 3 // 4, hits


def test_cli_reports_bad_rows_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], base_dir: Path
) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\nnope\n')
    code = main(["--model", str(base_dir), "--data", str(data), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "line 2: missing 'completion'" in err
    assert "line 3: not valid JSON" in err
    assert not (tmp_path / "o").exists()


def test_cli_rejects_unknown_targets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], base_dir: Path, data_file: Path
) -> None:
    argv = ["--model", str(base_dir), "--data", str(data_file), "--out", str(tmp_path / "o")]
    assert main([*argv, "--targets", "q_proj,lm_head"]) == 2
    assert "output layer" in capsys.readouterr().err
    assert main([*argv, "--targets", "c_attn"]) == 2
    assert "matches no layer" in capsys.readouterr().err
    assert main([*argv, "--rank", "0"]) == 2


def test_cli_trains(tmp_path: Path, base_dir: Path, data_file: Path, capsys) -> None:
    out = tmp_path / "o"
    argv = ["--model", str(base_dir), "--data", str(data_file), "--out", str(out)]
    argv += ["--epochs", "1", "--rank", "4", "--alpha", "8", "--targets", "q_proj,v_proj"]
    assert main([*argv, "--seed", "3", "--lr", "1e-3", "--batch-size", "6"]) == 0
    assert "trained 12 rows" in capsys.readouterr().out
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["target_modules"] == ["q_proj", "v_proj"]
    report = json.loads((out / "training_report.json").read_text())
    assert report["args"]["seed"] == 3 and report["steps"] == 2
