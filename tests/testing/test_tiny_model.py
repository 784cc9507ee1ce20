"""Tests for loraserve.testing.tiny_model: the self-built tokenizer and tiny checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from loraserve.testing import tiny_model
from loraserve.testing.tiny_model import (
    ASSISTANT_TOKEN,
    EOS_TOKEN,
    FORMAT_VERSION,
    SYSTEM_TOKEN,
    USER_TOKEN,
    VOCAB_SIZE,
    TinyModelSpec,
    build_checkpoint,
    build_tokenizer,
    cached_model_path,
    default_model_path,
    spec_digest,
)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load(path: Path) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return build_tokenizer()


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return default_model_path(cache_dir=tmp_path_factory.mktemp("cache"))


def test_importing_the_builder_forces_offline_mode(tmp_path: Path) -> None:
    """A fresh interpreter without HF_HUB_OFFLINE gets it from the import (never the hub)."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    code = "import os, loraserve.testing.tiny_model; print(os.environ.get('HF_HUB_OFFLINE'))"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"


def test_tokenizer_vocab_and_special_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == EOS_TOKEN
    assert tokenizer.unk_token is None
    ids = tokenizer.convert_tokens_to_ids([EOS_TOKEN, SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN])
    assert ids == [0, 1, 2, 3]
    # Role markers must be single tokens even inside running text.
    assert tokenizer.encode(f"x{USER_TOKEN}y", add_special_tokens=False)[1] == 2


FIXED_TEXTS = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\r\nlines\n\n",
    "naïve café, Straße, Ελληνικά, русский, עברית, العربية",
    "日本語のテキストと中文文本 한국어",
    "emoji 👩‍💻🚀🏳️‍🌈 and combining e\u0301 a\u0308",
    "\x00\x01\x7f control \u200b zero-width \ufeff bom",
    "numbers 3.14159 -42 1e10 0xFF 1,024",
    f"literal specials {EOS_TOKEN}{USER_TOKEN} survive",
]


@pytest.mark.parametrize("text", FIXED_TEXTS)
def test_tokenizer_round_trips_unicode(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def _random_texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts: list[str] = []
    for i in range(count):
        n = rng.randint(1, 40)
        if i % 2:
            # Every byte value as a code point: exercises the whole ByteLevel alphabet.
            texts.append(bytes(rng.randrange(256) for _ in range(n)).decode("latin-1"))
        else:
            # Arbitrary scalar values across all planes, skipping surrogates (not encodable).
            cps = (rng.choice([rng.randrange(0x80), rng.randrange(0x110000)]) for _ in range(n))
            texts.append("".join(chr(c) for c in cps if not 0xD800 <= c <= 0xDFFF))
    return texts


def test_tokenizer_round_trips_random_strings(tokenizer: PreTrainedTokenizerBase) -> None:
    for text in _random_texts(300):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text, repr(text)


def test_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|system|>\nBe brief.<|endoftext|>\n"
        "<|user|>\nWhat is 2+2?<|endoftext|>\n"
        "<|assistant|>\n4<|endoftext|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|system|>\nBe brief.<|endoftext|>\n<|user|>\nWhat is 2+2?<|endoftext|>\n<|assistant|>\n"
    )
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert ids[0] == 1 and ids.count(0) == 2 and ids.count(3) == 1


def test_build_is_deterministic_across_processes(tmp_path: Path) -> None:
    # A second interpreter also catches per-process randomness (hash seeds, Rust HashMaps).
    spec = TinyModelSpec(arch="qwen2", num_layers=2, seed=7)
    here = build_checkpoint(tmp_path / "a", spec)
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from loraserve.testing.tiny_model import TinyModelSpec, build_checkpoint\n"
        "build_checkpoint(Path(sys.argv[1]), "
        "TinyModelSpec(arch='qwen2', num_layers=2, seed=7))\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "b")], check=True, timeout=120)
    there = tmp_path / "b"
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert _sha256(here / name) == _sha256(there / name), name
    # And a different seed really changes the weights.
    other = build_checkpoint(tmp_path / "c", TinyModelSpec(arch="qwen2", num_layers=2, seed=8))
    assert _sha256(other / "model.safetensors") != _sha256(here / "model.safetensors")
    assert _sha256(other / "tokenizer.json") == _sha256(here / "tokenizer.json")


@pytest.mark.parametrize(
    ("arch", "tie"),
    [("llama", False), ("qwen2", False), ("mistral", False), ("gpt2", False), ("llama", True)],
)
def test_each_arch_builds_loads_and_runs(tmp_path: Path, arch: str, tie: bool) -> None:
    spec = TinyModelSpec(arch=arch, num_layers=2, tie_word_embeddings=tie)  # type: ignore[arg-type]
    path = build_checkpoint(tmp_path / arch, spec)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp dir cleaned up
    model, tokenizer = _load(path)

    assert model.config.model_type == arch
    assert model.config.vocab_size == len(tokenizer) == VOCAB_SIZE
    assert model.dtype == torch.float32
    assert model.config.eos_token_id == tokenizer.eos_token_id == 0
    assert model.generation_config.eos_token_id == 0
    assert model.generation_config.pad_token_id == 0
    assert tokenizer.model_max_length == spec.max_position_embeddings
    shared = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert shared == tie

    text = "The capital of France is Paris. Ünïcödé ✓"
    batch = tokenizer(text, return_tensors="pt")
    assert tokenizer.decode(batch["input_ids"][0]) == text
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], VOCAB_SIZE)
    assert torch.isfinite(logits).all()


def test_build_checkpoint_refuses_existing_dir(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("mine")
    with pytest.raises(FileExistsError):
        build_checkpoint(tmp_path / "taken", TinyModelSpec(num_layers=1))


def test_build_checkpoint_keeps_concurrent_winner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "model"
    real_write = tiny_model._write_checkpoint

    def write_while_racing(target: Path, spec: TinyModelSpec) -> None:
        real_write(target, spec)
        out.mkdir()  # another process finishes first
        (out / "winner").write_text("first")

    monkeypatch.setattr(tiny_model, "_write_checkpoint", write_while_racing)
    assert build_checkpoint(out, TinyModelSpec(num_layers=1)) == out
    assert sorted(p.name for p in out.iterdir()) == ["winner"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_default_model_path_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = default_model_path(cache_dir=tmp_path)
    assert first.is_relative_to(tmp_path)
    assert spec_digest(TinyModelSpec()) in first.name and f"v{FORMAT_VERSION}" in first.name
    weights = first / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def no_rebuild(*_: object) -> Path:
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(tiny_model, "build_checkpoint", no_rebuild)
    assert default_model_path(cache_dir=tmp_path) == first
    assert weights.stat().st_mtime_ns == mtime


def test_cache_location_env_and_spec_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORASERVE_CACHE", str(tmp_path / "env"))
    spec = TinyModelSpec(num_layers=1)
    from_env = cached_model_path(spec)
    assert from_env.is_relative_to(tmp_path / "env") and (from_env / "config.json").is_file()
    # An explicit cache_dir wins over the environment.
    explicit = cached_model_path(spec, cache_dir=tmp_path / "arg")
    assert explicit.is_relative_to(tmp_path / "arg")
    # A changed spec gets its own directory instead of reusing a stale one.
    changed = cached_model_path(TinyModelSpec(num_layers=1, seed=1), cache_dir=tmp_path / "arg")
    assert changed != explicit and changed.parent == explicit.parent
    assert json.loads((changed / "config.json").read_text())["num_hidden_layers"] == 1


def test_spec_validation() -> None:
    with pytest.raises(ValueError):
        TinyModelSpec(arch="bert")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TinyModelSpec(num_heads=3)
    with pytest.raises(ValueError):
        TinyModelSpec(num_heads=4, num_kv_heads=3)


def test_default_model_generates_greedily(default_dir: Path) -> None:
    model, tokenizer = _load(default_dir)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello!"}], tokenize=False, add_generation_prompt=True
    )
    batch = tokenizer(prompt, return_tensors="pt")
    runs = [
        model.generate(**batch, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    assert runs[0].shape == (1, batch["input_ids"].shape[1] + 8)
    # Greedy is the argmax of the model's own logits, step by step (not a cached answer).
    ids = runs[0]
    with torch.no_grad():
        logits = model(input_ids=ids[:, :-1]).logits[0]  # (len - 1, vocab)
    prompt_len = batch["input_ids"].shape[1]
    assert torch.equal(logits[prompt_len - 1 :].argmax(-1), ids[0, prompt_len:])


def test_large_init_separates_logits(tmp_path: Path) -> None:
    path = build_checkpoint(tmp_path / "m", TinyModelSpec(initializer_range=0.2, num_layers=2))
    model, tokenizer = _load(path)
    batch = tokenizer("What is the capital of France?", return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits[0]
    # Random-but-confident: greedy choices are not near-ties, so tests can pin them.
    assert logits.std() > 1.0
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).mean() > 0.1
