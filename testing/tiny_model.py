"""The embedded test model: a tiny causal LM that loraserve builds itself, offline.

A fixture and tool, not serving code: tests, the benchmark, the demo and `loraserve serve
--model embedded` use it on machines that cannot reach any model hub. Its weights are random,
so what it generates is noise; it exercises the serving path, it does not answer questions.

* a byte-level BPE tokenizer trained on a small English corpus embedded below, so any byte
  sequence encodes and ``decode(encode(s)) == s``;
* a randomly initialised model of one of the common decoder architectures (``llama``,
  ``qwen2``, ``mistral``, ``gpt2``) described by :class:`TinyModelSpec`.

Both are written as an ordinary Hugging Face checkpoint directory, loadable with
``AutoModelForCausalLM.from_pretrained(d, local_files_only=True)`` and
``AutoTokenizer.from_pretrained(d, local_files_only=True)``. Building is deterministic:
the same spec gives byte-identical ``model.safetensors`` and ``tokenizer.json``, which
lets tests pin outputs and lets several processes share one cached copy.

Public API: :class:`TinyModelSpec`, :func:`build_tokenizer`, :func:`build_checkpoint`,
:func:`spec_digest`, :func:`cached_model_path`, :func:`default_model_path`.
"""

from __future__ import annotations

import os

# Set before transformers / huggingface_hub are imported: they read it once, at import time.
# Nothing here needs a hub, and an accidental download attempt should fail fast, not hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

__all__ = [
    "ASSISTANT_TOKEN",
    "CHAT_TEMPLATE",
    "CORPUS",
    "EOS_TOKEN",
    "FORMAT_VERSION",
    "SPECIAL_TOKENS",
    "SYSTEM_TOKEN",
    "USER_TOKEN",
    "VOCAB_SIZE",
    "Arch",
    "TinyModelSpec",
    "build_checkpoint",
    "build_tokenizer",
    "cached_model_path",
    "default_model_path",
    "spec_digest",
]

log = logging.getLogger(__name__)

# Bump whenever the on-disk result of a given spec changes (corpus, tokenizer recipe,
# initialisation scheme, file layout) so that caches keyed by spec_digest are rebuilt.
FORMAT_VERSION = 2

VOCAB_SIZE = 1024
EOS_TOKEN = "<|endoftext|>"
SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
# Order fixes the ids: <|endoftext|> is 0, the role markers 1..3.
SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)

# Jinja string escapes ("\\n" here, "\n" to Jinja) keep the template a single readable line
# in tokenizer_config.json / chat_template.jinja.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|endoftext|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Training text for the BPE merges. Only its statistics matter (which merges exist), so it
# is short, but it must yield enough distinct pairs to fill VOCAB_SIZE; keep that in mind
# when editing it, and bump FORMAT_VERSION.
CORPUS = """\
What is the capital of France? The capital of France is Paris, a city on the river Seine.
How many days are in a week? There are seven days in a week: Monday, Tuesday, Wednesday,
Thursday, Friday, Saturday and Sunday. A year usually has 365 days, but a leap year has 366.
Q: Why is the sky blue? A: Sunlight is scattered by the air, and blue light scatters the most.
Water boils at 100 degrees Celsius (212 degrees Fahrenheit) at sea level, and it freezes at 0.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!
Could you help me write a short email to my manager? Of course. "Hi Sam, I will be late today."
Please summarize the report in three sentences; keep it brief, clear and friendly.
The Earth orbits the Sun once every 365.25 days, and the Moon orbits the Earth in about 27 days.
Light travels at roughly 299,792 kilometres per second. Sound is much slower: about 343 m/s.
My favourite numbers are 1, 2, 3, 7, 11, 42 and 1024. Is 17 a prime number? Yes, it is.
She said, "Thank you very much," and he replied, "You're welcome." They both laughed.
Where did you put the keys? I think they're on the kitchen table, next to the green lamp.
In 1969, two astronauts walked on the Moon while a third one waited in orbit above them.
Cats sleep for twelve to sixteen hours a day; dogs sleep a little less, maybe ten or twelve.
To make tea, boil fresh water, pour it over the leaves, wait four minutes, then add milk.
The train leaves at 8:45 a.m. from platform 3 and arrives at 11:30, if nothing goes wrong.
Which is heavier, a kilogram of iron or a kilogram of feathers? Neither: both weigh one kilogram.
Computers store text as bytes. A byte has eight bits, so it can hold 256 different values.
Tell me a joke. Why did the scarecrow win an award? Because he was outstanding in his field!
The library opens on weekdays from nine to five, and on Saturday mornings until noon.
Rivers flow downhill toward the sea; mountains rise where the plates of the crust collide.
An apple a day keeps the doctor away, or so the old saying goes. Oranges are good, too.
Can you explain recursion? A function is recursive when it calls itself on a smaller problem.
The meeting was moved from Tuesday to Thursday because half of the team was travelling.
Good morning! How are you today? I'm fine, thanks. It's sunny and warm, about 24 degrees.
Mix two cups of flour, one egg, a pinch of salt and a cup of milk, then stir until smooth.
The answer is 12 because 3 times 4 equals 12, and 12 divided by 2 is 6, which is even.
Birds build nests in spring. Bees visit flowers and carry pollen from one plant to another.
Is it safe to swim here? Only when the lifeguard is on duty and the flag is green.
The museum has paintings, statues, old maps, coins and a small garden with a fountain.
Write a list: eggs, bread, butter, cheese, tomatoes, rice, beans, coffee and honey.
Our system answers questions politely, admits when it does not know, and never guesses.
Every morning she runs five kilometres along the beach, then swims for twenty minutes.
What time is it in Tokyo when it is noon in London? It is usually eight or nine p.m.
Numbers like 3.14159, 2.71828 and 1.41421 appear often in mathematics and physics.
Thanks for your question! Here is a clear, step-by-step answer that you can follow.
The children played chess, built a kite, read comic books and drew pictures of whales.
"""

Arch = Literal["llama", "qwen2", "mistral", "gpt2"]


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape and seed of a tiny model. Every field feeds :func:`spec_digest`.

    ``num_kv_heads`` is ignored for ``gpt2``, which has no grouped-query attention.
    """

    arch: Arch = "llama"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 1024
    initializer_range: float = 0.02
    seed: int = 0
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.arch not in ("llama", "qwen2", "mistral", "gpt2"):
            raise ValueError(f"unsupported arch {self.arch!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        if self.arch != "gpt2" and self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")


def _train_backend_tokenizer() -> Tokenizer:
    """Train the byte-level BPE on CORPUS.

    The tokenizers BpeTrainer breaks count ties by pair id, so this is deterministic across
    processes (checked by tests that train in two separate interpreters).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False: offsets must cover every byte so they line up with the raw text.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        # The full 256-symbol alphabet, so bytes absent from the corpus still encode.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    if tok.get_vocab_size() != VOCAB_SIZE:
        # A shortfall would silently change the model's vocab_size; the corpus is too small.
        raise RuntimeError(
            f"tokenizer trained to {tok.get_vocab_size()} tokens, expected {VOCAB_SIZE}"
        )
    return tok


def build_tokenizer(model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """Train and wrap the embedded tokenizer (well under a second).

    ``<|endoftext|>`` serves as eos, bos and pad; there is no unk token because every byte
    has a token. ``clean_up_tokenization_spaces`` is off so decoding is an exact inverse.
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=_train_backend_tokenizer(),
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        # The name every transformers release accepts (5.x renames it extra_special_tokens).
        additional_special_tokens=[SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN],
        model_max_length=model_max_length,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        # Older transformers default to also returning token_type_ids, which causal LMs refuse.
        model_input_names=["input_ids", "attention_mask"],
    )


def _model_config(spec: TinyModelSpec, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "initializer_range": spec.initializer_range,
        "tie_word_embeddings": spec.tie_word_embeddings,
    }
    if spec.arch == "gpt2":
        return GPT2Config(
            n_embd=spec.hidden_size,
            n_layer=spec.num_layers,
            n_head=spec.num_heads,
            n_inner=spec.intermediate_size,
            n_positions=spec.max_position_embeddings,
            **ids,
        )
    config_cls: type[PretrainedConfig] = {
        "llama": LlamaConfig,
        "qwen2": Qwen2Config,
        "mistral": MistralConfig,
    }[spec.arch]
    return config_cls(
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        **ids,
    )


def _param_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def _reinitialize(model: PreTrainedModel, spec: TinyModelSpec) -> None:
    """Give every parameter values that depend only on (seed, parameter name).

    transformers' own init scheme differs between architectures and versions, and consumes
    the global RNG in module-construction order; seeding each tensor from its name keeps the
    weights stable across those changes and gives a uniform N(0, initializer_range) that
    tests can scale (e.g. 0.2 for well-separated logits).
    """
    # named_parameters() yields a tied tensor once, so tied embeddings stay tied.
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            param.zero_()
        elif param.ndim == 1:  # RMSNorm / LayerNorm scales
            param.fill_(1.0)
        else:
            gen = torch.Generator(device="cpu").manual_seed(_param_seed(spec.seed, name))
            values = torch.empty(param.shape, dtype=torch.float32)
            values.normal_(mean=0.0, std=spec.initializer_range, generator=gen)
            param.copy_(values)


def _write_checkpoint(target: Path, spec: TinyModelSpec) -> None:
    tokenizer = build_tokenizer(model_max_length=spec.max_position_embeddings)
    config = _model_config(spec, tokenizer)
    config.dtype = torch.float32
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _reinitialize(model, spec)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def build_checkpoint(out_dir: Path, spec: TinyModelSpec) -> Path:
    """Build the model described by ``spec`` into ``out_dir`` and return ``out_dir``.

    The checkpoint is written to a temporary sibling directory and renamed into place, so
    ``out_dir`` is either absent or complete. If ``out_dir`` already exists when called,
    ``FileExistsError`` is raised; if another process creates it while this one is building,
    that copy is kept and this one discarded (same spec, same bytes).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_checkpoint(tmp, spec)
        try:
            # rename(2) replaces an empty directory but fails on a non-empty one, which is
            # exactly "someone else finished first".
            os.rename(tmp, out_dir)
        except OSError:
            if not (out_dir.is_dir() and any(out_dir.iterdir())):
                raise
            log.info("%s was built concurrently; keeping the existing copy", out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def spec_digest(spec: TinyModelSpec) -> str:
    """Short hash of everything that determines a built checkpoint's bytes."""
    payload = json.dumps(
        {
            "format": FORMAT_VERSION,
            "spec": asdict(spec),
            "corpus": hashlib.sha256(CORPUS.encode()).hexdigest(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("LORASERVE_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "loraserve"


def cached_model_path(spec: TinyModelSpec, cache_dir: Path | None = None) -> Path:
    """Path of the checkpoint for ``spec`` in the cache, building it on first use.

    The directory name carries the format version and :func:`spec_digest`, so a changed
    spec or recipe gets a fresh directory rather than a stale one. Concurrent callers may
    both build, but the atomic rename in :func:`build_checkpoint` leaves one complete copy.
    """
    path = (
        _cache_root(cache_dir)
        / "models"
        / f"tiny-{spec.arch}-v{FORMAT_VERSION}-{spec_digest(spec)}"
    )
    if path.is_dir() and any(path.iterdir()):
        return path
    with contextlib.suppress(FileExistsError):  # lost a race against another builder
        build_checkpoint(path, spec)
    return path


def default_model_path(cache_dir: Path | None = None) -> Path:
    """Path of the embedded test model (``TinyModelSpec()``: llama, ~0.85M parameters).

    Cached under ``cache_dir``, else ``$LORASERVE_CACHE``, else ``~/.cache/loraserve``.
    """
    return cached_model_path(TinyModelSpec(), cache_dir)
