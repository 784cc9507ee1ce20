"""Next-token selection for a batch whose rows each have their own sampling parameters.

Greedy rows take the argmax; sampled rows apply temperature, top-k and top-p and draw from their
own seeded generator, so a request's completion does not depend on what else shares its batch.
"""

from __future__ import annotations

import torch

from loraserve.server.engine.types import SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A CPU generator for a sampled request (seeded when the request gives a seed)."""
    if params.greedy:
        return None
    generator = torch.Generator(device="cpu")
    if params.seed is not None:
        generator.manual_seed(params.seed)
    else:
        generator.seed()
    return generator


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p on one row. logits: (vocab,) float32 -> (vocab,)."""
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k).values[-1]  # ()
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)  # (vocab,), (vocab,)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)  # (vocab,)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)  # (vocab,)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def select_next_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    """Picks each row's next token. logits: (batch, vocab) in any float dtype."""
    greedy = torch.argmax(logits, dim=-1).tolist()  # (batch,)
    if all(p.greedy for p in params):
        return greedy
    chosen = list(greedy)
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            continue
        row_logits = filter_logits(logits[row].float().cpu(), p)  # (vocab,)
        probs = torch.softmax(row_logits, dim=-1)  # (vocab,)
        chosen[row] = int(torch.multinomial(probs, 1, generator=generator).item())
    return chosen
