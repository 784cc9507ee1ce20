"""Next-token selection for a batch whose rows each have their own sampling parameters.

Greedy rows take the argmax; sampled rows apply temperature, top-k and top-p and draw from their
own seeded generator, so a request's completion does not depend on what else shares its batch.

Sampling is done in float32 on logits already divided by a bounded temperature, through a
max-subtracted softmax, so no finite input can overflow. A row whose logits are NaN or +Inf
anyway (a hostile adapter, a model overflow) gets a SamplingFault of its own: it fails alone and
the other rows of the step keep their tokens.
"""

from __future__ import annotations

import torch

from loraserve.server.engine.types import SamplingParams

MIN_TEMPERATURE = float(torch.tensor(1e-2, dtype=torch.float32))
"""Smallest non-zero temperature: 1e-2 as the float32 the wire carries (0.0099999998), so a
client's 0.01 is accepted. Real models' logits stay well under 1e4 in magnitude, so
logits / temperature stay under 1e6, ~32 orders of magnitude below float32's maximum (3.4e38);
the old lower bound of 0 let 1e-45 (a float32 denormal) turn every logit into +-Inf and the
softmax into NaN. At 1e-2 a logit gap of 0.1 already weighs e^-10, so smaller temperatures are
greedy decoding in all but name: ask for temperature 0 instead."""
MAX_TEMPERATURE = 100.0
"""Largest temperature: beyond it the distribution is uniform to within float32 noise."""
MAX_SEED = (1 << 63) - 1
"""Largest seed: torch seeds are 64-bit, and a uint64 >= 2^63 would wrap onto a smaller seed."""


class SamplingFault(Exception):
    """One row could not be sampled; the request of that row fails, the others go on."""


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
    """Temperature, top-k and top-p on one row. logits: (vocab,) float32 -> (vocab,) float32."""
    logits = logits.float() / params.temperature  # (vocab,) float32: bounded temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k).values[-1]  # ()
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)  # (vocab,), (vocab,)
        probs_sorted = torch.softmax(sorted_logits, dim=-1)  # (vocab,)
        cumulative = probs_sorted.cumsum(dim=-1)  # (vocab,)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        drop_sorted = (cumulative - probs_sorted) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)  # (vocab,)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _check_finite(logits: torch.Tensor) -> None:
    """Refuses a row that softmax would turn into NaN. logits: (vocab,) float32.

    -Inf is allowed (filtered tokens); NaN, +Inf or no finite entry at all is a fault.
    """
    if bool(torch.isnan(logits).any()) or bool(torch.isposinf(logits).any()):
        raise SamplingFault("the request's logits are not finite (NaN or +Inf)")
    if not bool(torch.isfinite(logits).any()):
        raise SamplingFault("every token of the request's distribution has probability 0")


def sample_row(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    """One sampled token. logits: (vocab,) any float dtype, on any device."""
    row = logits.float().cpu()  # (vocab,) float32
    _check_finite(row)
    filtered = filter_logits(row, params)  # (vocab,) float32
    _check_finite(filtered)
    probs = torch.softmax(filtered, dim=-1)  # (vocab,): exp(x - max) <= 1, cannot overflow
    return int(torch.multinomial(probs, 1, generator=generator).item())


def select_next_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int | SamplingFault]:
    """Picks each row's next token, or the SamplingFault of a row that could not be sampled.

    logits: (batch, vocab) in any float dtype.
    """
    greedy = torch.argmax(logits, dim=-1).tolist()  # (batch,)
    if all(p.greedy for p in params):
        return greedy
    chosen: list[int | SamplingFault] = list(greedy)
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            continue
        try:
            chosen[row] = sample_row(logits[row], p, generator)
        except SamplingFault as fault:
            chosen[row] = fault
        except RuntimeError as exc:
            # Whatever else torch refuses for this row's values stays this row's problem.
            chosen[row] = SamplingFault(f"sampling failed: {str(exc)[:200]}")
    return chosen
