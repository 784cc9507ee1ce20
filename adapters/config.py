"""Parsing and checking of a PEFT `adapter_config.json`, and resolving its target modules.

loraserve implements plain LoRA only: y = W0 x + scale * B (A x) on linear layers. Every PEFT
option that changes that forward pass (DoRA, biases, per-layer ranks, embeddings, variants, init
schemes that rewrite W0 ...) is refused here with a message naming the key, so an adapter that
would silently compute something different from what the tenant trained is never served.
Keys that only matter for training or bookkeeping are ignored: PEFT writes many of them.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any

import regex

from loraserve.adapters.errors import AdapterTooLargeError, AdapterValidationError, clip, echo
from loraserve.adapters.spec import BaseModelSpec

CONFIG_FILE = "adapter_config.json"
"""File name of the config inside a PEFT adapter directory; also the prefix of error fields."""

DEFAULT_MAX_CONFIG_BYTES = 65536
"""A real adapter_config.json is about 1.5 KB; anything far larger is not one."""

DEFAULT_LORA_ALPHA = 8.0
"""PEFT's default lora_alpha when the key is absent."""

ALL_LINEAR = "all-linear"
"""PEFT's wildcard target: every linear layer except the output layer."""

MAX_TARGET_REGEX_LENGTH = 1024
"""Longest accepted regex target_modules string; real ones are well under 200 characters."""

# Keys whose non-default value changes what the adapter computes, and that loraserve does not
# implement. A value counts as set unless it is None, False, or an empty list/dict/string; note
# that 0 is a real value for layers_to_transform ("only layer 0"), so it counts as set.
_UNSUPPORTED_KEYS: tuple[str, ...] = (
    "use_dora",
    "modules_to_save",
    "layer_replication",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "trainable_token_indices",
    "target_parameters",
    "lora_bias",
    "use_qalora",
    "alora_invocation_tokens",
    "exclude_modules",
    # LoRA variants of peft 0.21 whose forward pass differs from plain LoRA.
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "monteclora_config",
)

# init_lora_weights values that also rewrite the base weights W0 (W0 - scale * B0 A0 or a
# quantized W0): such an adapter is only right on that modified base model, never on ours.
# PEFT can convert them to plain LoRA with
# save_pretrained(path_initial_model_for_weight_conversion=...) (it writes init_lora_weights=true).
_BASE_REWRITING_INITS: tuple[str, ...] = ("pissa", "olora", "corda", "loftq", "lora_ga")

_SUPPORTED_TASK_TYPES = (None, "CAUSAL_LM")


@dataclass(frozen=True)
class LoraAdapterConfig:
    """The parts of a checked adapter_config.json that serving needs."""

    rank: int
    """r: inner dimension of lora_A (r, d_in) and lora_B (d_out, r)."""
    alpha: float
    """lora_alpha."""
    use_rslora: bool
    """True: scale = alpha / sqrt(r) (rsLoRA); False: scale = alpha / r."""
    target_modules: list[str] | str
    """As given: a list of module names/suffixes, a regex, or "all-linear"."""
    raw: dict[str, Any]
    """The whole parsed JSON object, for display and debugging only."""

    @property
    def scale(self) -> float:
        """The factor on B (A x): alpha / r, or alpha / sqrt(r) with rsLoRA."""
        if self.use_rslora:
            return self.alpha / math.sqrt(self.rank)
        return self.alpha / self.rank


def _error(key: str, message: str) -> AdapterValidationError:
    return AdapterValidationError(f"{CONFIG_FILE}:{clip(key)}", message)


def _is_set(value: object) -> bool:
    """Whether an optional PEFT key carries a non-default value (see _UNSUPPORTED_KEYS)."""
    if value is None or value is False:
        return False
    return not (isinstance(value, list | dict | str) and len(value) == 0)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: a key given twice is ambiguous (json.loads would keep the last)."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _error(key, f"key {echo(key)} appears more than once")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    """json constant hook: NaN and Infinity are not JSON, though Python's json accepts them."""
    raise _error("json", f"{name} is not valid JSON")


def _load_json_object(data: bytes, max_bytes: int) -> dict[str, Any]:
    if len(data) > max_bytes:
        raise AdapterTooLargeError(
            f"{CONFIG_FILE}:size",
            f"is {len(data)} bytes; at most {max_bytes} bytes are accepted",
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _error("json", f"is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        parsed = json.loads(
            text, object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant
        )
    except json.JSONDecodeError as exc:
        raise _error(
            "json", f"is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:
        raise _error("json", "is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise _error("json", f"is not valid JSON: {clip(str(exc))}") from None
    if not isinstance(parsed, dict):
        raise _error("json", f"must be a JSON object, got {type(parsed).__name__}")
    return parsed


def _check_rank(raw: dict[str, Any], max_rank: int) -> int:
    if "r" not in raw:
        raise _error("r", "is missing; set the LoRA rank r")
    rank = raw["r"]
    # bool is an int subclass in Python; true/false is never a rank.
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise _error("r", f"must be an integer, got {echo(rank)}")
    if not 1 <= rank <= max_rank:
        raise _error("r", f"must be between 1 and {max_rank} on this server, got {rank}")
    return rank


def _check_alpha(raw: dict[str, Any]) -> float:
    alpha = raw.get("lora_alpha", DEFAULT_LORA_ALPHA)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise _error("lora_alpha", f"must be a number, got {echo(alpha)}")
    try:
        alpha = float(alpha)
    except OverflowError:
        alpha = math.inf
    if not math.isfinite(alpha) or alpha <= 0:
        raise _error("lora_alpha", f"must be a finite number > 0, got {echo(alpha)}")
    return alpha


def _check_target_modules(raw: dict[str, Any]) -> list[str] | str:
    targets = raw.get("target_modules")
    if targets is None:
        raise _error(
            "target_modules",
            "is missing; list the layers explicitly "
            '(e.g. ["q_proj", "v_proj"]) or use "all-linear"',
        )
    if isinstance(targets, str):
        if not targets:
            raise _error("target_modules", "must not be an empty string")
        if len(targets) > MAX_TARGET_REGEX_LENGTH:
            raise _error(
                "target_modules", f"regex is longer than {MAX_TARGET_REGEX_LENGTH} characters"
            )
        return targets
    if not isinstance(targets, list) or not targets:
        raise _error("target_modules", "must be a non-empty list of module names or a string")
    for entry in targets:
        if not isinstance(entry, str) or not entry:
            raise _error("target_modules", f"entries must be non-empty strings, got {echo(entry)}")
    return list(targets)


def _check_unsupported(raw: dict[str, Any]) -> None:
    for key in _UNSUPPORTED_KEYS:
        if _is_set(raw.get(key)):
            raise _error(
                key, f"{key}={echo(raw[key])} is not supported by loraserve (plain LoRA only)"
            )
    bias = raw.get("bias", "none")
    if bias != "none":
        raise _error(
            "bias",
            f'bias={echo(bias)} is not supported by loraserve; only "none" (no trained biases)',
        )
    task_type = raw.get("task_type")
    if task_type not in _SUPPORTED_TASK_TYPES:
        raise _error(
            "task_type",
            f'must be null or "CAUSAL_LM" for a causal LM server, got {echo(task_type)}',
        )
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith(_BASE_REWRITING_INITS):
        raise _error(
            "init_lora_weights",
            f"init_lora_weights={echo(init)} also changes the base weights, so this adapter is "
            "only correct on that modified base; convert it to plain LoRA with PEFT's "
            "save_pretrained(path_initial_model_for_weight_conversion=...) and upload that",
        )


def parse_adapter_config(
    data: bytes, *, max_rank: int, max_bytes: int = DEFAULT_MAX_CONFIG_BYTES
) -> LoraAdapterConfig:
    """Parse and check adapter_config.json bytes; raise AdapterValidationError on the first problem.

    The error's field is "adapter_config.json:<key>" for the offending key ("...:json" for syntax,
    "...:size" for a file over max_bytes).
    """
    raw = _load_json_object(data, max_bytes)
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise _error("peft_type", f'must be "LORA" (a PEFT LoRA adapter), got {echo(peft_type)}')
    rank = _check_rank(raw, max_rank)
    alpha = _check_alpha(raw)
    use_rslora = raw.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise _error("use_rslora", f"must be true or false, got {echo(use_rslora)}")
    _check_unsupported(raw)
    targets = _check_target_modules(raw)
    return LoraAdapterConfig(
        rank=rank, alpha=alpha, use_rslora=use_rslora, target_modules=targets, raw=raw
    )


def _entry_matches(entry: str, module_name: str) -> bool:
    """PEFT's rule for a list entry: the full name, or a suffix starting at a dot boundary."""
    return module_name == entry or module_name.endswith("." + entry)


_TARGETS_FIELD = f"{CONFIG_FILE}:target_modules"
_UNTARGETABLE_MESSAGE = (
    "embedding and lm_head targets are not supported by loraserve; target only linear layers "
    "inside the transformer blocks"
)


REGEX_BUDGET_SECONDS = 0.5
"""Time a target_modules regex may spend matching all of the model's layer names."""


def resolve_target_modules(config: LoraAdapterConfig, spec: BaseModelSpec) -> list[str]:
    """Full names of the base layers the adapter changes, in the model's module order.

    PEFT semantics: a list entry matches a module whose full name equals it or ends with
    "." + entry; "all-linear" matches every targetable layer; any other string is a regex that
    must fullmatch the full name. Raise AdapterValidationError if a target names an embedding or
    lm_head, if a list entry or regex matches no targetable layer, or if the regex is invalid.
    """
    targets = config.target_modules
    if targets == ALL_LINEAR:
        return list(spec.modules)
    if isinstance(targets, str):
        try:
            re.compile(targets)  # PEFT's dialect: refuse what `re` would refuse
            pattern = regex.compile(targets)
        except (re.error, regex.error, OverflowError, RecursionError) as exc:
            raise AdapterValidationError(
                _TARGETS_FIELD, f"is not a valid regular expression: {exc}"
            ) from None
        deadline = time.monotonic() + REGEX_BUDGET_SECONDS

        def fullmatch(name: str) -> bool:
            # A tenant's regex could backtrack for hours; `regex` can stop it, `re` cannot.
            left = deadline - time.monotonic()
            try:
                return pattern.fullmatch(name, timeout=max(left, 0.001)) is not None
            except TimeoutError:
                raise AdapterValidationError(
                    _TARGETS_FIELD,
                    f"regex {echo(targets)} takes too long to match layer names; simplify it",
                ) from None

        bad = sorted(name for name in spec.untargetable if fullmatch(name))
        if bad:
            raise AdapterValidationError(
                _TARGETS_FIELD, f"regex {echo(targets)} matches {bad[0]!r}: {_UNTARGETABLE_MESSAGE}"
            )
        matched = [name for name in spec.modules if fullmatch(name)]
        if not matched:
            example = next(iter(spec.modules), "?")
            raise AdapterValidationError(
                _TARGETS_FIELD,
                f"regex {echo(targets)} matches no targetable layer of this "
                f"{spec.model_type} model (layer names look like {example!r})",
            )
        return matched
    selected: set[str] = set()
    for entry in targets:
        if any(_entry_matches(entry, name) for name in spec.untargetable):
            raise AdapterValidationError(_TARGETS_FIELD, f"{echo(entry)}: {_UNTARGETABLE_MESSAGE}")
        hits = {name for name in spec.modules if _entry_matches(entry, name)}
        if not hits:
            raise AdapterValidationError(
                _TARGETS_FIELD,
                f"{echo(entry)} matches no targetable layer of this {spec.model_type} model; "
                f"available: {', '.join(spec.leaf_names())}",
            )
        selected |= hits
    return [name for name in spec.modules if name in selected]
