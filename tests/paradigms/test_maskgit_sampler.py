"""MaskGIT's schedules and parallel decoder: values at known points, step counts, marginals, guidance."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chi2
from torch import nn

from visgen.paradigms.maskgit_sampler import (
    SCHEDULES,
    MaskGITSampler,
    confidence_reveal,
    halton_order,
    mask_rate,
    random_mask,
    reveal_counts,
)


# ----- schedules ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("schedule", "at_half"), [("arccos", 2 / 3), ("cosine", math.sqrt(0.5)), ("linear", 0.5),
                                                   ("root", 1 - math.sqrt(0.5)), ("square", 0.75)])
def test_mask_rate_is_one_at_the_start_zero_at_the_end_and_known_in_between(schedule, at_half):
    t = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(mask_rate(t, schedule), torch.tensor([1.0, at_half, 0.0]), atol=1e-6)
    grid = torch.linspace(0, 1, 101)
    assert (mask_rate(grid, schedule).diff() <= 1e-7).all()  # never increases


def test_unknown_schedule_is_refused_by_name():
    with pytest.raises(ValueError, match="'cosinus'.*arccos, cosine"):
        mask_rate(torch.tensor(0.5), "cosinus")


def test_training_mask_rate_follows_the_drawn_r_per_sample():
    codes = torch.zeros(4, 64, 64, dtype=torch.long)
    r = torch.tensor([0.0, 0.5, 0.9, 1.0])
    mask = random_mask(codes, "cosine", torch.Generator().manual_seed(0), rate_draws=r)
    fractions = mask.float().mean(dim=(1, 2))
    expected = torch.cos(r * math.pi / 2)  # 1, 0.707, 0.156, 0
    assert torch.allclose(fractions, expected, atol=0.02)
    assert fractions[0] == 1.0 and fractions[3] == 0.0


# ----- tokens revealed per step ---------------------------------------------------------------------------------
def test_v1_spacing_reproduces_the_reproductions_step_sizes():
    # valeoai v1 adap_sche(8, "arccos") on 16x16 codes, and at 512 px (32x32, 15 steps), values of the official code.
    assert reveal_counts(8, 256, "arccos", "v1").tolist() == [1, 18, 26, 32, 38, 43, 48, 50]
    assert reveal_counts(4, 256, "arccos", "cumulative").tolist() == [41, 44, 53, 118]  # Halton-MaskGIT's rule


@pytest.mark.parametrize("spacing", ["v1", "cumulative"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_steps_add_up_to_the_sequence_and_each_reveals_a_token(schedule, spacing):
    for seq_len in (16, 64, 256):
        for steps in sorted({*range(1, 17), seq_len - 1, seq_len}):
            counts = reveal_counts(steps, seq_len, schedule, spacing)
            assert len(counts) == steps and int(counts.sum()) == seq_len and int(counts.min()) >= 1, (steps, counts)


def test_v1_rule_alone_would_leave_steps_empty_where_visgen_repairs_them():
    # The raw v1 rule (round, raise zeros to 1, put the rest on the last step) at K=100 on 16x16 codes:
    weights = mask_rate(torch.linspace(1, 0, 100), "arccos")
    raw = (weights / weights.sum() * 256).round()
    raw[raw == 0] = 1
    raw[-1] += 256 - raw.sum()
    assert raw[-1] < 1  # the broken variant: its last step reveals a negative number of tokens
    counts = reveal_counts(100, 256, "arccos", "v1")
    assert int(counts.sum()) == 256 and int(counts.min()) == 1


def test_more_steps_than_tokens_is_refused():
    with pytest.raises(ValueError, match="num_steps=17 must be between 1 and the 16 tokens"):
        reveal_counts(17, 16)


def test_halton_order_visits_every_position_once_spread_over_the_grid():
    order = halton_order(16)
    assert sorted(order.tolist()) == list(range(256))
    first = order[:16]  # the first 16 positions (where a raster order fills one row) spread over every row
    assert len(set((first // 16).tolist())) == 16 and len(set((first % 16).tolist())) >= 14
    assert order[:4].tolist() == [8 * 16 + 5, 4 * 16 + 10, 12 * 16 + 1, 2 * 16 + 7]  # (1/2, 1/3), (1/4, 2/3), ...


def test_confidence_reveal_picks_the_most_confident_masked_positions():
    masked = torch.tensor([[True, True, False, True, True]])
    log_conf = torch.tensor([[-1.0, -0.1, 0.0, -3.0, -0.5]])  # position 2 is known: never chosen again
    chosen = confidence_reveal(masked, log_conf, torch.zeros_like(log_conf), 0.0, 2)
    assert chosen.tolist() == [[False, True, False, False, True]]
    noise = torch.tensor([[0.0, 0.0, 0.0, 10.0, 0.0]])  # Gumbel noise can promote an unconfident position
    assert confidence_reveal(masked, log_conf, noise, 1.0, 1).tolist() == [[False, False, False, True, False]]


# ----- the decoder on a known factorised target ------------------------------------------------------------------
class FixedLogits(nn.Module):
    """A 'net' whose prediction is the same factorised categorical whatever the input: (N, V) logits per class."""

    def __init__(self, logits: torch.Tensor, num_classes: int = 1):
        super().__init__()
        self.register_buffer("table", logits)  # (C+1, N, V): per class, the null class last
        self.codebook_size = logits.shape[-1]
        self.mask_token_id = self.codebook_size
        self.num_classes = num_classes
        self.calls = 0
        self.batch_sizes: list[int] = []

    def forward(self, codes, labels):
        self.calls += 1
        self.batch_sizes.append(codes.shape[0])
        logits = self.table[labels]  # (B, N, V)
        return torch.cat([logits, torch.full_like(logits[..., :1], 50.0)], -1)  # a huge mask logit: must be dropped


def chi_square_p(codes: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value that codes (M, N) are draws of the factorised categorical probs (N, V), summed over positions."""
    counts = torch.zeros_like(probs)
    counts.scatter_add_(1, codes.T, torch.ones(codes.T.shape))  # (N, V)
    expected = probs * codes.shape[0]
    stat = ((counts - expected) ** 2 / expected).sum().item()
    return float(chi2.sf(stat, probs.numel() - probs.shape[0]))


def sample_many(sampler, net, num=3000, shape=(4, 4)):
    labels = torch.zeros(num, dtype=torch.long)
    return sampler(net, labels, shape, generator=torch.Generator().manual_seed(0)).view(num, -1)


TARGET = torch.log_softmax(torch.randn(1, 16, 6, generator=torch.Generator().manual_seed(1)) * 1.5, -1)


@pytest.mark.parametrize("sampler", [
    MaskGITSampler(num_steps=4, order="halton", spacing="cumulative"),
    MaskGITSampler(num_steps=4, gumbel_temperature=1e6),  # confidence scores drowned in noise: a random order
    MaskGITSampler(num_steps=1),
], ids=["halton", "confidence-random-order", "one-step"])
def test_sampler_reproduces_the_marginals_of_a_factorised_target(sampler):
    net = FixedLogits(torch.cat([TARGET, TARGET]))
    assert chi_square_p(sample_many(sampler, net), TARGET[0].exp()) > 1e-3


def test_a_sampler_that_misplaces_codes_fails_the_same_check():
    class OffByOne(MaskGITSampler):  # predictions read one position off: a deliberate indexing bug
        def guided_logits(self, net, codes, labels, step):
            return super().guided_logits(net, codes, labels, step).roll(1, dims=1)

    net = FixedLogits(torch.cat([TARGET, TARGET]))
    assert chi_square_p(sample_many(OffByOne(num_steps=4, order="halton", spacing="cumulative"), net),
                        TARGET[0].exp()) < 1e-6


def test_confidence_order_without_noise_favours_likely_codes():
    # MaskGIT's confidence selection is biased towards each position's mode (its known loss of diversity); the
    # annealed Gumbel noise weakens the bias. The chi-square check sees it: a measurement, not a bug.
    net = FixedLogits(torch.cat([TARGET, TARGET]))
    greedy = sample_many(MaskGITSampler(num_steps=4, gumbel_temperature=0.0), net)
    assert chi_square_p(greedy, TARGET[0].exp()) < 1e-6
    mode_share = (greedy == TARGET[0].argmax(-1)).float().mean()
    assert mode_share > TARGET[0].exp().max(-1).values.mean() + 0.03


def test_temperature_sharpens_the_sampled_distribution():
    net = FixedLogits(torch.cat([TARGET, TARGET]))
    sampler = MaskGITSampler(num_steps=4, order="halton", spacing="cumulative", temperature=0.5)
    assert chi_square_p(sample_many(sampler, net), torch.softmax(TARGET[0] / 0.5, -1)) > 1e-3


# ----- classifier-free guidance ---------------------------------------------------------------------------------
def test_cfg_weight_ramps_linearly_from_zero_v1_or_stays_constant():
    linear = MaskGITSampler(num_steps=8, cfg_scale=3.0, cfg_schedule="linear")
    assert [linear.guidance_weight(k) for k in range(8)] == pytest.approx([3.0 * k / 7 for k in range(8)])
    constant = MaskGITSampler(num_steps=8, cfg_scale=3.0, cfg_schedule="constant")
    assert [constant.guidance_weight(k) for k in range(8)] == [3.0] * 8


def test_guided_logits_are_one_plus_w_cond_minus_w_uncond_from_one_batched_pass():
    cond, uncond = torch.randn(1, 16, 6), torch.randn(1, 16, 6)
    net = FixedLogits(torch.cat([cond, uncond]))  # class 0 and the null class 1
    sampler = MaskGITSampler(num_steps=8, cfg_scale=2.0)
    codes, labels = torch.full((1, 4, 4), 6), torch.zeros(1, dtype=torch.long)
    for step in (1, 3, 7):
        w = 2.0 * step / 7
        out = sampler.guided_logits(net, codes, labels, step)
        assert torch.allclose(out, (1 + w) * cond - w * uncond, atol=1e-6)
    assert net.calls == 3  # conditional and unconditional halves in one forward pass each step


@pytest.mark.parametrize(("cfg_scale", "cfg_schedule", "expected"), [
    (0.0, "linear", [3, 3, 3, 3]),     # guidance off: never a null pass
    (2.0, "linear", [3, 6, 6, 6]),     # v1's ramp: w_0 = 0, so the first step runs the conditional half alone
    (2.0, "constant", [6, 6, 6, 6]),   # Halton-MaskGIT: guided at every step
])
def test_the_null_pass_runs_only_at_steps_with_guidance(cfg_scale, cfg_schedule, expected):
    net = FixedLogits(torch.cat([TARGET, TARGET]))
    MaskGITSampler(num_steps=4, cfg_scale=cfg_scale, cfg_schedule=cfg_schedule)(
        net, torch.zeros(3, dtype=torch.long), (4, 4), generator=torch.Generator().manual_seed(0))
    assert net.batch_sizes == expected


def test_sampler_returns_a_full_grid_of_codes_without_the_mask_token():
    net = FixedLogits(torch.cat([TARGET, TARGET]))
    codes = MaskGITSampler(num_steps=5, cfg_scale=1.0)(net, torch.zeros(8, dtype=torch.long), (4, 4),
                                                        generator=torch.Generator().manual_seed(0))
    assert codes.shape == (8, 4, 4) and codes.dtype == torch.long
    assert int(codes.max()) < 6  # never the mask id, however large its logit


def test_sampling_is_reproducible_from_the_generator():
    net = FixedLogits(torch.cat([TARGET, TARGET]))
    sampler = MaskGITSampler(num_steps=4, order="halton", spacing="cumulative", halton_roll=True)
    draws = [sampler(net, torch.zeros(5, dtype=torch.long), (4, 4), generator=torch.Generator().manual_seed(3))
             for _ in range(2)]
    assert torch.equal(*draws)
