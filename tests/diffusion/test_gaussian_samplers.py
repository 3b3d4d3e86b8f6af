"""Tests for the DDPM and DDIM samplers: exact Gaussian-mixture ε, broken samplers, CFG wiring, arguments."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from torch import Tensor

from tests.diffusion.test_samplers import COVS, MEANS, NUM_SAMPLES, WEIGHTS, check_gmm_samples
from visgen.diffusion.gaussian import GaussianDiffusion
from visgen.diffusion.gaussian_samplers import DDIMSampler, DDPMSampler

# ᾱ of DDPM's linear schedule (1e-4 → 0.02 over 1000 steps), written out independently of gaussian.py.
ALPHAS_CUMPROD = torch.from_numpy(np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64)))  # (1000,)


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    """Run on one intra-op thread: the tensors are tiny and shared CPUs make extra threads slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def vp_mixture_eps(x: Tensor, alpha_bar: float) -> Tensor:
    """Exact E[ε | x_t = x] = −√(1 − ᾱ) ∇log p_t(x) for the mixture under x_t = √ᾱ x_0 + √(1 − ᾱ) ε.

    x_t | k ~ N(√ᾱ μ_k, S_k) with S_k = ᾱ Σ_k + (1 − ᾱ) I, so ∇log p_t(x) = Σ_k r_k(x) S_k⁻¹ (√ᾱ μ_k − x) with
    responsibilities r_k ∝ π_k N(x; √ᾱ μ_k, S_k). Components lead (K, B), as in test_samplers.py.
    """
    eye = torch.eye(2, dtype=x.dtype)  # (2, 2)
    cov = alpha_bar * COVS + (1.0 - alpha_bar) * eye  # (K, 2, 2)
    prec = torch.linalg.inv(cov)  # (K, 2, 2)
    d0 = x[:, 0] - math.sqrt(alpha_bar) * MEANS[:, :1]  # (K, B)
    d1 = x[:, 1] - math.sqrt(alpha_bar) * MEANS[:, 1:]  # (K, B)
    s0 = prec[:, 0, 0, None] * d0 + prec[:, 0, 1, None] * d1  # (K, B): S_k⁻¹ (x − √ᾱ μ_k), first entry
    s1 = prec[:, 1, 0, None] * d0 + prec[:, 1, 1, None] * d1  # (K, B)
    log_joint = WEIGHTS.log()[:, None] - 0.5 * torch.linalg.slogdet(cov)[1][:, None] - 0.5 * (d0 * s0 + d1 * s1)
    resp = torch.softmax(log_joint, dim=0)  # (K, B)
    score = -torch.stack([(resp * s0).sum(0), (resp * s1).sum(0)], dim=-1)  # (B, 2)
    return -math.sqrt(1.0 - alpha_bar) * score  # (B, 2)


class GMMEpsNet:
    """Exact ε 'network' of the mixture, with Σ channels −1 (Σ = β̃_t, the true posterior's variance)."""

    num_classes = 0

    def __init__(self) -> None:
        """Start with an empty log of the (original) steps the sampler asked for."""
        self.steps: list[int] = []

    def __call__(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """(B, 2) points at original steps t (B,) -> (B, 4): ε̂ and the learned-range value v = −1."""
        assert t.dtype == torch.int64 and bool((t == t[0]).all())
        self.steps.append(int(t[0]))
        eps = vp_mixture_eps(x, float(ALPHAS_CUMPROD[int(t[0])]))  # (B, 2)
        return torch.cat([eps, -torch.ones_like(eps)], dim=1)  # (B, 4)


def sample_mixture(sampler: DDPMSampler | DDIMSampler, seed: int = 0) -> Tensor:
    """Draw NUM_SAMPLES float64 points from the mixture with the given sampler."""
    labels = torch.zeros(NUM_SAMPLES, dtype=torch.int64)  # (N,)
    return sampler(GMMEpsNet(), labels, (2,), torch.Generator().manual_seed(seed), torch.float64)  # (N, 2)


def test_mixture_eps_matches_finite_difference_score() -> None:
    """The closed-form ε̂ equals −√(1 − ᾱ) ∇log p_t(x), the score taken by central differences of log p_t."""
    alpha_bar = float(ALPHAS_CUMPROD[300])
    x = 3.0 * torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # (B, 2)
    cov = alpha_bar * COVS + (1.0 - alpha_bar) * torch.eye(2, dtype=torch.float64)  # (K, 2, 2)
    mix = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(WEIGHTS),
        torch.distributions.MultivariateNormal(math.sqrt(alpha_bar) * MEANS, cov),
    )
    h = 1e-5
    grad = torch.stack(
        [(mix.log_prob(x + h * e) - mix.log_prob(x - h * e)) / (2 * h) for e in torch.eye(2, dtype=torch.float64)],
        dim=1,
    )  # (B, 2)
    torch.testing.assert_close(vp_mixture_eps(x, alpha_bar), -math.sqrt(1 - alpha_bar) * grad, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------- samplers
def test_ddpm_sampler_matches_gaussian_mixture() -> None:
    """DiT's sampler (250 respaced ancestral steps, Σ = β̃) on the exact ε reproduces the mixture.

    Σ = β̃ underestimates the true reverse variance on coarse steps: covariances come out ~3.5% small at 250
    steps (1–2% at 1000, 7% at 100, which fails the 5% tolerance).
    """
    ok, reason = check_gmm_samples(sample_mixture(DDPMSampler(num_steps=250)), WEIGHTS, MEANS, COVS)
    assert ok, reason


def test_ddim_sampler_matches_gaussian_mixture() -> None:
    """Deterministic DDIM (η = 0) with 200 steps on the exact ε reproduces the mixture.

    DDIM is first order: its mean bias halves with the steps (about 6 standard errors at 50 steps, 3 at 100,
    1.2 at 200), so 200 steps leave the 4-standard-error check a margin whatever the seed.
    """
    ok, reason = check_gmm_samples(sample_mixture(DDIMSampler(num_steps=200)), WEIGHTS, MEANS, COVS)
    assert ok, reason


class OriginalIndexlessDDPM(DDPMSampler):
    """Broken DDPM: the net receives the respaced index i instead of the original step (no timestep_map)."""

    def guided(self, net: GMMEpsNet, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        return net(x, t, labels)


class StdAsVarianceDDPM(DDPMSampler):
    """Broken DDPM: the per-step noise is scaled by the variance Σ_θ instead of its square root."""

    def step(self, out: Tensor, x: Tensor, t: Tensor, generator: torch.Generator | None) -> Tensor:
        p = self.diffusion.p_mean_variance(out, x, t)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        return p["mean"] + (t != 0).to(x.dtype)[:, None] * p["variance"] * noise


def wrong_posterior_coef() -> DDPMSampler:
    """Broken DDPM: the x_t coefficient of the posterior mean uses √ᾱ_t instead of √α_t."""
    sampler = DDPMSampler(num_steps=250)
    d = sampler.diffusion
    d.posterior_mean_coef2 = (1.0 - d.alphas_cumprod_prev) * d.alphas_cumprod.sqrt() / (1.0 - d.alphas_cumprod)
    return sampler


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("net sees the respaced index", lambda: OriginalIndexlessDDPM(num_steps=250)),
        ("√ᾱ_t instead of √α_t in the posterior mean", wrong_posterior_coef),
        ("noise scaled by Σ instead of √Σ", lambda: StdAsVarianceDDPM(num_steps=250)),
        ("per-step noise 10% too strong (temperature 1.1)", lambda: DDPMSampler(num_steps=250, temperature=1.1)),
    ],
)
def test_broken_ddpm_samplers_fail_the_check(name: str, make: Callable[[], DDPMSampler]) -> None:
    """The mixture check is sensitive: each broken 250-step DDPM fails it (the correct one passes, above)."""
    ok, reason = check_gmm_samples(sample_mixture(make()), WEIGHTS, MEANS, COVS)
    assert not ok, f"{name} passed the check"


def test_sampler_feeds_the_net_original_steps_in_descending_order() -> None:
    """A 250-step sampler asks the net for the evenly respaced original steps 999, ..., 0."""
    net, sampler = GMMEpsNet(), DDPMSampler(num_steps=250)
    sampler(net, torch.zeros(3, dtype=torch.int64), (2,), torch.Generator().manual_seed(0), torch.float64)
    expected = [round(i * 999 / 249) for i in range(250)][::-1]
    assert net.steps == expected and sampler.nfe == 250


# ------------------------------------------------------------------------------------------ CFG (exact)
class StubNet:
    """Deterministic label-dependent net with 2C output channels (ε | Σ layout); records its calls."""

    def __init__(self, num_classes: int = 5) -> None:
        """Start with an empty call log."""
        self.num_classes = num_classes
        self.calls: list[tuple[Tensor, Tensor]] = []

    def __call__(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        self.calls.append((t.clone(), y.clone()))
        yb = y.to(x.dtype).reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
        tb = t.to(x.dtype).reshape(-1, 1, 1, 1) / 1000.0  # (B, 1, 1, 1)
        eps = 0.3 * x * (yb + 1.0) - 0.2 * tb  # (B, C, H, W)
        v = torch.tanh(0.5 * x + 0.1 * yb - tb)  # (B, C, H, W) in (−1, 1)
        return torch.cat([eps, v], dim=1)  # (B, 2C, H, W)


def test_ddpm_cfg_guides_three_of_four_channels_and_takes_sigma_from_the_conditional_half() -> None:
    """Two guided DDPM steps equal the update written out by hand from DiT's forward_with_cfg formula."""
    net, labels, scale = StubNet(), torch.tensor([0, 2, 4]), 4.0
    sampler = DDPMSampler(num_steps=2, cfg_scale=scale, guided_channels=3)
    out = sampler(net, labels, (4, 2, 2), generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 2, 2, generator=gen, dtype=torch.float64)  # (B, C, H, W): x_T
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    ab = np.cumprod(1.0 - betas)[[0, 999]]  # ᾱ at the kept steps 0 and 999
    ab_prev = np.array([1.0, ab[0]])
    beta = 1.0 - ab / ab_prev  # respaced β
    post_var = beta * (1.0 - ab_prev) / (1.0 - ab)
    null = torch.full_like(labels, 5)
    for i, orig in [(1, 999), (0, 0)]:
        t = torch.full((3,), orig)
        c, u = net(x, t, labels), net(x, t, null)  # (B, 8, H, W) each, reference calls
        eps = torch.cat([u[:, :3] + scale * (c[:, :3] - u[:, :3]), c[:, 3:4]], dim=1)  # (B, 4, H, W)
        frac = (c[:, 4:] + 1.0) / 2.0  # (B, 4, H, W): Σ channels of the conditional half
        log_var = frac * math.log(beta[i]) + (1.0 - frac) * math.log(post_var[1])  # β̃ clipped to β̃_1 at i = 0
        x0 = (x - math.sqrt(1.0 - ab[i]) * eps) / math.sqrt(ab[i])  # (B, 4, H, W)
        mean = beta[i] * math.sqrt(ab_prev[i]) / (1.0 - ab[i]) * x0 + (
            (1.0 - ab_prev[i]) * math.sqrt(1.0 - beta[i]) / (1.0 - ab[i])
        ) * x  # (B, 4, H, W)
        z = torch.randn(x.shape, generator=gen, dtype=torch.float64)  # drawn every step, masked at i = 0
        x = mean + (torch.exp(0.5 * log_var) * z if i > 0 else 0.0)
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-12)
    # One batched call per step on cat([y, null]) at the original steps 999 then 0.
    sampler_calls = net.calls[:2]
    assert [tuple(t.tolist()) for t, _ in sampler_calls] == [(999,) * 6, (0,) * 6]
    assert all(torch.equal(y, torch.tensor([0, 2, 4, 5, 5, 5])) for _, y in sampler_calls)


@pytest.mark.parametrize("sampler_cls", [DDPMSampler, DDIMSampler])
def test_cfg_scale_one_makes_one_plain_call_per_step(sampler_cls: type) -> None:
    """cfg_scale = 1 (or an unconditional net) runs the net once per step on the plain batch."""
    for num_classes in (5, 0):
        net = StubNet(num_classes)
        sampler_cls(num_steps=4, cfg_scale=1.0 if num_classes else 3.0)(
            net, torch.tensor([1, 2]), (2, 2, 2), torch.Generator().manual_seed(0)
        )
        assert len(net.calls) == 4 and all(y.shape == (2,) for _, y in net.calls)


@pytest.mark.parametrize("sampler_cls", [DDPMSampler, DDIMSampler])
def test_samplers_are_reproducible_and_return_the_requested_dtype(sampler_cls: type) -> None:
    """The same seed gives the same samples through a generator or the global RNG; dtype defaults to float32."""
    labels = torch.tensor([0, 3])
    kwargs = {"num_steps": 5, "cfg_scale": 2.0}
    if sampler_cls is DDIMSampler:
        kwargs["eta"] = 0.5
    a = sampler_cls(**kwargs)(StubNet(), labels, (2, 2, 2), torch.Generator().manual_seed(9))
    b = sampler_cls(**kwargs)(StubNet(), labels, (2, 2, 2), torch.Generator().manual_seed(9))
    torch.manual_seed(9)
    c = sampler_cls(**kwargs)(StubNet(), labels, (2, 2, 2))
    assert torch.equal(a, b) and torch.equal(a, c) and a.dtype == torch.float32 and a.shape == (2, 2, 2, 2)


def test_samplers_reuse_a_given_diffusion_respaced() -> None:
    """A given (cosine) diffusion is respaced to num_steps, with its ᾱ kept at the chosen steps."""
    base = GaussianDiffusion(beta_schedule="cosine")
    sampler = DDIMSampler(num_steps=50, respacing="ddim50", diffusion=base)
    assert sampler.diffusion.timestep_map.tolist() == list(range(0, 1000, 20))
    torch.testing.assert_close(sampler.diffusion.alphas_cumprod, base.alphas_cumprod[::20], rtol=1e-12, atol=0)
    # A sampler key that contradicts the given (model's) diffusion is an error, not silently ignored.
    with pytest.raises(ValueError, match=r"sampling.beta_schedule='linear' contradicts the model's diffusion"):
        DDPMSampler(num_steps=50, beta_schedule="linear", diffusion=base)
    with pytest.raises(ValueError, match="sampling.num_timesteps=500"):
        DDPMSampler(num_steps=50, num_timesteps=500, diffusion=base)
    agreeing = DDPMSampler(num_steps=50, beta_schedule="cosine", learn_sigma=True, diffusion=base)
    assert agreeing.diffusion.beta_schedule == "cosine"


def test_invalid_arguments_raise_clear_errors() -> None:
    """Bad constructor or call arguments fail early with messages naming the problem."""
    for kwargs in [
        {"num_steps": 1},
        {"num_steps": 2.5},
        {"cfg_scale": -1.0},
        {"cfg_scale": float("nan")},
        {"guided_channels": 0},
        {"temperature": -0.1},
        {"num_steps": 1001},
        {"beta_schedule": "quadratic"},
    ]:
        with pytest.raises(ValueError):
            DDPMSampler(**kwargs)
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(eta=-1.0)
    with pytest.raises(ValueError, match="num_steps=50"):
        DDIMSampler(num_steps=50, respacing="100")
    with pytest.raises(ValueError, match="guided_channels"):
        DDPMSampler(num_steps=2, cfg_scale=2.0, guided_channels=3)(StubNet(), torch.tensor([0]), (2, 2, 2))
    with pytest.raises(ValueError, match="int64"):
        DDPMSampler(num_steps=2)(StubNet(), torch.tensor([0.0]), (2, 2, 2))
    with pytest.raises(ValueError, match="labels must lie"):
        DDPMSampler(num_steps=2)(StubNet(), torch.tensor([6]), (2, 2, 2))
    with pytest.raises(ValueError, match="learn_sigma"):
        DDPMSampler(num_steps=2, learn_sigma=False)(StubNet(), torch.tensor([0]), (2, 2, 2))
