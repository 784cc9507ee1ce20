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

from loraserve.server.engine.device_copy import to_device
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
    return filter_rows(logits[None], [params])[0]


NUCLEUS_CANDIDATES = 1024
"""Top-p looks for its nucleus among each row's most probable tokens first (a top-k, much
cheaper than sorting a 32k-152k vocabulary); only a row whose candidates hold less than top_p
of the mass is sorted whole."""


def filter_rows(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k and top-p, each row with its own parameters, batched.

    logits: (rows, vocab) any float dtype, on any device -> (rows, vocab) float32 with the
    filtered-out tokens at -inf. Every row must be sampled (temperature > 0).
    """
    device = logits.device
    vocab = logits.shape[-1]
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32)  # (rows,)
    out = logits.float() / to_device(temps, device)[:, None]  # (rows, vocab): bounded temperature
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(ks):
        # Each row's k-th largest logit; a tie for the k-th place keeps every tied token.
        top = torch.topk(out, max(ks), dim=-1).values  # (rows, max k)
        k = to_device(torch.tensor(ks), device)  # (rows,)
        kth = top.gather(1, (k - 1).clamp(min=0)[:, None])  # (rows, 1)
        kth = kth.masked_fill((k == 0)[:, None], float("-inf"))
        out = out.masked_fill(out < kth, float("-inf"))
    nucleus = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if nucleus:
        every = len(nucleus) == len(params)
        rows = None if every else to_device(torch.tensor(nucleus), device)  # (n,)
        sub = out if rows is None else out[rows]  # (n, vocab)
        top_p = to_device(torch.tensor([params[i].top_p for i in nucleus]), device)  # (n,)
        kept = _nucleus(sub, top_p)  # (n, vocab) bool
        if rows is None:
            out = out.masked_fill(~kept, float("-inf"))
        else:
            out[rows] = sub.masked_fill(~kept, float("-inf"))
    return out


def _nucleus(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Which tokens top-p keeps: the most probable ones until the tokens ranked above reach
    top_p (the first always stays). logits: (n, vocab) float32; top_p: (n,) -> (n, vocab)."""
    probs = torch.softmax(logits, dim=-1)  # (n, vocab)
    candidates = min(NUCLEUS_CANDIDATES, logits.shape[-1])
    cand_probs, cand_index = torch.topk(probs, candidates, dim=-1)  # (n, c) descending
    keep_sorted = (cand_probs.cumsum(-1) - cand_probs) < top_p[:, None]  # (n, c)
    kept = torch.zeros_like(probs, dtype=torch.bool).scatter(1, cand_index, keep_sorted)
    # A row whose candidates hold less than top_p keeps tokens beyond them: sort it whole.
    short = (cand_probs.sum(-1) < top_p).nonzero().flatten().tolist()
    if short:
        sorted_probs, order = torch.sort(probs[short], dim=-1, descending=True)  # (s, vocab)
        keep_all = (sorted_probs.cumsum(-1) - sorted_probs) < top_p[short, None]
        kept[short] = torch.zeros_like(keep_all).scatter(1, order, keep_all)
    return kept


_NOT_FINITE = -1
_NOTHING_LEFT = -2
"""Token codes of rows that could not be sampled (tokens are >= 0)."""


def _draw(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> torch.Tensor:
    """One token per sampled row, or a negative fault code. logits: (rows, vocab) -> (rows,).

    Inverse-CDF sampling: one uniform per row from the row's own generator (on the host, so a
    seeded request draws the same sequence whatever shares its batch), the search batched on
    the logits' device. The target scales with the row's own CDF total, so rounding in the
    cumulative sum moves no token's chance by more than float32 rounding.
    """
    device = logits.device
    raw = logits.float()  # (rows, vocab)
    bad = ~(raw < float("inf")).all(-1)  # (rows,): a NaN or +Inf logit (NaN < inf is False)
    filtered = filter_rows(raw, params)  # (rows, vocab) float32
    empty = (filtered == float("-inf")).all(-1)  # (rows,): every token filtered out
    probs = torch.softmax(filtered, dim=-1)  # (rows, vocab): exp(x - max) <= 1, cannot overflow
    bad |= ~(probs >= 0).all(-1) & ~empty  # NaN: a logit overflowed at this temperature
    cdf = probs.cumsum(dim=-1)  # (rows, vocab) non-decreasing
    total = cdf[:, -1:].contiguous()  # (rows, 1)
    uniform = torch.cat([torch.rand(1, generator=g) for g in generators])  # (rows,) float32
    target = to_device(uniform, device)[:, None] * total  # (rows, 1), below each row's total
    # right=True: the first token whose cumulative mass exceeds the target has mass itself.
    token = torch.searchsorted(cdf, target, right=True)  # (rows, 1)
    # Rounding can put the target at the total: then the last token with mass, the first
    # whose cumulative mass reaches the total.
    last = torch.searchsorted(cdf, total, right=False)  # (rows, 1)
    token = torch.minimum(token, last)[:, 0]  # (rows,)
    token = token.masked_fill(empty, _NOTHING_LEFT)
    return token.masked_fill(bad, _NOT_FINITE)


def select_next_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int | SamplingFault]:
    """Picks each row's next token, or the SamplingFault of a row that could not be sampled.

    logits: (batch, vocab) in any float dtype. Greedy rows take the argmax; the sampled rows
    are filtered and drawn together, and the whole step reads back one tensor (one device
    sync), however many rows sample.
    """
    return read_tokens(sample_tokens(logits, params, generators).tolist())


def sample_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """select_next_tokens without reading the result back: (batch,) int64 on the logits'
    device, a token per row or a negative fault code (see read_tokens). It only queues device
    work (its small inputs go through pinned memory), so a step never waits for the device
    here, except with top-p rows: whether a row's nucleus reaches past its candidates is read
    back."""
    chosen = torch.argmax(logits, dim=-1)  # (batch,)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        rows = to_device(torch.tensor(sampled), logits.device)  # (sampled,)
        drawn = _draw(
            logits[rows],
            [params[i] for i in sampled],
            [_generator(generators[i]) for i in sampled],
        )  # (sampled,)
        chosen = chosen.index_put((rows,), drawn)
    return chosen


def read_tokens(codes: list[int]) -> list[int | SamplingFault]:
    """sample_tokens' result read back (a list of ints): each row's token or SamplingFault."""
    out: list[int | SamplingFault] = []
    for token in codes:
        if token == _NOT_FINITE:
            out.append(SamplingFault("the request's logits are not finite (NaN or +Inf)"))
        elif token == _NOTHING_LEFT:
            out.append(SamplingFault("every token of the request's distribution has probability 0"))
        else:
            out.append(token)
    return out


def _generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        raise ValueError("a sampled row needs its generator (make_generator)")
    return generator
