"""Domain types shared by the engine and its callers: requests, sampling, events, errors."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class FinishReason(enum.Enum):
    """Why a sequence stopped."""

    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"


class ErrorKind(enum.Enum):
    """Engine failure classes; the gRPC layer maps each to one status code."""

    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    CANCELLED = "cancelled"
    UNAUTHENTICATED = "unauthenticated"
    INTERNAL = "internal"


class EngineError(Exception):
    """A request cannot be (or could not be) served; `kind` says why."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class SamplingParams:
    """Resolved sampling parameters of one request (defaults already applied)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class LogprobOptions:
    """Which log-probabilities a request asks for (all off by default: no extra work)."""

    logprobs: bool = False
    """The log-probability of every generated token."""
    top_logprobs: int = 0
    """With logprobs or prompt_logprobs: this many most likely tokens per position (0..20)."""
    prompt_logprobs: bool = False
    """The log-probability of every prompt token after the first, given the ones before it."""


MAX_TOP_LOGPROBS = 20
"""Most alternatives a request may ask for per position (as the OpenAI and vLLM APIs allow)."""


@dataclass(frozen=True)
class TopLogprob:
    """One of the most likely tokens at a position."""

    token_id: int
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """The natural-log probability of one token, and the `top` most likely alternatives
    (most likely first) of the distribution it was scored under."""

    token_id: int
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class AdapterRef:
    """An adapter as a request names it; the engine resolves the current version at admission."""

    tenant: str
    name: str
    version: int | None = None
    """A pinned version (`name@N`); None means the latest when the request is resolved."""


@dataclass(frozen=True)
class AdapterKey:
    """One immutable adapter version; a re-upload is a new key, so running requests keep theirs."""

    tenant: str
    name: str
    version: int
    rank: int = field(default=0, compare=False)
    """The version's rank, known from the store before loading (to plan device pages)."""


def forgotten_versions(
    tenant: str, name: str, below_version: int | None = None, version: int | None = None
) -> Callable[[AdapterKey], bool]:
    """Which keys a delete or prune of tenant/name frees: only `version` when given, else
    those below `below_version`, else every version (the tiers' and pins' `forget`)."""

    def matches(key: AdapterKey) -> bool:
        if key.tenant != tenant or key.name != name:
            return False
        if version is not None:  # one deleted version; the others stay valid
            return key.version == version
        return below_version is None or key.version < below_version

    return matches


@dataclass(frozen=True)
class Usage:
    """Token counts and timings of one request, in seconds since its arrival."""

    prompt_tokens: int
    completion_tokens: int
    queue_seconds: float
    time_to_first_token_seconds: float
    total_seconds: float
    compute_seconds: float = 0.0
    """Engine busy time attributed to this request (its token share of every step it was in)."""
    cost: float = 0.0
    """compute_seconds priced at the configured price per device-hour."""


@dataclass(frozen=True)
class TokenEvent:
    """New tokens were produced; `text` is the newly safe-to-show text (may be empty)."""

    token_ids: tuple[int, ...]
    text: str
    adapter_version: int
    """The adapter version serving this request (0 for the base model)."""
    logprobs: tuple[TokenLogprob, ...] = ()
    """With LogprobOptions.logprobs: one entry per token in token_ids."""
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    """With LogprobOptions.prompt_logprobs: every prompt token after the first, on the
    request's first event only."""

    def then(self, later: TokenEvent) -> TokenEvent:
        """This event and the `later` one of the same request as one (a stream message may
        carry several steps' tokens)."""
        return TokenEvent(
            token_ids=self.token_ids + later.token_ids,
            text=self.text + later.text,
            adapter_version=self.adapter_version,
            logprobs=self.logprobs + later.logprobs,
            prompt_logprobs=self.prompt_logprobs,
        )


@dataclass(frozen=True)
class FinishEvent:
    """The request finished normally; the whole completion and its usage."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: Usage
    text_delta: str
    """Text not yet sent in a TokenEvent (the tail held back for stop-sequence matching)."""
    new_token_ids: tuple[int, ...]
    """Tokens produced in the finishing step (not sent in a TokenEvent)."""
    adapter_version: int
    logprobs: tuple[TokenLogprob, ...] = ()
    """With LogprobOptions.logprobs: one entry per token in token_ids."""
    new_logprobs: tuple[TokenLogprob, ...] = ()
    """The entries of new_token_ids (the stream's last message carries these)."""
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    """With LogprobOptions.prompt_logprobs: every prompt token after the first (always
    here in full, whether or not a TokenEvent carried them before)."""


@dataclass(frozen=True)
class ErrorEvent:
    """The request failed; no further events follow."""

    error: EngineError


Event = TokenEvent | FinishEvent | ErrorEvent
EventSink = Callable[[Event], None]
"""Called from the engine thread; must not block (the gRPC layer hops onto its event loop)."""


@dataclass
class GenerationRequest:
    """A tokenized request as the engine receives it."""

    request_id: str
    tenant: str
    adapter: AdapterRef | None
    """None means the bare base model."""
    prompt_ids: list[int]
    sampling: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    logprobs: LogprobOptions = field(default_factory=LogprobOptions)
