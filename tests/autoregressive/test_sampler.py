"""The KV-cache AR sampler: guided logits before filtering, the same code fed to both halves, intervals."""

import math

import pytest
import torch
from scipy.stats import chisquare

from visgen.autoregressive.sampler import ARSampler
from visgen.nn.llama import KVCache

COND = torch.tensor([1.0, 0.5, 0.0, -0.5])
UNCOND = torch.tensor([0.0, 0.8, 0.4, 0.2])


class FixedLogitsNet(torch.nn.Module):
    """Returns COND for labelled rows and UNCOND for null-class rows at every position; records its inputs."""

    grid_size, num_classes = 2, 3

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.fed: list[torch.Tensor] = []

    def new_cache(self, batch_size, dtype, device):
        return KVCache(1, batch_size, 1, 2, 8, dtype, device)

    def _logits(self, null: torch.Tensor) -> torch.Tensor:
        return torch.where(null[:, None], UNCOND, COND)  # (B, V)

    def prefill(self, labels, cache):
        self.null = labels == self.num_classes
        return self._logits(self.null)

    def decode(self, codes, input_pos, cache):
        self.fed.append(codes.clone())
        return self._logits(self.null)


def softmax(x: torch.Tensor) -> list[float]:
    weights = [math.exp(v) for v in x.tolist()]
    return [w / sum(weights) for w in weights]


def test_guided_codes_follow_softmax_of_u_plus_s_times_c_minus_u():
    net, n = FixedLogitsNet(), 5000
    sampler = ARSampler(cfg_scale=3.0)
    codes = sampler(net, torch.zeros(n, dtype=torch.long), (2, 2), torch.Generator().manual_seed(0))
    assert codes.shape == (n, 2, 2) and codes.dtype == torch.long
    expected = softmax(UNCOND + 3.0 * (COND - UNCOND))
    for position in range(4):
        counts = torch.bincount(codes.flatten(1)[:, position], minlength=4).tolist()
        assert chisquare(counts, [p * n for p in expected]).pvalue > 1e-3
    # Unguided logits (the broken variant: guidance forgotten) fail the same check.
    counts = torch.bincount(codes.flatten(1)[:, 0], minlength=4).tolist()
    assert chisquare(counts, [p * n for p in softmax(COND)]).pvalue < 1e-6
    for fed in net.fed:  # the code drawn for sample i is fed to its conditional and its null row
        assert torch.equal(fed[:n], fed[n:])


def test_outside_the_guidance_interval_codes_follow_the_conditional_logits():
    net, n = FixedLogitsNet(), 5000
    codes = ARSampler(cfg_scale=3.0, cfg_interval=[0, 2])(net, torch.ones(n, dtype=torch.long), (2, 2),
                                                          torch.Generator().manual_seed(1)).flatten(1)
    guided, plain = softmax(UNCOND + 3.0 * (COND - UNCOND)), softmax(COND)
    for position, probs in [(1, guided), (2, plain), (3, plain)]:
        counts = torch.bincount(codes[:, position], minlength=4).tolist()
        assert chisquare(counts, [p * n for p in probs]).pvalue > 1e-3


def test_scale_one_runs_the_conditional_batch_alone_and_seeds_reproduce():
    net = FixedLogitsNet()
    sampler = ARSampler(cfg_scale=1.0, top_k=2)
    first = sampler(net, torch.zeros(16, dtype=torch.long), (2, 2), torch.Generator().manual_seed(3))
    assert net.fed[0].shape == (16,)  # no null half
    assert set(first.unique().tolist()) <= {0, 1}  # top-2 of COND
    again = sampler(net, torch.zeros(16, dtype=torch.long), (2, 2), torch.Generator().manual_seed(3))
    assert torch.equal(first, again)


def test_a_grid_that_does_not_match_the_net_is_refused():
    with pytest.raises(ValueError, match="grid_size=2"):
        ARSampler()(FixedLogitsNet(), torch.zeros(2, dtype=torch.long), (4, 4))
    with pytest.raises(ValueError, match="cfg_interval"):
        ARSampler(cfg_interval=[5, 2])
