"""`loraserve train`: supervised LoRA fine-tuning with PEFT on a frozen base model, on CPU or GPU.

From a JSONL dataset (see `finetune.datasets`) to a standard PEFT adapter directory that
uploads to loraserve unchanged:

    out/adapter_config.json         plain LoRA (checked with adapters.config before saving)
    out/adapter_model.safetensors
    out/training_report.json        arguments, seed, per-epoch loss, train/eval loss, timing
    out/loss_curve.png              per-epoch training loss (and eval loss when given)

The loop is plain torch: AdamW on the LoRA factors only, linear warm-up then linear decay,
gradient clipping, padded mini-batches with loss on completion tokens only. Runs are
deterministic for a given seed: the LoRA initialisation comes from ``torch.manual_seed(seed)``
and the data order from a separate generator seeded with ``seed``.

Library API: :class:`TrainConfig`, :func:`train_adapter` -> :class:`TrainResult`;
``main(argv)`` is the command-line entry point.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from loraserve.finetune.datasets import (
    IGNORE_INDEX,
    ChatLoss,
    DatasetError,
    TokenizedExample,
    load_jsonl,
    tokenize_dataset,
)

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_EPOCHS",
    "DEFAULT_LR",
    "DEFAULT_RANK",
    "DEFAULT_SEED",
    "DEFAULT_TARGETS",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "main",
    "train_adapter",
]

DEFAULT_RANK = 16
DEFAULT_ALPHA = 32.0
DEFAULT_TARGETS: tuple[str, ...] = ("all-linear",)
"""PEFT's wildcard: every linear layer of the blocks (q/k/v/o and the MLP for Llama); measured
to learn a few dozen short facts much faster than attention-only targets."""
ALL_LINEAR = "all-linear"
DEFAULT_EPOCHS = 30
DEFAULT_LR = 3e-3
"""With rank 16 / alpha 32: 1e-2 diverges on the embedded model, 2e-3 learns more slowly."""
DEFAULT_BATCH_SIZE = 8
DEFAULT_SEED = 0
DEFAULT_MAX_LENGTH = 512
MAX_SERVED_RANK = 64
"""Largest rank the server accepts by default; a higher rank trains but is warned about."""

REPORT_FILE = "training_report.json"
CURVE_FILE = "loss_curve.png"


class TrainError(RuntimeError):
    """Training cannot start: bad arguments, an unloadable model, targets that match nothing."""


@dataclass
class TrainConfig:
    """Everything that determines a training run (``model_path=None``: the embedded model)."""

    data_path: Path
    out_dir: Path
    model_path: Path | None = None
    eval_path: Path | None = None
    rank: int = DEFAULT_RANK
    alpha: float = DEFAULT_ALPHA
    targets: tuple[str, ...] = DEFAULT_TARGETS
    epochs: int = DEFAULT_EPOCHS
    lr: float = DEFAULT_LR
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = DEFAULT_SEED
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    max_length: int = DEFAULT_MAX_LENGTH
    chat_loss: ChatLoss = "all_assistant"
    progress: bool = True
    """Show a tqdm progress bar (on stderr) with the running loss."""
    write_plot: bool = True

    def validate(self) -> None:
        """Raise TrainError on values no run can use."""
        checks = [
            (self.rank >= 1, f"rank must be >= 1, got {self.rank}"),
            (math.isfinite(self.alpha) and self.alpha > 0, f"alpha must be > 0, got {self.alpha}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (math.isfinite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (bool(self.targets), "targets must name at least one layer"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.max_length >= 2, "max_length must be >= 2"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainError(message)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, Path):
                data[key] = str(value)
            elif isinstance(value, tuple):
                data[key] = list(value)
        return data


@dataclass
class TrainResult:
    """What a run produced and measured. Losses are mean cross-entropy per learned token."""

    out_dir: Path
    epoch_losses: list[float]
    """Mean training loss of each epoch, measured during the epoch (LoRA in train mode)."""
    initial_train_loss: float
    """Training-set loss of the untouched base model (before the first step)."""
    final_train_loss: float
    """Training-set loss after the last epoch (eval mode)."""
    initial_eval_loss: float | None
    final_eval_loss: float | None
    seconds: float
    trainable_params: int
    total_params: int
    train_examples: int
    eval_examples: int
    report: dict[str, Any] = field(repr=False)
    model: Any = field(default=None, repr=False, compare=False)
    """The trained PeftModel (eval mode), for in-process use; not part of the saved output."""
    tokenizer: Any = field(default=None, repr=False, compare=False)


def _batches(
    examples: Sequence[TokenizedExample], batch_size: int, pad_id: int, order: Sequence[int]
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Right-padded (input_ids, attention_mask, labels) batches in the given order."""
    out = []
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        width = max(len(item.input_ids) for item in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        for row, item in enumerate(chunk):
            n = len(item.input_ids)
            ids[row, :n] = torch.tensor(item.input_ids)
            mask[row, :n] = 1
            labels[row, :n] = torch.tensor(item.labels)
        out.append((ids, mask, labels))
    return out


def _loss_sum(model: Any, batch: tuple[torch.Tensor, ...], device: torch.device):
    """Summed next-token cross-entropy over learned tokens, and how many there were."""
    ids, mask, labels = (t.to(device) for t in batch)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    shifted = labels[:, 1:]
    total = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        shifted.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, int((shifted != IGNORE_INDEX).sum())


@torch.no_grad()
def _mean_loss(
    model: Any, examples: Sequence[TokenizedExample], batch_size: int, pad_id: int, device
) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in _batches(examples, batch_size, pad_id, range(len(examples))):
        loss, n = _loss_sum(model, batch, device)
        total += float(loss)
        count += n
    model.train(was_training)
    return total / max(count, 1)


def _check_targets(model: Any, targets: Sequence[str]) -> None:
    names = [name for name, _ in model.named_modules()]
    output = model.get_output_embeddings()
    output_names = {name for name, module in model.named_modules() if module is output}
    for target in targets:
        if target == ALL_LINEAR:
            if len(targets) > 1:
                raise TrainError(f"{ALL_LINEAR!r} cannot be combined with other targets")
            continue
        hits = [n for n in names if n == target or n.endswith("." + target)]
        if not hits:
            leaves = sorted(
                {
                    n.rsplit(".", 1)[-1]
                    for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and n not in output_names
                }
            )
            raise TrainError(
                f"target {target!r} matches no layer of this model; linear layers: "
                + ", ".join(leaves)
            )
        if any(hit in output_names for hit in hits):
            raise TrainError(f"target {target!r} is the output layer, which loraserve cannot serve")


def _lr_lambda(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        remaining = max(total_steps - warmup_steps, 1)
        return max(0.1, 1.0 - 0.9 * (step - warmup_steps) / remaining)

    return factor


def _write_plot(path: Path, epoch_losses: list[float], eval_losses: list[float]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    epochs = list(range(1, len(epoch_losses) + 1))
    ax.plot(epochs, epoch_losses, marker="o", markersize=3, label="train")
    if eval_losses:
        ax.plot(epochs, eval_losses, marker="s", markersize=3, label="eval")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (cross-entropy per completion token)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title("LoRA training loss")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return True


def _load_base(model_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (model_path / "config.json").is_file():
        raise TrainError(f"{model_path} is not a Hugging Face checkpoint directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            model_path, local_files_only=True, dtype=torch.float32
        )
    except (OSError, ValueError) as exc:
        raise TrainError(f"cannot load {model_path}: {exc}") from exc
    return model, tokenizer


def train_adapter(config: TrainConfig) -> TrainResult:
    """Train a LoRA adapter as ``config`` says and save it (with its report) to ``out_dir``.

    Raises DatasetError for bad data files and TrainError for unusable arguments.
    """
    from peft import LoraConfig, get_peft_model

    from loraserve.adapters.config import parse_adapter_config

    config.validate()
    started = time.perf_counter()
    if config.model_path is None:
        from loraserve.testing.tiny_model import default_model_path

        config.model_path = default_model_path()
    model_path = Path(config.model_path)
    train_rows = load_jsonl(config.data_path)
    eval_rows = load_jsonl(config.eval_path) if config.eval_path is not None else []

    model, tokenizer = _load_base(model_path)
    max_length = min(config.max_length, _max_positions(model))
    train_set = tokenize_dataset(
        train_rows,
        tokenizer,
        max_length=max_length,
        source=str(config.data_path),
        chat_loss=config.chat_loss,
    )
    eval_set = (
        tokenize_dataset(
            eval_rows,
            tokenizer,
            max_length=max_length,
            source=str(config.eval_path),
            chat_loss=config.chat_loss,
        )
        if eval_rows
        else []
    )
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    device = torch.device("cpu")

    _check_targets(model, config.targets)
    model.requires_grad_(False)
    torch.manual_seed(config.seed)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=0.0,
        target_modules=ALL_LINEAR if ALL_LINEAR in config.targets else list(config.targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, lora)
    peft_model.to(device)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())

    initial_train = _mean_loss(peft_model, train_set, config.batch_size, pad_id, device)
    initial_eval = (
        _mean_loss(peft_model, eval_set, config.batch_size, pad_id, device) if eval_set else None
    )

    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(total_steps, int(config.warmup_ratio * total_steps))
    )
    order_gen = torch.Generator().manual_seed(config.seed)

    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_steps,
        desc="training",
        unit="step",
        file=sys.stderr,
        disable=not config.progress,
        dynamic_ncols=True,
    )
    epoch_losses: list[float] = []
    eval_losses: list[float] = []
    peft_model.train()
    try:
        for epoch in range(config.epochs):
            order = torch.randperm(len(train_set), generator=order_gen).tolist()
            epoch_total, epoch_count = 0.0, 0
            for batch in _batches(train_set, config.batch_size, pad_id, order):
                loss_sum, count = _loss_sum(peft_model, batch, device)
                loss = loss_sum / max(count, 1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                epoch_total += float(loss_sum.detach())
                epoch_count += count
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.4f}")
            epoch_losses.append(epoch_total / max(epoch_count, 1))
            if eval_set:
                eval_losses.append(
                    _mean_loss(peft_model, eval_set, config.batch_size, pad_id, device)
                )
    finally:
        bar.close()
    peft_model.eval()
    final_train = _mean_loss(peft_model, train_set, config.batch_size, pad_id, device)
    final_eval = eval_losses[-1] if eval_losses else None

    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    config_file = out_dir / "adapter_config.json"
    saved = json.loads(config_file.read_bytes())
    if isinstance(saved.get("target_modules"), list):
        # PEFT writes a set in hash order; sorted, the file is the same for every run.
        saved["target_modules"] = sorted(saved["target_modules"])
        config_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    config_bytes = config_file.read_bytes()
    # Fails loudly here, not at upload time, if PEFT ever writes an option the server refuses.
    parse_adapter_config(config_bytes, max_rank=max(config.rank, MAX_SERVED_RANK))
    seconds = time.perf_counter() - started

    report: dict[str, Any] = {
        "args": config.to_json(),
        "seed": config.seed,
        "model_path": str(model_path),
        "model_type": str(model.config.model_type),
        "train_examples": len(train_set),
        "eval_examples": len(eval_set),
        "train_label_tokens": sum(item.n_label_tokens for item in train_set),
        "steps": total_steps,
        "epoch_losses": epoch_losses,
        "eval_losses": eval_losses,
        "initial_train_loss": initial_train,
        "final_train_loss": final_train,
        "initial_eval_loss": initial_eval,
        "final_eval_loss": final_eval,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_fraction": trainable / total if total else 0.0,
        "seconds": round(seconds, 3),
        "versions": _versions(),
    }
    if config.rank > MAX_SERVED_RANK:
        report["warning"] = (
            f"rank {config.rank} is above {MAX_SERVED_RANK}, the server's default limit"
        )
    if config.write_plot:
        report["loss_curve"] = (
            CURVE_FILE if _write_plot(out_dir / CURVE_FILE, epoch_losses, eval_losses) else None
        )
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return TrainResult(
        out_dir=out_dir,
        epoch_losses=epoch_losses,
        initial_train_loss=initial_train,
        final_train_loss=final_train,
        initial_eval_loss=initial_eval,
        final_eval_loss=final_eval,
        seconds=seconds,
        trainable_params=trainable,
        total_params=total,
        train_examples=len(train_set),
        eval_examples=len(eval_set),
        report=report,
        model=peft_model,
        tokenizer=tokenizer,
    )


def _max_positions(model: Any) -> int:
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(model.config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_MAX_LENGTH


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def _targets(value: str) -> tuple[str, ...]:
    targets = tuple(part.strip() for part in value.split(",") if part.strip())
    if not targets:
        raise argparse.ArgumentTypeError("give at least one layer name, e.g. q_proj,v_proj")
    return targets


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraserve train",
        description="Train a LoRA adapter on a JSONL dataset; the output directory uploads "
        "to loraserve unchanged.",
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="base model checkpoint directory (default: the embedded model, as `serve` uses)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help='training JSONL: {"prompt","completion"} or {"messages": [...]} rows',
    )
    parser.add_argument("--eval", type=Path, default=None, help="evaluation JSONL (optional)")
    parser.add_argument("--out", type=Path, required=True, help="output adapter directory")
    parser.add_argument("--rank", type=int, default=DEFAULT_RANK, help="LoRA rank r")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="LoRA alpha")
    parser.add_argument(
        "--targets",
        type=_targets,
        default=DEFAULT_TARGETS,
        help=f"comma-separated layer names (default: {','.join(DEFAULT_TARGETS)})",
    )
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help="AdamW learning rate")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument(
        "--max-length",
        type=int,
        default=DEFAULT_MAX_LENGTH,
        help="longest row in tokens; longer rows are an error",
    )
    parser.add_argument(
        "--chat-loss",
        choices=["all_assistant", "last_assistant"],
        default="all_assistant",
        help="chat rows: learn every assistant turn, or only the last one",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`loraserve train`: 0 on success, 2 for bad arguments or data, 1 if training fails."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help or a usage error, already printed by argparse
        return exc.code if isinstance(exc.code, int) else 2
    config = TrainConfig(
        data_path=args.data,
        out_dir=args.out,
        model_path=args.model,
        eval_path=args.eval,
        rank=args.rank,
        alpha=args.alpha,
        targets=tuple(args.targets),
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        max_length=args.max_length,
        chat_loss=args.chat_loss,
        progress=not args.no_progress,
    )
    try:
        result = train_adapter(config)
    except DatasetError as exc:
        print(f"loraserve train: bad dataset {exc}", file=sys.stderr)
        return 2
    except TrainError as exc:
        print(f"loraserve train: {exc}", file=sys.stderr)
        return 2
    eval_part = (
        f", eval loss {result.initial_eval_loss:.4f} -> {result.final_eval_loss:.4f}"
        if result.final_eval_loss is not None and result.initial_eval_loss is not None
        else ""
    )
    print(
        f"trained {result.train_examples} rows in {result.seconds:.1f}s: train loss "
        f"{result.initial_train_loss:.4f} -> {result.final_train_loss:.4f}{eval_part}; "
        f"{result.trainable_params:,} trainable of {result.total_params:,} parameters\n"
        f"adapter: {result.out_dir}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
