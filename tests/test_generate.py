"""generate.sample's filtering against transformers' logits processors on the same logits: the distributions
sampling draws from (not sampled tokens), for temperature, top-k, top-p, min-p and their combinations, and the
repetition penalty."""

from __future__ import annotations

import pytest
import torch

from camelid.errors import CamelidError
from camelid.generate import SamplingParams, apply_repetition_penalty, filter_probs, sample

transformers = pytest.importorskip("transformers")

CASES = [
    dict(temperature=1.0),
    dict(temperature=0.7),
    dict(temperature=1.3, top_k=20),
    dict(temperature=1.0, top_k=1),
    dict(temperature=0.8, top_p=0.9),
    dict(temperature=1.0, top_p=0.5),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=0.6, min_p=0.2),
    dict(temperature=0.9, top_k=50, top_p=0.95),
    dict(temperature=1.1, top_p=0.8, min_p=0.1),  # top-p before min-p, as transformers orders them
    dict(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05),
]


def transformers_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution transformers' sampling draws from: its warpers in the order generate() builds them."""
    warpers = [transformers.TemperatureLogitsWarper(params.temperature)]
    if params.top_k > 0:
        warpers.append(transformers.TopKLogitsWarper(top_k=params.top_k))
    if params.top_p < 1.0:
        warpers.append(transformers.TopPLogitsWarper(top_p=params.top_p))
    if params.min_p > 0:
        warpers.append(transformers.MinPLogitsWarper(min_p=params.min_p))
    scores = logits.clone()
    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    for w in warpers:
        scores = w(ids, scores)
    return torch.softmax(scores, dim=-1)


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("spread", [1.0, 4.0])
def test_filtered_distribution_matches_transformers(case: dict, spread: float) -> None:
    g = torch.Generator().manual_seed(int(spread * 10) + len(case))
    logits = spread * torch.randn(6, 500, generator=g)
    params = SamplingParams(**case)
    ours, theirs = filter_probs(logits, params), transformers_probs(logits, params)
    assert torch.equal(ours > 0, theirs > 0)  # the same tokens kept
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_sampling_draws_from_the_filtered_distribution() -> None:
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(1, 40, generator=g)
    params = SamplingParams(temperature=0.9, top_k=10, top_p=0.9)
    probs = filter_probs(logits, params)[0]
    draws = sample(logits.expand(20000, -1), params, torch.Generator().manual_seed(1))
    counts = torch.bincount(draws, minlength=40).float() / 20000
    assert set(draws.tolist()) <= set(probs.nonzero().flatten().tolist())  # never a filtered token
    assert (counts - probs).abs().max() < 0.02  # 20000 draws: frequencies within 2 points of the probabilities


def test_greedy_is_the_argmax() -> None:
    logits = torch.randn(3, 50)
    assert torch.equal(sample(logits, SamplingParams()), logits.argmax(-1))


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_matches_transformers(penalty: float) -> None:
    g = torch.Generator().manual_seed(2)
    logits = 3 * torch.randn(2, 100, generator=g)
    seen = torch.tensor([[5, 17, 17, 99, 0], [3, 3, 42, 7, 8]])  # prompt and generated ids, repeats included
    want = transformers.RepetitionPenaltyLogitsProcessor(penalty)(seen, logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, seen, penalty), want)


def test_bad_sampling_parameters_are_clear_errors() -> None:
    for bad, message in [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"min_p": 1}, "min_p"),
                         ({"top_k": -2}, "top_k"), ({"repetition_penalty": 0}, "repetition_penalty")]:
        with pytest.raises(CamelidError, match=message):
            SamplingParams(**bad)
