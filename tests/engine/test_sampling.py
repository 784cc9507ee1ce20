"""Unit tests for server.engine.sampling: greedy, temperature, top-k, top-p and seeded draws.

Logits are built from known probabilities (log p), so the expected nucleus is known exactly.
Seeded rows must draw the same tokens whatever else shares their batch.
"""

from __future__ import annotations

import math

import pytest
import torch

from loraserve.server.engine.sampling import (
    SamplingFault,
    filter_logits,
    filter_rows,
    make_generator,
    select_next_tokens,
)
from loraserve.server.engine.types import SamplingParams

GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=1.0)


def _logits_for(probs: list[float]) -> torch.Tensor:
    """(vocab,) float32 logits whose softmax is `probs`."""
    return torch.tensor([math.log(p) for p in probs], dtype=torch.float32)


def _kept(logits: torch.Tensor) -> set[int]:
    return {i for i, v in enumerate(logits.tolist()) if v != float("-inf")}


def test_make_generator_only_for_sampled_rows() -> None:
    assert make_generator(GREEDY) is None
    assert make_generator(SamplingParams(seed=5)) is None  # a seed does not make a row sampled
    unseeded = [make_generator(SAMPLED) for _ in range(3)]
    assert all(isinstance(g, torch.Generator) for g in unseeded)
    seeds = {g.initial_seed() for g in unseeded if g is not None}
    assert len(seeds) == 3, "unseeded generators must not share a fixed seed"
    seeded = make_generator(SamplingParams(temperature=0.7, seed=1234))
    assert seeded is not None and seeded.initial_seed() == 1234


def test_greedy_rows_take_argmax() -> None:
    logits = torch.tensor(
        [[0.1, 3.0, -1.0, 2.9], [5.0, 4.0, 4.5, -2.0], [-3.0, -2.0, -1.0, -1.5]],
        dtype=torch.bfloat16,
    )  # (batch, vocab)
    assert select_next_tokens(logits, [GREEDY] * 3, [None] * 3) == [1, 0, 2]


def test_greedy_rows_in_a_mixed_batch_still_take_argmax() -> None:
    logits = torch.tensor([[0.0, 9.0, 1.0], [0.0, 0.0, 0.0], [3.0, 2.0, 1.0]])
    params = [GREEDY, SamplingParams(temperature=1.0, seed=0), GREEDY]
    generators = [make_generator(p) for p in params]
    tokens = select_next_tokens(logits, params, generators)
    assert tokens[0] == 1 and tokens[2] == 0
    assert 0 <= tokens[1] < 3


def test_temperature_scales_logits() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 4.0])
    out = filter_logits(logits, SamplingParams(temperature=0.5))
    torch.testing.assert_close(out, logits * 2.0)
    out = filter_logits(logits, SamplingParams(temperature=4.0))
    torch.testing.assert_close(out, logits / 4.0)
    # A low temperature sharpens the distribution, a high one flattens it.
    sharp = torch.softmax(filter_logits(logits, SamplingParams(temperature=0.25)), -1)
    flat = torch.softmax(filter_logits(logits, SamplingParams(temperature=10.0)), -1)
    assert sharp.max() > torch.softmax(logits, -1).max() > flat.max()


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_top_k_keeps_exactly_k_tokens(k: int) -> None:
    logits = torch.tensor([0.3, 2.0, -1.0, 1.5, 0.9, -0.2, 3.1])
    out = filter_logits(logits, SamplingParams(temperature=1.0, top_k=k))
    expected = set(torch.topk(logits, k).indices.tolist())
    assert _kept(out) == expected
    for i in expected:
        assert out[i] == logits[i], "kept logits must be unchanged"


@pytest.mark.parametrize("k", [0, 7, 100])
def test_top_k_zero_or_at_least_vocab_keeps_everything(k: int) -> None:
    logits = torch.tensor([0.3, 2.0, -1.0, 1.5, 0.9, -0.2, 3.1])
    out = filter_logits(logits, SamplingParams(temperature=1.0, top_k=k))
    torch.testing.assert_close(out, logits)


def test_top_k_keeps_ties_at_the_boundary() -> None:
    logits = torch.tensor([1.0, 2.0, 2.0, 0.0])
    out = filter_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert _kept(out) == {1, 2}
    out = filter_logits(
        torch.tensor([3.0, 2.0, 2.0, 0.0]), SamplingParams(temperature=1.0, top_k=2)
    )
    assert _kept(out) == {0, 1, 2}  # a tie for the k-th place keeps both


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [
        (0.3, {2}),  # the top token alone (0.5) already covers 0.3
        (0.49, {2}),
        (0.6, {2, 0}),  # 0.5 < 0.6 <= 0.75
        (0.74, {2, 0}),
        (0.8, {2, 0, 3}),  # 0.75 < 0.8 <= 0.875
        (0.9, {2, 0, 3, 1}),  # 0.875 < 0.9 <= 0.953125
        (0.96, {2, 0, 3, 1, 4}),
        (1.0, {2, 0, 3, 1, 4}),
    ],
)
def test_top_p_keeps_the_smallest_nucleus(top_p: float, expected: set[int]) -> None:
    # Sorted: token 2 (32/64), 0 (16/64), 3 (8/64), 1 (5/64), 4 (3/64); all exact in binary.
    probs = [16 / 64, 5 / 64, 32 / 64, 8 / 64, 3 / 64]
    logits = _logits_for(probs)
    out = filter_logits(logits, SamplingParams(temperature=1.0, top_p=top_p))
    assert _kept(out) == expected
    for i in expected:
        assert out[i] == logits[i], "kept logits must be unchanged"


def test_top_p_after_top_k_and_temperature() -> None:
    probs = [0.4, 0.3, 0.2, 0.1]
    logits = _logits_for(probs)
    # top_k=3 removes token 3; renormalized: 0.444, 0.333, 0.222 -> top_p 0.7 keeps {0, 1}.
    out = filter_logits(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.7))
    assert _kept(out) == {0, 1}
    # At temperature 0.1 token 0 carries almost all mass: top_p 0.9 keeps only it.
    out = filter_logits(logits, SamplingParams(temperature=0.1, top_p=0.9))
    assert _kept(out) == {0}


def test_sampling_only_draws_from_the_filtered_set() -> None:
    logits = torch.tensor([[2.0, 1.9, 1.8, -5.0, 1.7]])  # (1, vocab)
    params = [SamplingParams(temperature=1.0, top_k=2, seed=3)]
    generators = [make_generator(params[0])]
    drawn = {select_next_tokens(logits, params, generators)[0] for _ in range(200)}
    assert drawn == {0, 1}


def test_sampled_draws_follow_the_probabilities() -> None:
    logits = _logits_for([0.7, 0.2, 0.1])[None, :]  # (1, vocab)
    params = [SamplingParams(temperature=1.0, seed=11)]
    generators = [make_generator(params[0])]
    counts = [0, 0, 0]
    for _ in range(2000):
        counts[select_next_tokens(logits, params, generators)[0]] += 1
    assert abs(counts[0] / 2000 - 0.7) < 0.05
    assert abs(counts[1] / 2000 - 0.2) < 0.05
    assert abs(counts[2] / 2000 - 0.1) < 0.05


def _draw_sequence(
    rows: list[tuple[SamplingParams, int]], target: int, steps: int, vocab: int = 50
) -> list[int]:
    """Draws `steps` tokens for every (params, logits id) row; returns row `target`'s tokens.

    Each row's logits at each step depend only on (its logits id, step), as they would for the
    same request in any batch.
    """
    params = [p for p, _ in rows]
    generators = [make_generator(p) for p in params]
    out: list[int] = []
    for step in range(steps):
        batch = [
            torch.randn(vocab, generator=torch.Generator().manual_seed(1000 * step + logits_id))
            for _, logits_id in rows
        ]
        logits = torch.stack(batch)  # (batch, vocab)
        out.append(select_next_tokens(logits, params, generators)[target])
    return out


def test_seeded_row_is_reproducible_and_independent_of_batch_composition() -> None:
    mine = (SamplingParams(temperature=1.3, top_p=0.95, top_k=20, seed=42), 0)
    alone = _draw_sequence([mine], target=0, steps=12)
    assert _draw_sequence([mine], target=0, steps=12) == alone
    neighbours = [
        (SamplingParams(temperature=0.8, seed=7), 1),
        (GREEDY, 2),
        (SamplingParams(temperature=2.0), 3),  # unseeded
        (SamplingParams(temperature=1.0, top_k=3, seed=42), 4),  # same seed, other logits
    ]
    for position in range(len(neighbours) + 1):
        rows = [*neighbours[:position], mine, *neighbours[position:]]
        assert _draw_sequence(rows, target=position, steps=12) == alone, position
    # The draws really are random: another seed on the same logits gives another sequence.
    other = (SamplingParams(temperature=1.3, top_p=0.95, top_k=20, seed=43), 0)
    assert _draw_sequence([other], target=0, steps=12) != alone


def test_batched_filtering_gives_each_row_exactly_its_own_filter() -> None:
    """filter_rows over a batch of mixed parameters equals filtering each row alone."""
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0)) * 3  # (rows, vocab)
    params = [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.0, top_k=5),
        SamplingParams(temperature=1.5, top_p=0.8),
        SamplingParams(temperature=0.3, top_k=40, top_p=0.5),
        SamplingParams(temperature=2.0, top_k=300, top_p=1.0),  # k = vocab: no top-k
    ]
    batched = filter_rows(logits, params)  # (rows, vocab)
    for row, p in enumerate(params):
        alone = filter_logits(logits[row], p)
        assert _kept(batched[row]) == _kept(alone), row
        torch.testing.assert_close(batched[row], alone, rtol=0, atol=0)
    assert len(_kept(batched[1])) == 5 and len(_kept(batched[4])) == 300


def test_a_row_that_cannot_be_sampled_fails_alone_in_a_batch() -> None:
    vocab = 8
    logits = torch.zeros(4, vocab)  # (batch, vocab)
    logits[0, 3] = float("nan")
    logits[1] = float("-inf")  # every token has probability 0
    logits[2, 5] = 4.0
    logits[3, 6] = 50.0
    params = [SamplingParams(temperature=1.0, seed=i) for i in range(3)] + [GREEDY]
    generators = [make_generator(p) for p in params]
    out = select_next_tokens(logits, params, generators)
    assert isinstance(out[0], SamplingFault) and "not finite" in str(out[0])
    assert isinstance(out[1], SamplingFault) and "probability 0" in str(out[1])
    assert isinstance(out[2], int) and 0 <= out[2] < vocab
    assert out[3] == 6


def test_draws_over_a_large_vocabulary_follow_the_nucleus() -> None:
    """32k tokens, most of the mass on four: draws stay in the nucleus, in proportion."""
    vocab = 32_000
    logits = torch.full((1, vocab), -20.0)  # (1, vocab)
    logits[0, [10, 20_000, 31_999, 7]] = torch.tensor([6.0, 5.0, 4.0, 3.0])
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=5)]
    kept = _kept(filter_logits(logits[0], params[0]))
    assert kept == {10, 20_000, 31_999}  # 0.64 + 0.24 < 0.9; with 0.09 more the rest is cut
    probs = torch.softmax(filter_logits(logits[0], params[0]), -1)
    # 250 rows of the same logits, each with its own seed, drawn 8 times: 2000 draws.
    rows = [SamplingParams(temperature=1.0, top_p=0.9, seed=seed) for seed in range(250)]
    generators = [make_generator(p) for p in rows]
    counts: dict[int, int] = {}
    for _ in range(8):
        for token in select_next_tokens(logits.expand(len(rows), vocab), rows, generators):
            assert isinstance(token, int)
            counts[token] = counts.get(token, 0) + 1
    assert set(counts) <= kept
    for token, n in counts.items():
        assert abs(n / 2000 - float(probs[token])) < 0.04, (token, n, float(probs[token]))
