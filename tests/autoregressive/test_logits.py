"""Temperature, top-k and top-p sampling reproduce a known categorical distribution; a wrong filter does not."""

import math

import pytest
import torch
from scipy.stats import chisquare

from visgen.autoregressive.logits import filter_top_k_top_p, guide_logits, sample_from_logits

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
NUM_DRAWS = 20_000


def expected_distribution(logits: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """The target written out: tempered softmax over the top-k, then the smallest prefix reaching top_p."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])[:top_k or len(logits)]
    weights = {i: math.exp(logits[i] / temperature) for i in order}
    total = sum(weights.values())
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += weights[i] / total
        if mass >= top_p:
            break
    norm = sum(weights[i] for i in kept)
    return [weights[i] / norm if i in kept else 0.0 for i in range(len(logits))]


def draw_counts(sample_fn, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    draws = sample_fn(LOGITS.expand(NUM_DRAWS, -1), generator=generator, **kwargs)
    return torch.bincount(draws, minlength=len(LOGITS))


def chi_square_p(counts: torch.Tensor, probs: list[float]) -> float:
    """p-value of counts under probs (categories of probability 0 must be empty: else 0)."""
    support = [i for i, p in enumerate(probs) if p > 0]
    if any(counts[i] for i in range(len(probs)) if probs[i] == 0):
        return 0.0
    return chisquare([int(counts[i]) for i in support], [probs[i] * NUM_DRAWS for i in support]).pvalue


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.8, 6, 0.75), (1.5, 3, 1.0),
                                                             (1.0, 0, 0.5)])
def test_sampling_reproduces_the_filtered_tempered_categorical(temperature, top_k, top_p):
    probs = expected_distribution(LOGITS.tolist(), temperature, top_k, top_p)
    counts = draw_counts(sample_from_logits, temperature=temperature, top_k=top_k, top_p=top_p)
    assert chi_square_p(counts, probs) > 1e-3


def test_a_nucleus_filter_that_drops_the_crossing_token_fails_the_same_check():
    def broken_sample(logits, temperature, top_k, top_p, generator):
        logits = filter_top_k_top_p(logits / temperature, top_k, 1.0)
        sorted_logits, order = torch.sort(logits, descending=True)
        remove = torch.cumsum(sorted_logits.softmax(-1), -1) > top_p  # no shift: the crossing token goes too
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]

    probs = expected_distribution(LOGITS.tolist(), 0.8, 6, 0.75)
    counts = draw_counts(broken_sample, temperature=0.8, top_k=6, top_p=0.75)
    assert chi_square_p(counts, probs) < 1e-6


def test_top_k_keeps_ties_and_top_p_always_keeps_one_token():
    kept = filter_top_k_top_p(torch.tensor([[1.0, 3.0, 3.0, 0.0]]), top_k=1)
    assert torch.isfinite(kept).tolist() == [[False, True, True, False]]
    kept = filter_top_k_top_p(torch.tensor([[5.0, 0.0, 0.0]]), top_p=0.01)
    assert torch.isfinite(kept).tolist() == [[True, False, False]]
    with pytest.raises(ValueError, match="top_p"):
        filter_top_k_top_p(LOGITS[None], top_p=0.0)


def test_guidance_formula_and_greedy_temperature():
    cond, uncond = torch.tensor([1.0, 4.0]), torch.tensor([2.0, 1.0])
    assert guide_logits(cond, uncond, 2.0).tolist() == [0.0, 7.0]  # u + s (c - u)
    assert guide_logits(cond, uncond, 1.0).tolist() == cond.tolist()
    assert sample_from_logits(torch.tensor([[0.0, 3.0, 1.0]]), temperature=0.0).tolist() == [1]
