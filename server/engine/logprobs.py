"""Log-probabilities of chosen tokens and their top alternatives, for whole steps at once.

Which distribution: a generated token's log-probability is taken from the distribution it was
drawn from after temperature but BEFORE top-k / top-p truncation (vLLM's default): the
truncated distribution gives -inf to every token outside the kept set and renormalises the
rest, which says more about the sampling settings than about the model. Greedy rows use
temperature 1, i.e. the model's raw `log_softmax`. Prompt tokens (prompt_logprobs) are always
scored under the raw distribution.

Everything is float32 and vectorised over the rows of a step: one log_softmax, one gather and
one top-k for all the rows that asked; only those rows are passed in, so a step where nobody
asked does no work here. Prompt positions are scored in slices of SCORE_SLICE positions, so a
long prompt chunk never materialises (chunk, vocab) logits at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from loraserve.server.engine.types import TokenLogprob, TopLogprob

SCORE_SLICE = 256
"""Prompt positions scored per head matmul: bounds the (positions, vocab) float32 buffer."""


def token_logprobs(
    logits: torch.Tensor,
    tokens: Sequence[int],
    top_n: Sequence[int],
    temperatures: Sequence[float] | None = None,
) -> list[TokenLogprob]:
    """Each row's log-probability of its token, and its top_n[row] most likely tokens.

    logits: (rows, vocab), any float dtype and device. temperatures: per row, 0 meaning greedy
    (scored at temperature 1); None scores every row under the raw distribution.
    """
    rows, vocab = logits.shape
    if rows == 0:
        return []
    scaled = logits.float()  # (rows, vocab) float32
    if temperatures is not None and any(t > 0 for t in temperatures):
        temps = torch.tensor(
            [t if t > 0 else 1.0 for t in temperatures], dtype=torch.float32, device=logits.device
        )  # (rows,)
        scaled = scaled / temps[:, None]
    logp = torch.log_softmax(scaled, dim=-1)  # (rows, vocab) float32
    index = torch.tensor(list(tokens), dtype=torch.long, device=logits.device)  # (rows,)
    chosen = logp.gather(1, index[:, None])[:, 0].cpu().tolist()  # rows floats
    k = min(max(top_n, default=0), vocab)
    top_ids: list[list[int]] = [[] for _ in range(rows)]
    top_values: list[list[float]] = [[] for _ in range(rows)]
    if k > 0:
        values, ids = torch.topk(logp, k, dim=-1)  # (rows, k), (rows, k): most likely first
        top_values, top_ids = values.cpu().tolist(), ids.cpu().tolist()
    entries: list[TokenLogprob] = []
    for row, token in enumerate(tokens):
        n = top_n[row]
        pairs = zip(top_ids[row][:n], top_values[row][:n], strict=True)
        top = tuple(TopLogprob(int(i), float(v)) for i, v in pairs)
        entries.append(TokenLogprob(token_id=int(token), logprob=float(chosen[row]), top=top))
    return entries


def score_positions(
    head: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: Sequence[int],
    top_n: int,
) -> list[TokenLogprob]:
    """Raw-distribution log-probabilities of `targets` at consecutive positions.

    hidden: (positions, hidden) with positions >= len(targets): position i's output predicts
    targets[i]; `head` maps (n, hidden) -> (n, vocab) logits (the LM head, or the identity
    when `hidden` already holds logits).
    """
    out: list[TokenLogprob] = []
    for start in range(0, len(targets), SCORE_SLICE):
        end = min(start + SCORE_SLICE, len(targets))
        logits = head(hidden[start:end])  # (end - start, vocab)
        out.extend(token_logprobs(logits, targets[start:end], [top_n] * (end - start)))
    return out


def prompt_targets(prompt_ids: Sequence[int], start: int, length: int) -> list[int]:
    """The prompt tokens that the outputs at positions start..start+length-1 predict (the next
    token of each, as far as the prompt goes): what prompt_logprobs scores in one chunk."""
    return list(prompt_ids[start + 1 : min(start + length + 1, len(prompt_ids))])


@dataclass(frozen=True)
class PositionScoring:
    """What prompt_logprobs wants from one row of a prefill forward: the log-probability of
    `targets[i]` under the output at the row's i-th fed position (len(targets) <= tokens fed),
    with `top_n` alternatives."""

    targets: tuple[int, ...]
    top_n: int
