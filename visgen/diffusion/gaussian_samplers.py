"""Ancestral (DDPM) and DDIM samplers for ε-predicting Gaussian diffusion models, with classifier-free guidance.

Both run over a respaced process (improved DDPM Sec. 4): `num_steps` kept steps of the T-step training schedule,
the network receiving the ORIGINAL step index (see ``gaussian.py``). Sampling draws x_T ~ N(0, I) with the
generator on the labels' device, then for i = num_steps − 1, ..., 0 (DDPM draws per-step noise at every i and masks
it at i = 0, as improved DDPM; DDIM with η = 0 draws none):

* DDPM (Ho et al. 2020 Alg. 2; improved DDPM's ``p_sample``): x_{i−1} = μ_θ(x_i, i) + τ · exp(½ log Σ_θ) · z for
  i > 0 and x_{−1} = μ_θ at i = 0, with Σ_θ learned (improved DDPM Eq. 15) or fixed; τ = `temperature` scales the
  noise only (MAR's convention; 1 is the published sampler).
* DDIM (Song et al. 2021 Eq. 12; improved DDPM's ``ddim_sample``): x_{i−1} = √ᾱ_{i−1} x̂_0
  + √(1 − ᾱ_{i−1} − σ_i²) ε̂ + σ_i z, σ_i = η √((1 − ᾱ_{i−1}) / (1 − ᾱ_i)) √(1 − ᾱ_i / ᾱ_{i−1}); ε̂ is recomputed
  from the (possibly clipped) x̂_0.

Classifier-free guidance is DiT's ``forward_with_cfg`` through ``guided_output``: one batched call on
cat([y, null]); ε̂_u + s (ε̂_c − ε̂_u) on the first `guided_channels` channels (DiT's recipe: 3 of 4 latent
channels), every other channel (the rest of ε̂ and the Σ channels) from the conditional half.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from visgen.diffusion.gaussian import GaussianDiffusion
from visgen.diffusion.guidance import draw_prior, guided_output
from visgen.sampling import Sampler

__all__ = ["DDPMSampler", "DDIMSampler"]

Net = Callable[[Tensor, Tensor, Tensor], Tensor]


def _check_nonnegative(name: str, value: float) -> float:
    """Return value as a float, with a clear error unless it is finite and >= 0."""
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


class GaussianSampler(Sampler):
    """Shared loop of the DDPM and DDIM samplers: argument checks, x_T, guided net calls; subclasses define `step`."""

    def __init__(
        self,
        num_steps: int,
        cfg_scale: float = 1.0,
        guided_channels: int | None = None,
        beta_schedule: str | None = None,
        learn_sigma: bool | None = None,
        clip_denoised: bool = False,
        num_timesteps: int | None = None,
        respacing: str | Sequence[int] | None = None,
        diffusion: GaussianDiffusion | None = None,
    ) -> None:
        """Validate the settings and build the process respaced to `num_steps` (`respacing` defaults to "num_steps").

        A given `diffusion` (the model's own, `model.diffusion`) supplies the base process; it is respaced here,
        whatever its own respacing. Without one, `beta_schedule`, `learn_sigma` and `num_timesteps` build it (None:
        DiT's linear, True, 1000). Given both, a key that contradicts the diffusion is an error, never ignored.
        """
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
            raise ValueError(f"num_steps must be an int >= 2, got {num_steps!r}")
        if guided_channels is not None and (
            isinstance(guided_channels, bool) or not isinstance(guided_channels, int) or guided_channels < 1
        ):
            raise ValueError(f"guided_channels must be None or a positive int, got {guided_channels!r}")
        self.num_steps = num_steps
        self.cfg_scale = _check_nonnegative("cfg_scale", cfg_scale)
        self.guided_channels = guided_channels
        self.clip_denoised = bool(clip_denoised)
        respacing = str(num_steps) if respacing is None else respacing
        if diffusion is None:
            diffusion = GaussianDiffusion(
                1000 if num_timesteps is None else num_timesteps,
                beta_schedule or "linear",
                True if learn_sigma is None else learn_sigma,
            )
        given = {"beta_schedule": (beta_schedule, diffusion.beta_schedule),
                 "learn_sigma": (learn_sigma, diffusion.learn_sigma),
                 "num_timesteps": (num_timesteps, diffusion.original_num_timesteps)}
        for key, (mine, model) in given.items():
            if mine is not None and mine != model:
                raise ValueError(
                    f"sampling.{key}={mine!r} contradicts the model's diffusion ({key}={model!r}); leave "
                    f"sampling.{key} null to sample the process the model was trained on"
                )
        self.diffusion = diffusion.respaced(respacing)
        if self.diffusion.num_timesteps != num_steps:
            raise ValueError(
                f"respacing {respacing!r} keeps {self.diffusion.num_timesteps} steps but num_steps={num_steps}; "
                "make them agree (or leave respacing unset)"
            )

    @property
    def nfe(self) -> int:
        """Network evaluations per sample; a batched CFG call (cond + uncond) counts as one."""
        return self.num_steps

    def guided(self, net: Net, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        """The full guided net output (B, C_out, ...) at respaced steps t (the net sees the original indices)."""
        return guided_output(
            net, x, self.diffusion.net_timesteps(t), labels, self.cfg_scale, None, self.guided_channels
        )  # (B, C_out, ...)

    def step(self, out: Tensor, x: Tensor, t: Tensor, generator: torch.Generator | None) -> Tensor:
        """One reverse step x_i -> x_{i−1} from the guided net output; subclasses implement it."""
        raise NotImplementedError

    @torch.no_grad()
    def __call__(
        self,
        net: Net,
        labels: Tensor,
        latent_shape: Sequence[int],
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Sample (B, *latent_shape) from x_T ~ N(0, I) drawn with `generator` on labels' device."""
        x = draw_prior(net, labels, latent_shape, self.guided_channels, generator, dtype)  # (B, *latent_shape)
        batch = x.shape[0]
        for i in reversed(range(self.diffusion.num_timesteps)):
            t = torch.full((batch,), i, dtype=torch.int64, device=labels.device)  # (B,) respaced step
            x = self.step(self.guided(net, x, t, labels), x, t, generator)  # (B, *latent_shape)
        return x


class DDPMSampler(GaussianSampler):
    """Ancestral sampling of p_θ(x_{t−1} | x_t) over the respaced steps (DiT's sampler: 250 steps)."""

    def __init__(
        self,
        num_steps: int = 250,
        cfg_scale: float = 1.0,
        guided_channels: int | None = None,
        temperature: float = 1.0,
        beta_schedule: str | None = None,
        learn_sigma: bool | None = None,
        clip_denoised: bool = False,
        num_timesteps: int | None = None,
        respacing: str | Sequence[int] | None = None,
        diffusion: GaussianDiffusion | None = None,
    ) -> None:
        """Store the settings (Hydra-instantiable); `temperature` scales the per-step noise (1: published)."""
        super().__init__(
            num_steps, cfg_scale, guided_channels, beta_schedule, learn_sigma, clip_denoised, num_timesteps,
            respacing, diffusion,
        )
        self.temperature = _check_nonnegative("temperature", temperature)

    def __repr__(self) -> str:
        """Readable summary for logs."""
        return (
            f"DDPMSampler(num_steps={self.num_steps}, cfg_scale={self.cfg_scale}, "
            f"guided_channels={self.guided_channels}, temperature={self.temperature}, "
            f"clip_denoised={self.clip_denoised}, diffusion={self.diffusion!r})"
        )

    def step(self, out: Tensor, x: Tensor, t: Tensor, generator: torch.Generator | None) -> Tensor:
        """x_{t−1} = μ_θ + τ σ_θ z for t > 0 and μ_θ at t = 0 (noise drawn and masked, as improved DDPM)."""
        p = self.diffusion.p_mean_variance(out, x, t, self.clip_denoised)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)  # (B, ...)
        nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, ...): no noise at t = 0
        return p["mean"] + nonzero * self.temperature * torch.exp(0.5 * p["log_variance"]) * noise  # (B, ...)


class DDIMSampler(GaussianSampler):
    """DDIM (η = 0: deterministic) over the respaced steps; reads only the ε channels of learned-Σ nets."""

    def __init__(
        self,
        num_steps: int = 50,
        eta: float = 0.0,
        cfg_scale: float = 1.0,
        guided_channels: int | None = None,
        beta_schedule: str | None = None,
        learn_sigma: bool | None = None,
        clip_denoised: bool = False,
        num_timesteps: int | None = None,
        respacing: str | Sequence[int] | None = None,
        diffusion: GaussianDiffusion | None = None,
    ) -> None:
        """Store the settings (Hydra-instantiable); η interpolates between DDIM (0) and DDPM-like noise (1)."""
        super().__init__(
            num_steps, cfg_scale, guided_channels, beta_schedule, learn_sigma, clip_denoised, num_timesteps,
            respacing, diffusion,
        )
        self.eta = _check_nonnegative("eta", eta)

    def __repr__(self) -> str:
        """Readable summary for logs."""
        return (
            f"DDIMSampler(num_steps={self.num_steps}, eta={self.eta}, cfg_scale={self.cfg_scale}, "
            f"guided_channels={self.guided_channels}, clip_denoised={self.clip_denoised}, "
            f"diffusion={self.diffusion!r})"
        )

    def step(self, out: Tensor, x: Tensor, t: Tensor, generator: torch.Generator | None) -> Tensor:
        """x_{t−1} = √ᾱ_{t−1} x̂_0 + √(1 − ᾱ_{t−1} − σ_t²) ε̂ + σ_t z (no noise at t = 0 or with η = 0)."""
        d = self.diffusion
        p = d.p_mean_variance(out, x, t, self.clip_denoised)
        eps = d.predict_eps_from_xstart(x, t, p["pred_xstart"])  # (B, ...)
        alpha_bar = d.extract(d.alphas_cumprod, t, x)  # (B, 1, ...)
        alpha_bar_prev = d.extract(d.alphas_cumprod_prev, t, x)  # (B, 1, ...)
        ratio = (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)  # (B, 1, ...)
        sigma = self.eta * torch.sqrt(ratio) * torch.sqrt(1.0 - alpha_bar / alpha_bar_prev)  # (B, 1, ...)
        direction = torch.sqrt(1.0 - alpha_bar_prev - sigma**2) * eps  # (B, ...)
        mean = p["pred_xstart"] * torch.sqrt(alpha_bar_prev) + direction  # (B, ...)
        if self.eta == 0.0:
            return mean  # (B, ...): deterministic DDIM draws no noise
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)  # (B, ...)
        nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, ...): no noise at t = 0
        return mean + nonzero * sigma * noise  # (B, ...)
