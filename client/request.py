"""Building GenerateRequest messages from plain Python values."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from loraserve.v1 import inference_pb2

ChatMessageLike = inference_pb2.ChatMessage | tuple[str, str] | Mapping[str, str]
"""A chat message as a proto, a (role, content) pair or a {"role", "content"} mapping."""

Prompt = str | Sequence[ChatMessageLike]
"""A plain-text prompt, or chat messages rendered with the server's chat template."""


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters; None leaves a field unset so the server default applies."""

    max_new_tokens: int | None = None
    """Most tokens to generate."""
    temperature: float | None = None
    """Softmax temperature; 0 means greedy."""
    top_p: float | None = None
    """Nucleus sampling threshold in (0, 1]."""
    top_k: int | None = None
    """Keep only the top_k most likely tokens; 0 means no limit."""
    seed: int | None = None
    """Seed of the request's own generator, for reproducible sampling."""
    stop: Sequence[str] = ()
    """Stop sequences; the returned text ends before the one matched."""
    ignore_eos: bool | None = None
    """Always generate max_new_tokens, ignoring the end-of-sequence token."""

    def to_proto(self) -> inference_pb2.SamplingParams:
        """The SamplingParams message, with presence set only for the fields given."""
        # A bare string is one stop sequence, not a list of one-character ones.
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        params = inference_pb2.SamplingParams(stop=stop)
        # Optional proto3 fields: assigning (even 0) sets presence, so skip the Nones.
        for field in ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos"):
            value = getattr(self, field)
            if value is not None:
                setattr(params, field, value)
        return params


def to_chat_message(message: ChatMessageLike) -> inference_pb2.ChatMessage:
    """One ChatMessage from any ChatMessageLike form."""
    if isinstance(message, inference_pb2.ChatMessage):
        return message
    if isinstance(message, Mapping):
        return inference_pb2.ChatMessage(role=message["role"], content=message["content"])
    role, content = message
    return inference_pb2.ChatMessage(role=role, content=content)


@dataclass(frozen=True)
class Logprobs:
    """Which log-probabilities to return (all off by default)."""

    logprobs: bool = False
    """The log-probability of every generated token (GenerateResponse.logprobs)."""
    top_logprobs: int = 0
    """With logprobs or prompt_logprobs: this many most likely tokens per position (0..20)."""
    prompt_logprobs: bool = False
    """The log-probability of every prompt token after the first (scores a text)."""


def build_generate_request(
    prompt: Prompt, adapter: str, sampling: Sampling, logprobs: Logprobs | None = None
) -> inference_pb2.GenerateRequest:
    """The GenerateRequest for a prompt (a str) or chat messages (a sequence) on one adapter."""
    scoring = logprobs or Logprobs()
    request = inference_pb2.GenerateRequest(
        adapter=adapter,
        sampling=sampling.to_proto(),
        logprobs=scoring.logprobs,
        top_logprobs=scoring.top_logprobs,
        prompt_logprobs=scoring.prompt_logprobs,
    )
    # str is itself a Sequence, so it must be tested first.
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.messages.extend(to_chat_message(m) for m in prompt)
    return request
