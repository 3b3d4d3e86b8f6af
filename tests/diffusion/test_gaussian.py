"""Tests for the Gaussian diffusion process: schedules, respacing, the hybrid loss against direct computations,
the stop-gradient of L_vb, and the DiT paradigm's loss on a tiny DiT."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import Tensor
from torch.distributions import Normal, kl_divergence

from visgen.diffusion.gaussian import GaussianDiffusion, betas_for_schedule, space_timesteps
from visgen.diffusion.gaussian_samplers import DDIMSampler, DDPMSampler
from visgen.nn.dit import DiT
from visgen.paradigms.dit import DiTDiffusion
from visgen.tokenizers import PixelTokenizer

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# DDPM's linear schedule over 1000 steps, written out independently of gaussian.py.
BETAS = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)  # (T,)
ALPHAS_CUMPROD = np.cumprod(1.0 - BETAS)  # (T,)


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    """Run on one intra-op thread: the tensors are tiny and shared CPUs make extra threads slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FixedOutputNet:
    """A 'network' returning a fixed output tensor whatever its input; records the steps it was given."""

    num_classes = 10

    def __init__(self, out: Tensor) -> None:
        """Store the output to return and start an empty log of steps."""
        self.out = out
        self.steps: list[Tensor] = []

    def __call__(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        self.steps.append(t.clone())
        return self.out


# ------------------------------------------------------------------------------------------------ schedules
def test_linear_schedule_is_ddpm_scaled_to_the_number_of_steps() -> None:
    """Linear β runs from 1e-4 to 0.02 over 1000 steps and from 4e-4 to 0.08 over 250 (scaled by 1000 / T)."""
    np.testing.assert_allclose(betas_for_schedule("linear", 1000), BETAS, rtol=0, atol=0)
    betas = betas_for_schedule("linear", 250)
    assert betas.dtype == np.float64 and betas.shape == (250,)
    np.testing.assert_allclose(betas[[0, -1]], [4e-4, 0.08], rtol=1e-12)


def test_cosine_schedule_follows_improved_ddpm() -> None:
    """Cosine ᾱ_t = f(t + 1) / f(0) with f(u) = cos²((u / T + s) / (1 + s) π/2), s = 0.008, and β ≤ 0.999."""
    d = GaussianDiffusion(beta_schedule="cosine")
    f = np.cos((np.arange(1001) / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2  # (T + 1,)
    unclipped = slice(0, 990)  # the last steps have β clipped at 0.999
    np.testing.assert_allclose(d.alphas_cumprod.numpy()[unclipped], (f[1:] / f[0])[unclipped], rtol=1e-10)
    assert float(d.betas.max()) == 0.999 and float(d.betas[-1]) == 0.999


# ----------------------------------------------------------------------------------------------- respacing
def test_space_timesteps_semantics() -> None:
    """Evenly spaced rounded steps with both ends kept, sections, and DDIM's fixed stride."""
    assert space_timesteps(1000, "250") == [round(i * 999 / 249) for i in range(250)]
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(100, "2,3") == [0, 49, 50, 74, 99]
    assert space_timesteps(1000, [1000]) == list(range(1000))
    for bad in ["ddim600", "1001", "0"]:
        with pytest.raises(ValueError):
            space_timesteps(1000, bad)


def _published_space_timesteps(num_timesteps: int, counts: list[int]) -> list[int]:
    """improved DDPM respace.py's rule, transcribed line by line: a running float sum `cur_idx += frac_stride`."""
    size_per, extra = num_timesteps // len(counts), num_timesteps % len(counts)
    start_idx, all_steps = 0, []
    for i, section_count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return sorted(set(all_steps))


def test_space_timesteps_equals_the_published_rule_for_every_step_count() -> None:
    """All counts 2..1000 of T = 1000 (and sectioned strings) keep exactly improved DDPM's steps."""
    for count in range(2, 1001):
        assert space_timesteps(1000, str(count)) == _published_space_timesteps(1000, [count]), count
    for spec in ["10,15,20", "7,9", "1,1,1", "33,1,250"]:
        counts = [int(c) for c in spec.split(",")]
        assert space_timesteps(1000, spec) == _published_space_timesteps(1000, counts), spec
    # The broken variant (round(j * stride), visgen's rule before) misses 278 counts, e.g. 21, 251, 999.
    def by_product(count: int) -> list[int]:
        stride = 999 / (count - 1)
        return sorted({round(j * stride) for j in range(count)})

    broken = [c for c in range(2, 1001) if by_product(c) != _published_space_timesteps(1000, [c])]
    assert len(broken) == 278 and {21, 23, 31, 43, 251, 501, 999} <= set(broken)
    assert not {10, 20, 25, 50, 100, 250, 1000} & set(broken)


def test_respaced_process_keeps_alphas_cumprod_and_feeds_the_net_original_steps() -> None:
    """"250" keeps 250 evenly spaced steps with the original ᾱ there, β recomputed, and the net sees original t."""
    d = GaussianDiffusion(respacing="250")
    kept = [round(i * 999 / 249) for i in range(250)]
    assert d.num_timesteps == 250 and d.timestep_map.tolist() == kept
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), ALPHAS_CUMPROD[kept], rtol=1e-12)
    np.testing.assert_allclose(d.betas.numpy(), 1.0 - ALPHAS_CUMPROD[kept] / np.append(1.0, ALPHAS_CUMPROD[kept][:-1]))

    x = torch.randn(4, 2, 3, dtype=torch.float64)  # (B, C, L)
    net = FixedOutputNet(torch.zeros(4, 4, 3, dtype=torch.float64))
    d.training_losses(net, x, torch.zeros(4, dtype=torch.int64), t=torch.tensor([0, 1, 100, 249]))
    assert net.steps[0].dtype == torch.int64 and net.steps[0].tolist() == [0, kept[1], kept[100], 999]
    d.training_losses(net, x, torch.zeros(4, dtype=torch.int64), generator=torch.Generator().manual_seed(0))
    assert set(net.steps[1].tolist()) <= set(kept)


# ------------------------------------------------------------------------------------------------ the loss
def approx_cdf(z: Tensor) -> Tensor:
    """The tanh approximation of Φ that improved DDPM uses (PixelCNN++'s), written out here."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))


def direct_vb(x0: Tensor, noise: Tensor, eps: Tensor, v: Tensor, t: list[int], cdf=approx_cdf) -> Tensor:
    """L_vb per sample (bits/dim) computed directly from DDPM's formulas, one sample at a time."""
    out = []
    for b, step in enumerate(t):
        ab, beta = ALPHAS_CUMPROD[step], BETAS[step]
        ab_prev = ALPHAS_CUMPROD[step - 1] if step > 0 else 1.0
        x_t = math.sqrt(ab) * x0[b] + math.sqrt(1 - ab) * noise[b]
        x0_hat = (x_t - math.sqrt(1 - ab) * eps[b]) / math.sqrt(ab)

        def post_mean(x_start: Tensor, ab: float = ab, ab_prev: float = ab_prev, beta: float = beta,
                      x_t: Tensor = x_t) -> Tensor:
            return (math.sqrt(ab_prev) * beta * x_start + math.sqrt(1 - beta) * (1 - ab_prev) * x_t) / (1 - ab)

        # β̃_0 = 0: the interpolation's lower end is clipped to β̃_1 at t = 0.
        post_var = beta * (1 - ab_prev) / (1 - ab) if step > 0 else BETAS[1] * (1 - ALPHAS_CUMPROD[0]) / (
            1 - ALPHAS_CUMPROD[1])
        frac = (v[b] + 1) / 2
        std = torch.exp(0.5 * (frac * math.log(beta) + (1 - frac) * math.log(post_var)))
        p = Normal(post_mean(x0_hat), std)
        if step > 0:
            q = Normal(post_mean(x0[b]), math.sqrt(post_var))
            out.append(kl_divergence(q, p).mean() / math.log(2))
            continue
        upper = cdf((x0[b] + 1 / 255 - p.mean) / std)
        lower = cdf((x0[b] - 1 / 255 - p.mean) / std)
        log_prob = torch.where(
            x0[b] < -0.999, upper.log(), torch.where(x0[b] > 0.999, (1 - lower).log(), (upper - lower).log())
        )
        out.append(-log_prob.mean() / math.log(2))
    return torch.stack(out)  # (B,)


def random_case(shape: tuple[int, ...], seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Data in [−1, 1] with exact edge values, noise, and a learned-Σ net output (ε̂ | v ∈ [−1, 1])."""
    gen = torch.Generator().manual_seed(seed)
    x0 = 2 * torch.rand(shape, generator=gen, dtype=torch.float64) - 1  # (B, C, ...)
    x0.view(-1)[::7] = -1.0
    x0.view(-1)[3::7] = 1.0
    noise = torch.randn(shape, generator=gen, dtype=torch.float64)  # (B, C, ...)
    eps = noise + 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)  # (B, C, ...)
    v = 2 * torch.rand(shape, generator=gen, dtype=torch.float64) - 1  # (B, C, ...)
    return x0, noise, torch.cat([eps, v], dim=1)


@pytest.mark.parametrize("shape", [(6, 3, 2, 2), (6, 5)])
def test_hybrid_loss_equals_direct_computation(shape: tuple[int, ...]) -> None:
    """mse, vb (KL in bits/dim for t > 0, discretized decoder NLL at t = 0) and loss = mse + vb, any input shape."""
    x0, noise, out = random_case(shape)
    t = [0, 0, 1, 2, 500, 999]
    terms = GaussianDiffusion().training_losses(
        FixedOutputNet(out), x0, torch.zeros(6, dtype=torch.int64), t=torch.tensor(t), noise=noise
    )
    eps, v = out.split(shape[1], dim=1)
    assert all(terms[k].shape == (6,) for k in ("loss", "mse", "vb"))
    torch.testing.assert_close(terms["mse"], (noise - eps).pow(2).flatten(1).mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms["vb"], direct_vb(x0, noise, eps, v, t), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"], rtol=0, atol=0)
    # The tanh CDF is an approximation: the decoder NLL stays within 1% of the one with the exact Φ.
    exact = direct_vb(x0, noise, eps, v, t, cdf=lambda z: Normal(0.0, 1.0).cdf(z))
    torch.testing.assert_close(terms["vb"][:2], exact[:2], rtol=1e-2, atol=0)


def test_min_snr_weights_only_the_epsilon_mse() -> None:
    """Min-SNR-γ: loss = min(SNR_t, γ) / SNR_t · mse + vb, SNR_t = ᾱ_t / (1 − ᾱ_t) from the linear schedule."""
    x0, noise, out = random_case((6, 2, 3))
    t = torch.tensor([0, 100, 200, 300, 600, 999])
    y = torch.zeros(6, dtype=torch.int64)
    plain = GaussianDiffusion().training_losses(FixedOutputNet(out), x0, y, t=t, noise=noise)
    weighted = GaussianDiffusion(min_snr_gamma=5.0).training_losses(FixedOutputNet(out), x0, y, t=t, noise=noise)
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t]  # (6,)
    snr = alpha_bar / (1 - alpha_bar)  # (6,): 1e4 at t = 0, ~4e-5 at t = 999
    weight = snr.clamp(max=5.0) / snr
    assert weight[0] < 1e-3 and weight[-1] == 1.0  # low-noise steps count less, high-noise steps in full
    torch.testing.assert_close(weighted["loss"], weight * plain["mse"] + plain["vb"], rtol=1e-12, atol=1e-12)
    assert torch.equal(weighted["mse"], plain["mse"]) and torch.equal(weighted["vb"], plain["vb"])
    assert GaussianDiffusion(min_snr_gamma=5.0).respaced("10").min_snr_gamma == 5.0
    with pytest.raises(ValueError, match="min_snr_gamma"):
        GaussianDiffusion(min_snr_gamma=0.0)


def test_vb_trains_only_sigma_and_mse_only_epsilon() -> None:
    """Stop-gradient on μ_θ: ∂vb/∂ε̂ = 0 while ∂vb/∂v ≠ 0; ∂mse/∂v = 0 while ∂mse/∂ε̂ ≠ 0."""
    x0, noise, out = random_case((4, 2, 3))
    t = torch.tensor([0, 1, 300, 999])
    for key, zero, nonzero in [("vb", slice(0, 2), slice(2, 4)), ("mse", slice(2, 4), slice(0, 2))]:
        leaf = out.clone().requires_grad_(True)
        terms = GaussianDiffusion().training_losses(
            FixedOutputNet(leaf), x0, torch.zeros(4, dtype=torch.int64), t=t, noise=noise
        )
        (grad,) = torch.autograd.grad(terms[key].sum(), leaf)
        assert bool((grad[:, zero] == 0).all()), key
        assert bool((grad[:, nonzero].abs().flatten(1).sum(1) > 0).all()), key


def test_fixed_sigma_loss_is_the_epsilon_mse_and_shapes_are_checked() -> None:
    """Without learned Σ the loss is L_simple (vb = 0); an output with the wrong channel count is an error."""
    x0, noise, out = random_case((4, 2, 3))
    terms = GaussianDiffusion(learn_sigma=False).training_losses(
        FixedOutputNet(out[:, :2]), x0, torch.zeros(4, dtype=torch.int64), noise=noise
    )
    assert torch.equal(terms["vb"], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(terms["loss"], terms["mse"])
    with pytest.raises(ValueError, match="learn_sigma"):
        GaussianDiffusion().training_losses(FixedOutputNet(out[:, :2]), x0, torch.zeros(4, dtype=torch.int64))


def test_training_losses_draws_t_then_noise_from_the_generator() -> None:
    """With a generator, t ~ U{0..T−1} and then ε are drawn from it: the same as passing them explicitly."""
    x0, _, out = random_case((4, 2, 3))
    d, y = GaussianDiffusion(), torch.zeros(4, dtype=torch.int64)
    drawn = d.training_losses(FixedOutputNet(out), x0, y, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (4,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    explicit = d.training_losses(FixedOutputNet(out), x0, y, t=t, noise=noise)
    assert all(torch.equal(drawn[k], explicit[k]) for k in ("loss", "mse", "vb"))


def test_invalid_process_arguments_raise() -> None:
    """Unknown schedules, too few steps and impossible respacings fail with clear errors."""
    with pytest.raises(ValueError, match="allowed: linear, cosine"):
        GaussianDiffusion(beta_schedule="quadratic")
    with pytest.raises(ValueError, match="at least 2 steps"):
        GaussianDiffusion(respacing="1")
    with pytest.raises(ValueError, match="num_timesteps"):
        GaussianDiffusion(num_timesteps=0)


# --------------------------------------------------------------------------------------------- DiT paradigm
def tiny_dit_module() -> DiTDiffusion:
    """DiTDiffusion around a 1-block, 32-wide DiT on 8×8×4 inputs."""
    torch.manual_seed(0)
    net = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10,
              learn_sigma=True)
    return DiTDiffusion(
        diffusion=GaussianDiffusion(), net=net, tokenizer=PixelTokenizer(4), sampler=DDPMSampler(num_steps=4),
        optimizer={"lr": 1e-3}, image_size=8, batch_global=8,
    )


def test_dit_loss_is_finite_per_sample_and_decreases_on_a_fixed_batch() -> None:
    """loss(net, batch) is (B,) and finite, reproducible with a generator; Adam steps lower it on a fixed batch."""
    module = tiny_dit_module()
    module.net.eval()  # no label dropout: it draws from the global RNG
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, 8, 8, generator=gen).clamp(-1, 1), torch.randint(0, 10, (8,), generator=gen)

    def fixed_loss() -> Tensor:
        return module.loss(module.net, {"latents": x, "labels": y}, generator=torch.Generator().manual_seed(2))  # (B,)

    first = fixed_loss().detach()
    assert first.shape == (8,) and bool(torch.isfinite(first).all())
    assert torch.equal(first, fixed_loss())
    opt = torch.optim.Adam(module.net.parameters(), lr=1e-3)
    for _ in range(30):
        opt.zero_grad()
        fixed_loss().mean().backward()
        opt.step()
    with torch.no_grad():
        assert float(fixed_loss().mean()) < 0.7 * float(first.mean())


@pytest.mark.parametrize(("sampling", "sampler_cls"), [("ddpm", DDPMSampler), ("ddim", DDIMSampler)])
def test_dit_configs_compose_and_instantiate(sampling: str, sampler_cls: type) -> None:
    """conf/model/dit.yaml with a Gaussian sampling group builds the module, its diffusion and sampler."""
    overrides = ["~experiment", "model=dit", f"sampling={sampling}", "model.net.hidden_size=32", "model.net.depth=1",
                 "model.net.num_heads=2", "model.net.patch_size=4"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    module = instantiate(cfg.model)
    assert isinstance(module, DiTDiffusion) and isinstance(module.sampler, sampler_cls)
    assert module.diffusion.num_timesteps == 1000 and module.diffusion.learn_sigma
    assert module.net.out_channels == 2 * cfg.model.net.in_channels
    if sampling == "ddpm":
        assert (module.sampler.num_steps, module.sampler.cfg_scale, module.sampler.guided_channels) == (250, 1.5, 3)
