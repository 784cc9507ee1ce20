"""Rank advice for a PEFT LoRA adapter: the spectrum of each learned update, and SVD truncation.

`loraserve adapters inspect DIR` reports, per target layer, the singular values of the update
dW = scale * B @ A, its effective rank at 90% and 99% energy, and the trainable-parameter count
r * (d_in + d_out) against the full d_in * d_out matrix, then suggests a rank.
`--truncate-rank R --out DIR2` writes the best rank-R approximation of every update (Eckart-Young)
as a standard PEFT adapter and measures how far the model's logits move.

The SVD uses the thin form: with B = Qb Rb and A^T = Qa Ra (reduced QR), B A = Qb (Rb Ra^T) Qa^T,
so only the small r x r core is decomposed; the cost is O((d_in + d_out) r^2), never d_in * d_out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors_bytes

from loraserve.adapters.config import CONFIG_FILE
from loraserve.adapters.errors import AdapterValidationError
from loraserve.adapters.safetensors_check import WEIGHTS_FILE, check_safetensors
from loraserve.adapters.spec import BaseModelSpec, TargetModule
from loraserve.adapters.weights import (
    PEFT_KEY_PREFIX,
    AdapterWeights,
    load_adapter_weights,
    lora_keys,
)

ENERGY_THRESHOLDS = (0.90, 0.99)
"""Energy fractions at which the effective rank is reported."""

RANK_MULTIPLE = 4
"""The suggested rank is rounded up to a multiple of this (never above the adapter's r)."""

MAX_RANK = 1 << 16
"""Rank bound passed to the validator: inspection accepts any rank a file can hold."""

TOP_SINGULAR_VALUES = 4
"""How many leading singular values the table shows (JSON output holds them all)."""

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Once upon a time, there was a",
    "def fibonacci(n):",
    "Question: what is two plus two? Answer:",
)
"""Prompts used to measure output drift when no --eval file is given."""

MAX_EVAL_PROMPTS = 32
"""At most this many rows of an --eval file are used for the drift measurement."""

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class LayerReport:
    """The spectrum of one layer's learned update dW = scale * B @ A."""

    name: str
    """Full module name, e.g. "model.layers.0.self_attn.q_proj"."""
    rank: int
    """r of the adapter (columns of B, rows of A)."""
    d_in: int
    d_out: int
    singular_values: list[float]
    """Singular values of dW (scale included), descending; min(r, d_in, d_out) of them."""
    rank_90: int
    """Smallest k whose top-k singular values hold >= 90% of the energy (sum of s^2)."""
    rank_99: int
    """Same at 99%; 0 for an all-zero update."""
    lora_params: int
    """Trainable parameters: r * (d_in + d_out)."""
    full_params: int
    """Parameters of the full update matrix: d_in * d_out."""


@dataclass(frozen=True)
class InspectReport:
    """Rank advice for a whole adapter."""

    adapter: str
    rank: int
    alpha: float
    use_rslora: bool
    scale: float
    layers: list[LayerReport]
    lora_params: int
    full_params: int
    needed_rank: int
    """max over layers of rank_99: the smallest rank keeping 99% of every layer's energy."""
    suggested_rank: int
    """needed_rank rounded up to a multiple of RANK_MULTIPLE, at least 1, at most `rank`."""


@dataclass(frozen=True)
class DriftReport:
    """How far the logits move when the original adapter is replaced by the truncated one."""

    prompts: int
    tokens: int
    max_abs_diff: float
    """Largest |logit_original - logit_truncated| over all prompts, positions and vocab."""
    mean_kl: float
    """Mean over positions of KL(p_original || p_truncated), in nats."""
    top1_agreement: float
    """Fraction of positions where both pick the same argmax token."""
    adapter_max_abs_diff: float
    """Largest |logit_base - logit_original|: how much the adapter itself moves outputs."""


def effective_rank(singular_values: torch.Tensor, threshold: float) -> int:
    """Smallest k with sum(s[:k]^2) / sum(s^2) >= threshold; 0 when every value is zero."""
    energy = singular_values.double() ** 2
    total = float(energy.sum())
    if total <= 0.0:
        return 0
    cumulative = torch.cumsum(energy, 0) / total
    # A tiny tolerance so that an exactly-achieved threshold is not missed by rounding.
    hits = torch.nonzero(cumulative >= threshold - 1e-12)
    return int(hits[0, 0]) + 1 if len(hits) else len(singular_values)


def thin_svd(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of B @ A from its factors, in float64: (U (d_out, k), S (k,), V (d_in, k)).

    A: (r, d_in), B: (d_out, r); k = min(r, d_in, d_out). B @ A == U @ diag(S) @ V.T.
    """
    qb, rb = torch.linalg.qr(b.double(), mode="reduced")  # (d_out, k1), (k1, r)
    qa, ra = torch.linalg.qr(a.double().T, mode="reduced")  # (d_in, k2), (k2, r)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)  # core (k1, k2)
    return qb @ u, s, qa @ vh.T


def suggest_rank(needed: int, rank: int) -> int:
    """`needed` rounded up to a multiple of RANK_MULTIPLE, clamped to [1, rank].

    An all-zero adapter (needed 0) gets 1: it carries nothing, and PEFT needs r >= 1.
    """
    if needed <= 0:
        return 1
    rounded = -(-needed // RANK_MULTIPLE) * RANK_MULTIPLE
    return max(1, min(rank, rounded))


def _spec_from_headers(weights: bytes) -> BaseModelSpec:
    """A spec holding exactly the layers the file has LoRA factors for (shapes from the header)."""
    headers = check_safetensors(weights)
    shapes: dict[str, dict[str, int]] = {}
    for key, header in headers.items():
        for suffix, dim, field in ((".lora_A.weight", 1, "in"), (".lora_B.weight", 0, "out")):
            if key.startswith(PEFT_KEY_PREFIX) and key.endswith(suffix) and len(header.shape) == 2:
                module = key[len(PEFT_KEY_PREFIX) : -len(suffix)]
                shapes.setdefault(module, {})[field] = header.shape[dim]
    modules = {
        name: TargetModule(name, dims.get("in", 0), dims.get("out", 0))
        for name, dims in sorted(shapes.items())
    }
    return BaseModelSpec(model_type="unknown", modules=modules)


def model_spec(model_dir: Path) -> BaseModelSpec:
    """The targetable layers of a local base model checkpoint (as the server sees them)."""
    from loraserve.server.engine.model import (  # imports transformers
        ModelLoadError,
        load_base_model,
    )

    try:
        return load_base_model(Path(model_dir), device="cpu", dtype="float32").spec
    except ModelLoadError as exc:
        raise ValueError(str(exc)) from None


def load_adapter_dir(adapter_dir: Path, spec: BaseModelSpec | None = None) -> AdapterWeights:
    """Load and validate a PEFT adapter directory; without `spec`, its own shapes are trusted."""
    adapter_dir = Path(adapter_dir)
    config = (adapter_dir / CONFIG_FILE).read_bytes()
    weights = (adapter_dir / WEIGHTS_FILE).read_bytes()
    if spec is None:
        spec = _spec_from_headers(weights)
    return load_adapter_weights(config, weights, spec, max_rank=MAX_RANK)


def inspect_adapter(adapter_dir: Path, spec: BaseModelSpec | None = None) -> InspectReport:
    """Spectrum, effective ranks and parameter counts of every layer of an adapter."""
    loaded = load_adapter_dir(adapter_dir, spec)
    config = loaded.config
    layers: list[LayerReport] = []
    for name, (a, b) in loaded.modules.items():
        _, s, _ = thin_svd(a, b)
        s = s * abs(config.scale)
        r, d_in = a.shape
        d_out = b.shape[0]
        layers.append(
            LayerReport(
                name=name,
                rank=int(r),
                d_in=int(d_in),
                d_out=int(d_out),
                singular_values=[float(v) for v in s],
                rank_90=effective_rank(s, ENERGY_THRESHOLDS[0]),
                rank_99=effective_rank(s, ENERGY_THRESHOLDS[1]),
                lora_params=int(r * (d_in + d_out)),
                full_params=int(d_in * d_out),
            )
        )
    needed = max((layer.rank_99 for layer in layers), default=0)
    return InspectReport(
        adapter=str(adapter_dir),
        rank=config.rank,
        alpha=config.alpha,
        use_rslora=config.use_rslora,
        scale=config.scale,
        layers=layers,
        lora_params=sum(layer.lora_params for layer in layers),
        full_params=sum(layer.full_params for layer in layers),
        needed_rank=needed,
        suggested_rank=suggest_rank(needed, config.rank),
    )


def truncate_factors(
    a: torch.Tensor, b: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (A' (rank, d_in), B' (d_out, rank)) of the best rank-`rank` approximation of B A.

    The singular values are split evenly (sqrt on each side); missing directions (an update of
    lower rank than `rank`) are zero. Returned in float64.
    """
    u, s, v = thin_svd(a, b)
    k = min(rank, len(s))
    root = torch.sqrt(s[:k])
    new_a = torch.zeros(rank, a.shape[1], dtype=torch.float64)
    new_b = torch.zeros(b.shape[0], rank, dtype=torch.float64)
    new_a[:k] = root[:, None] * v[:, :k].T
    new_b[:, :k] = u[:, :k] * root[None, :]
    return new_a, new_b


def truncate_adapter(src: Path, dst: Path, rank: int) -> Path:
    """Write the SVD-truncated rank-`rank` version of adapter `src` to `dst` in PEFT format.

    The scale is preserved: use_rslora is kept and lora_alpha is set so that alpha / r (or
    alpha / sqrt(r)) is unchanged. Tensors keep their stored dtype. The result is checked with
    load_adapter_weights before returning `dst`.
    """
    src, dst = Path(src), Path(dst)
    loaded = load_adapter_dir(src)
    config = loaded.config
    if not 1 <= rank <= config.rank:
        raise ValueError(f"--truncate-rank must be between 1 and the adapter's r={config.rank}")
    headers = check_safetensors((src / WEIGHTS_FILE).read_bytes())
    tensors: dict[str, torch.Tensor] = {}
    for name, (a, b) in loaded.modules.items():
        new_a, new_b = truncate_factors(a, b, rank)
        key_a, key_b = lora_keys(name)
        tensors[key_a] = new_a.to(_DTYPES.get(headers[key_a].dtype, torch.float32)).contiguous()
        tensors[key_b] = new_b.to(_DTYPES.get(headers[key_b].dtype, torch.float32)).contiguous()
    raw: dict[str, Any] = dict(config.raw)
    raw["r"] = rank
    raw["lora_alpha"] = config.scale * (math.sqrt(rank) if config.use_rslora else rank)
    dst.mkdir(parents=True, exist_ok=True)
    config_bytes = (json.dumps(raw, indent=2, sort_keys=True) + "\n").encode()
    weights_bytes = save_safetensors_bytes(tensors, metadata={"format": "pt"})
    (dst / CONFIG_FILE).write_bytes(config_bytes)
    (dst / WEIGHTS_FILE).write_bytes(weights_bytes)
    load_adapter_weights(
        config_bytes, weights_bytes, _spec_from_headers(weights_bytes), max_rank=MAX_RANK
    )
    return dst


def read_eval_prompts(path: Path, limit: int = MAX_EVAL_PROMPTS) -> list[str]:
    """Texts from a JSONL eval file: prompt + completion, chat messages, or a "text" field."""
    prompts: list[str] = []
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: each line must be a JSON object")
            if isinstance(row.get("prompt"), str):
                text = row["prompt"] + str(row.get("completion") or "")
            elif isinstance(row.get("messages"), list):
                text = "\n".join(
                    str(m.get("content", "")) for m in row["messages"] if isinstance(m, dict)
                )
            elif isinstance(row.get("text"), str):
                text = row["text"]
            else:
                raise ValueError(
                    f'{path}:{number}: expected a "prompt", "messages" or "text" field'
                )
            if text:
                prompts.append(text)
            if len(prompts) >= limit:
                break
    if not prompts:
        raise ValueError(f"{path}: no prompts found")
    return prompts


def output_drift(
    model_dir: Path, original_dir: Path, truncated_dir: Path, prompts: list[str] | tuple[str, ...]
) -> DriftReport:
    """Compare the base model's logits with the original and with the truncated adapter (PEFT)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(
        model_dir, local_files_only=True, dtype=torch.float32
    )
    model = PeftModel.from_pretrained(base, str(original_dir), adapter_name="original")
    model.load_adapter(str(truncated_dir), adapter_name="truncated")
    model.eval()
    max_diff = adapter_diff = kl_sum = 0.0
    agree = tokens = 0
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            if ids.shape[1] == 0:
                continue
            model.set_adapter("original")
            original = model(input_ids=ids).logits[0].double()
            model.set_adapter("truncated")
            truncated = model(input_ids=ids).logits[0].double()
            with model.disable_adapter():
                plain = model(input_ids=ids).logits[0].double()
            max_diff = max(max_diff, float((original - truncated).abs().max()))
            adapter_diff = max(adapter_diff, float((original - plain).abs().max()))
            log_p = torch.log_softmax(original, -1)
            log_q = torch.log_softmax(truncated, -1)
            kl_sum += float((log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0).sum())
            agree += int((original.argmax(-1) == truncated.argmax(-1)).sum())
            tokens += int(ids.shape[1])
    return DriftReport(
        prompts=len(prompts),
        tokens=tokens,
        max_abs_diff=max_diff,
        mean_kl=kl_sum / tokens if tokens else 0.0,
        top1_agreement=agree / tokens if tokens else 1.0,
        adapter_max_abs_diff=adapter_diff,
    )


def _short(name: str) -> str:
    return name.removeprefix("model.").replace("layers.", "L").replace("self_attn.", "")


def format_report(report: InspectReport) -> str:
    """A human-readable table of the report."""
    rows = [("layer", "r", "rank@90", "rank@99", "top singular values", "params / full")]
    for layer in report.layers:
        top = ", ".join(f"{v:.3g}" for v in layer.singular_values[:TOP_SINGULAR_VALUES])
        share = 100.0 * layer.lora_params / layer.full_params if layer.full_params else 0.0
        rows.append(
            (
                _short(layer.name),
                str(layer.rank),
                str(layer.rank_90),
                str(layer.rank_99),
                top,
                f"{layer.lora_params:,} / {layer.full_params:,} ({share:.1f}%)",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        f"adapter {report.adapter}: r={report.rank}, alpha={report.alpha:g}, "
        f"{'rsLoRA ' if report.use_rslora else ''}scale={report.scale:.4g}"
    ]
    for index, row in enumerate(rows):
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    share = 100.0 * report.lora_params / report.full_params if report.full_params else 0.0
    lines.append(
        f"total trainable parameters: {report.lora_params:,} of {report.full_params:,} "
        f"full ({share:.1f}%)"
    )
    lines.append(
        f"suggested rank: {report.suggested_rank} (99% of every layer's energy needs "
        f"rank {report.needed_rank}; current r={report.rank})"
    )
    return "\n".join(lines)


def format_drift(drift: DriftReport) -> str:
    """One paragraph on how far outputs moved."""
    return (
        f"output drift on {drift.prompts} prompts ({drift.tokens} positions): "
        f"max |dlogit| {drift.max_abs_diff:.3g}, mean KL {drift.mean_kl:.3g} nats, "
        f"top-1 agreement {100.0 * drift.top1_agreement:.1f}% "
        f"(the adapter itself moves logits by up to {drift.adapter_max_abs_diff:.3g})"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraserve adapters inspect",
        description="Per-layer singular values and effective rank of a LoRA adapter, a suggested "
        "rank, and optional SVD truncation.",
    )
    parser.add_argument("adapter", type=Path, metavar="DIR", help="PEFT adapter directory")
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="base model checkpoint (validates the adapter against it; used for the drift "
        "measurement; default: the embedded model)",
    )
    parser.add_argument(
        "--truncate-rank",
        type=int,
        default=None,
        metavar="R",
        help="write an SVD-truncated adapter of rank R (needs --out)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR2",
        help="output directory of the truncated adapter",
    )
    parser.add_argument(
        "--eval",
        type=Path,
        default=None,
        metavar="EVAL_JSONL",
        help="prompts for the drift measurement (default: a few built-in ones)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `loraserve adapters inspect`; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.truncate_rank is None) != (args.out is None):
        parser.error("--truncate-rank and --out go together")
    if args.eval is not None and args.truncate_rank is None:
        parser.error("--eval measures the truncated adapter's drift: it needs --truncate-rank")
    try:
        spec = model_spec(args.model) if args.model is not None else None
        report = inspect_adapter(args.adapter, spec)
        result: dict[str, Any] = {"inspect": dataclasses.asdict(report)}
        drift: DriftReport | None = None
        if args.truncate_rank is not None:
            out = truncate_adapter(args.adapter, args.out, args.truncate_rank)
            model_dir = args.model
            if model_dir is None:
                from loraserve.testing.tiny_model import default_model_path

                model_dir = default_model_path()
            prompts = read_eval_prompts(args.eval) if args.eval else list(DEFAULT_PROMPTS)
            drift = output_drift(model_dir, args.adapter, out, prompts)
            result["truncated"] = {"path": str(out), "rank": args.truncate_rank}
            result["drift"] = dataclasses.asdict(drift)
    except (AdapterValidationError, ValueError, OSError) as exc:
        print(f"loraserve adapters inspect: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(format_report(report))
    if drift is not None:
        print(f"wrote rank-{args.truncate_rank} adapter to {result['truncated']['path']}")
        print(format_drift(drift))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
