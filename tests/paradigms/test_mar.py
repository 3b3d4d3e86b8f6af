"""MAR's sampling and training: the DiffLoss sampler on a Gaussian mixture, the CFG and mask schedules, the AR
sampler's bookkeeping, and a few training steps that lower the loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from tests.diffusion.gmm import COVS, MEANS, WEIGHTS, check_gmm_samples
from tests.diffusion.test_gaussian_samplers import vp_mixture_eps
from tests.nn.test_mar import tiny_mar
from visgen.nn.diffloss import DiffLoss
from visgen.paradigms.mar_sampler import MARSampler, cfg_schedule_values, mask_schedule

NUM_POINTS = 20_000



@pytest.fixture(autouse=True)
def _single_thread():
    """One intra-op thread: the tensors are tiny and the shared CPUs make extra threads slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cosine_alphas_cumprod(steps: int = 1000) -> Tensor:
    """ᾱ of improved DDPM's cosine schedule (s = 0.008, β ≤ 0.999), written out independently of gaussian.py."""
    f = [math.cos((i / steps + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(steps + 1)]
    betas = np.minimum(1 - np.array(f[1:]) / np.array(f[:-1]), 0.999)
    return torch.from_numpy(np.cumprod(1 - betas))  # (T,)


class ExactMixtureHead(nn.Module):
    """The mixture's exact ε at the original step t, with Σ channels −1 (Σ = β̃, the true posterior's variance)."""

    def __init__(self) -> None:
        super().__init__()
        self.alphas_cumprod = cosine_alphas_cumprod()

    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        """(N, 2) points, t (N,), c (N, Z) -> (N, 4)."""
        eps = vp_mixture_eps(x, float(self.alphas_cumprod[int(t[0])]))  # (N, 2)
        return torch.cat([eps, -torch.ones_like(eps)], dim=1)  # (N, 4)


def diffloss_samples(temperature: float, steps: int = 250) -> Tensor:
    loss = DiffLoss(target_channels=2, z_channels=1, depth=1, width=8, num_sampling_steps=steps)
    loss.net = ExactMixtureHead()
    z = torch.zeros(NUM_POINTS, 1, dtype=torch.float64)
    return loss.sample(z, temperature, generator=torch.Generator().manual_seed(0))  # (N, 2)


def test_diffloss_sampler_reproduces_a_gaussian_mixture() -> None:
    # 250 respaced steps, as the DDPM test; at MAR's 100 this mixture (modes 10 stds apart, not unit variance)
    # shows a discretisation bias at the check's edge: covariance error 0.0502 for component 1 (measured).
    ok, reason = check_gmm_samples(diffloss_samples(1.0), WEIGHTS, MEANS, COVS)
    assert ok, reason


def test_a_low_temperature_fails_the_mixture_check() -> None:
    ok, reason = check_gmm_samples(diffloss_samples(0.5), WEIGHTS, MEANS, COVS)
    assert not ok and "cov" in reason


class BiasedEpsHead(torch.nn.Module):
    """An imperfect DiffLoss head: ε̂ off by 0.1 everywhere, Σ = β̃."""

    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        return torch.cat([torch.full_like(x, 0.1), -torch.ones_like(x)], dim=1)  # (N, 2D)


def test_clip_denoised_keeps_pixel_tokens_in_range_and_the_unclipped_chain_leaves_it() -> None:
    # demo_mar's pixel tokens: at t near T an ε error is amplified by 1/sqrt(alpha_bar) in x̂_0; clamping x̂_0 to
    # [-1, 1] (ADM's pixel sampling) ends the chain on x̂_0 itself. Unclipped (MAR's setting for KL latents) it leaves.
    loss = DiffLoss(target_channels=48, z_channels=1, depth=1, width=8, num_sampling_steps=50)
    loss.net = BiasedEpsHead()
    z = torch.zeros(64, 1)
    clipped = loss.sample(z, 1.0, generator=torch.Generator().manual_seed(0), clip_denoised=True)  # (64, 48)
    raw = loss.sample(z, 1.0, generator=torch.Generator().manual_seed(0))  # (64, 48)
    assert clipped.abs().max() <= 1.0 + 1e-5
    assert raw.abs().max() > 10.0


def test_diffloss_cfg_mixes_eps_on_all_channels_and_takes_sigma_from_the_conditional_rows() -> None:
    loss = DiffLoss(target_channels=3, z_channels=2, depth=1, width=8)
    torch.nn.init.normal_(loss.net.final_layer.linear.weight)
    x, t = torch.randn(4, 3), torch.full((4,), 500)
    z = torch.randn(8, 2)
    out_c, out_u = loss.net(x, t, z[:4]), loss.net(x, t, z[4:])
    guided = loss.guided_net_output(x, t, z, 3.0)
    assert torch.allclose(guided[:, :3], out_u[:, :3] + 3.0 * (out_c[:, :3] - out_u[:, :3]), atol=1e-5)
    assert torch.allclose(guided[:, 3:], out_c[:, 3:], atol=1e-6)


def test_cfg_linear_schedule_matches_the_official_including_the_last_step() -> None:
    values = cfg_schedule_values(2.9, 256, 64)
    # Step 0 reveals 256 - floor(256 cos(pi/128)) = 1 token; the last step counts n = 1 still unknown (official).
    assert values[0] == pytest.approx(1 + 1.9 * (256 - math.floor(256 * math.cos(math.pi / 128))) / 256)
    assert values[-1] == pytest.approx(1 + 1.9 * 255 / 256)
    assert values[-1] != pytest.approx(2.9)
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))
    assert cfg_schedule_values(2.9, 256, 64, "constant") == [2.9] * 64


def test_mask_schedule_reveals_at_least_one_token_per_step_and_everything_at_the_end() -> None:
    for num_iter in (1, 4, 64, 256):  # more steps than tokens stall at 1 (official too)
        remaining = mask_schedule(256, num_iter)
        assert remaining[-1] == 0
        steps = [256, *remaining]
        assert all(a > b for a, b in zip(steps, steps[1:], strict=False))
    assert mask_schedule(256, 64)[:3] == [255, 254, 253]  # min(remaining - 1, floor(256 cos(pi/2 (k+1)/64)))


def test_sampler_reveals_by_the_schedule_and_shares_state_between_cfg_halves() -> None:
    torch.manual_seed(0)
    net = tiny_mar().eval()
    calls: list[tuple[int, float]] = []
    clips: list[bool] = []
    original = net.diffloss.sample

    def spy(z: Tensor, temperature: float, cfg: float, generator, num_steps, clip_denoised: bool) -> Tensor:
        calls.append((z.shape[0], cfg))
        clips.append(clip_denoised)
        return original(z, temperature, cfg, generator, num_steps, clip_denoised=clip_denoised)

    net.diffloss.sample = spy
    labels = torch.tensor([1, 2, 3])
    out = MARSampler(num_iter=4, cfg_scale=3.0)(net, labels, (3, 4, 4), torch.Generator().manual_seed(0))
    assert out.shape == (3, 3, 4, 4) and bool(torch.isfinite(out).all())
    revealed = [16 - n for n in [16, *mask_schedule(16, 4)]]
    per_step = [b - a for a, b in zip(revealed, revealed[1:], strict=False)]
    assert [c[0] for c in calls] == [2 * 3 * k for k in per_step]  # conditional and unconditional rows
    assert [c[1] for c in calls] == pytest.approx(cfg_schedule_values(3.0, 16, 4))
    assert clips == [False] * 4  # MAR's default; sampling.clip_denoised=true reaches DiffLoss
    MARSampler(num_iter=2, clip_denoised=True)(net, labels, (3, 4, 4), torch.Generator().manual_seed(0))
    assert clips[-2:] == [True, True]
    # Same generator, same samples; another seed, other samples.
    again = MARSampler(num_iter=4, cfg_scale=3.0)(net, labels, (3, 4, 4), torch.Generator().manual_seed(0))
    other = MARSampler(num_iter=4, cfg_scale=3.0)(net, labels, (3, 4, 4), torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and not torch.allclose(out, other)


def test_sampler_refuses_a_wrong_latent_shape_and_bad_settings() -> None:
    net = tiny_mar().eval()
    with pytest.raises(ValueError, match="in_channels"):
        MARSampler(num_iter=2)(net, torch.tensor([0]), (4, 4, 4))
    with pytest.raises(ValueError, match="cfg_schedule"):
        MARSampler(cfg_schedule="cosine")
    with pytest.raises(ValueError, match="labels must lie"):
        MARSampler(num_iter=2)(net, torch.tensor([11]), (3, 4, 4))


def test_a_few_training_steps_on_the_digits_lower_the_loss() -> None:
    """Adam on 16 built-in digits (4x4 pixel patches as tokens, as demo_mar): the masked-token loss falls."""
    from visgen.data.builtin import load_mnist_digits, pad_to_rgb32
    from visgen.paradigms.mar import MARModule

    torch.manual_seed(0)
    images, labels = load_mnist_digits()
    pixels = torch.from_numpy(pad_to_rgb32(images[:16])).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (16, 3, 32, 32)
    net = tiny_mar(input_size=32, patch_size=4, attn_dropout=0.0, proj_dropout=0.0)  # 64 tokens of 48
    module = MARModule.__new__(MARModule)  # only `loss` and `drop_labels` are exercised
    nn.Module.__init__(module)
    module.label_drop_prob = 0.1
    batch = {"latents": pixels, "labels": torch.from_numpy(labels[:16])}
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def evaluate() -> float:
        with torch.no_grad():
            return float(module.loss(net, batch, torch.Generator().manual_seed(123)).mean())

    before = evaluate()
    for step in range(30):
        opt.zero_grad()
        module.loss(net, batch, torch.Generator().manual_seed(step)).mean().backward()
        opt.step()
    after = evaluate()
    assert after < 0.6 * before, (before, after)
