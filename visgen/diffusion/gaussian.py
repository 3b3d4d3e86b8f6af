"""Discrete-time Gaussian diffusion with learned variances: DDPM (Ho et al. 2020) as improved by Nichol & Dhariwal
(2021, "Improved Denoising Diffusion Probabilistic Models"), the process DiT (Peebles & Xie, 2023) trains.

Convention (DDPM's, not SiT's): integer steps t = 0, ..., T - 1 with t = 0 the least noisy; the network
``net(x_t, t, y)`` receives the ORIGINAL step index as an int64 tensor (B,) even on a respaced process.

* Forward process (DDPM Eq. 4):  q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I),  ᾱ_t = Π_{s≤t} (1 − β_s).
* Posterior (DDPM Eqs. 6–7):     q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t I),
  μ̃_t = √ᾱ_{t−1} β_t / (1 − ᾱ_t) · x_0 + √α_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · x_t,  β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) β_t.
* Model: ε prediction, x̂_0 = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t and μ_θ = μ̃_t(x̂_0, x_t); learned Σ (improved DDPM
  Eq. 15): log Σ_θ = frac · log β_t + (1 − frac) · log β̃_t with frac = (v + 1) / 2, v the net's second C channels.
* Hybrid loss (improved DDPM Eq. 16): L = ‖ε − ε̂‖² (mean over dims) + L_vb, where L_vb uses a stop-gradient
  on μ_θ so it only trains Σ: KL(q(x_{t−1}|x_t,x_0) ‖ p_θ(x_{t−1}|x_t)) for t > 0 and the discretized Gaussian
  decoder NLL −log p_θ(x_0|x_1) at t = 0, both in bits per dimension.
* Schedules: linear (DDPM, stretched to T steps as improved DDPM's ``get_named_beta_schedule``) and cosine
  (improved DDPM Eq. 17, s = 0.008, β clipped at 0.999).
* Respacing (improved DDPM Sec. 4, ``space_timesteps``): keep a subset S of steps and recompute
  β_i = 1 − ᾱ_{S_i} / ᾱ_{S_{i−1}}, so the kept ᾱ are unchanged; ``timestep_map`` maps i back to S_i for the net.

The schedule is computed in float64 (numpy, as the original) and cast to the data's dtype when used. Inputs may
have any shape (B, ...): images (B, C, H, W) or single tokens (B, D) (MAR); the learned-Σ channels are the second
half of dim 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "GaussianDiffusion",
    "BETA_SCHEDULES",
    "betas_for_schedule",
    "space_timesteps",
    "normal_kl",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "mean_flat",
]

Net = Callable[[Tensor, Tensor, Tensor], Tensor]

BETA_SCHEDULES = ("linear", "cosine")


# ----------------------------------------------------------------------------------------------- schedules
def betas_for_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """β_0..β_{T−1} (float64) of the named schedule, as improved DDPM's `get_named_beta_schedule`."""
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
    if name == "linear":
        # DDPM's 1e-4 → 0.02 over 1000 steps, scaled so that other T keep the same total noise.
        scale = 1000 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)  # (T,)
    if name == "cosine":
        # improved DDPM Eq. 17: ᾱ(t) = cos²((t/T + s) / (1 + s) · π/2), s = 0.008, β = 1 − ᾱ(t+1)/ᾱ(t) ≤ 0.999.
        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        steps = range(num_timesteps)
        betas = [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999) for i in steps]
        return np.array(betas, dtype=np.float64)  # (T,)
    raise ValueError(f"unknown beta_schedule {name!r}; allowed: {', '.join(BETA_SCHEDULES)}")


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
    """Sorted original steps to keep, with improved DDPM's `space_timesteps` semantics.

    "250" (or [250]) keeps 250 steps evenly spaced over [0, T − 1] (a rounded running sum of the fractional
    stride, both ends kept: the published rule bit for bit); "10,15,20" splits [0, T) into 3 equal sections
    with that many steps each; "ddimN" uses the fixed stride of DDIM (range(0, T, k) with exactly N steps, an
    error when no stride gives N).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride over {num_timesteps}")
        counts = [int(part) for part in section_counts.split(",")]
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(c) for c in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"respacing section counts must be positive, got {section_counts!r}")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count} (respacing {section_counts!r})")
        frac_stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        # A running float sum, rounded with Python's round (ties to even), exactly as improved DDPM's loop
        # (`cur_idx += frac_stride`): `round(j * frac_stride)` differs on .5 ties that the accumulated sum tips
        # the other way, keeping other steps than DiT's and MAR's samplers for 278 of the counts 2..1000.
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += frac_stride
        start += size
    return sorted(set(kept))


# ---------------------------------------------------------------------------------------- likelihood terms
def mean_flat(x: Tensor) -> Tensor:
    """Mean over all non-batch dimensions: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)  # (B,)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation of the standard normal CDF used by improved DDPM (and PixelCNN++)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Elementwise log-likelihood (nats) of data x in [−1, 1] on 256 bins of width 2/255 under N(means, e^2·log_scales).

    The edge bins extend to ±∞ (x < −0.999 uses the CDF up to x + 1/255, x > 0.999 the tail above x − 1/255), as
    DDPM's decoder (Ho et al. Eq. 13) in improved DDPM's implementation.
    """
    centered = x - means  # (B, ...)
    inv_std = torch.exp(-log_scales)  # (B, ...)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))  # (B, ...)
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))  # (B, ...)
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))  # (B, ...)
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))  # (B, ...)
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))  # (B, ...)
    inner = torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)  # (B, ...)
    return torch.where(x < -0.999, log_cdf_plus, inner)  # (B, ...)


# ------------------------------------------------------------------------------------------------- process
class GaussianDiffusion:
    """DDPM forward process, ε-parameterised reverse process with learned (or fixed) Σ, and the hybrid loss."""

    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_schedule: str = "linear",
        learn_sigma: bool = True,
        respacing: str | int | Sequence[int] | None = None,
        sigma_small: bool = False,
        min_snr_gamma: float | None = None,
    ) -> None:
        """Build the (optionally respaced) schedule; `sigma_small` picks β̃ over β as the fixed Σ when not learned.

        `min_snr_gamma` (None: DiT's unweighted ε-MSE) weights the ε-MSE by min(SNR_t, γ) / SNR_t (Min-SNR-γ,
        Hang et al. 2023; their γ = 5): steps with SNR above γ count less, so the high-noise steps that decide
        global structure and class get a larger share of the gradient. L_vb is never weighted.
        """
        if min_snr_gamma is not None and not (math.isfinite(min_snr_gamma) and min_snr_gamma > 0):
            raise ValueError(f"min_snr_gamma must be None or a positive number, got {min_snr_gamma!r}")
        self.min_snr_gamma = None if min_snr_gamma is None else float(min_snr_gamma)
        base_betas = betas_for_schedule(beta_schedule, num_timesteps)  # (T,)
        self.original_num_timesteps = num_timesteps
        self.beta_schedule = beta_schedule
        self.learn_sigma = bool(learn_sigma)
        self.sigma_small = bool(sigma_small)
        self.respacing = respacing
        if respacing is None or respacing == "":
            kept = list(range(num_timesteps))
            betas = base_betas
        else:
            kept = space_timesteps(num_timesteps, respacing)
            # improved DDPM's SpacedDiffusion: β_i = 1 − ᾱ_{S_i} / ᾱ_{S_{i−1}} keeps ᾱ at the kept steps.
            base_alphas_cumprod = np.cumprod(1.0 - base_betas)  # (T,)
            kept_alphas_cumprod = base_alphas_cumprod[kept]  # (T',)
            betas = 1.0 - kept_alphas_cumprod / np.append(1.0, kept_alphas_cumprod[:-1])  # (T',)
        if len(kept) < 2:
            raise ValueError(f"a diffusion needs at least 2 steps (log β̃_0 is clipped to log β̃_1), got {respacing!r}")
        self.num_timesteps = len(kept)
        self.timestep_map = torch.tensor(kept, dtype=torch.int64)  # (T',) respaced index -> original step

        alphas = 1.0 - betas  # (T',)
        alphas_cumprod = np.cumprod(alphas)  # (T',)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])  # (T',)
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)  # (T',) β̃_t
        # β̃_0 = 0: the log is clipped to β̃_1, as the original (only Σ's interpolation range uses it at t = 0).
        posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))  # (T',)
        fixed_large = np.append(posterior_variance[1], betas[1:])  # (T',)
        arrays = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1.0),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": posterior_log_variance_clipped,
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
            "log_betas": np.log(betas),
            "snr": alphas_cumprod / (1.0 - alphas_cumprod),  # ᾱ_t / (1 − ᾱ_t)
            # improved DDPM's FIXED_LARGE (DiT's choice without learned Σ) and FIXED_SMALL variances.
            "fixed_variance": posterior_variance if self.sigma_small else fixed_large,
            "fixed_log_variance": posterior_log_variance_clipped if self.sigma_small else np.log(fixed_large),
        }
        for name, value in arrays.items():
            setattr(self, name, torch.from_numpy(np.ascontiguousarray(value, dtype=np.float64)))  # (T',) float64

    def __repr__(self) -> str:
        """Readable summary for logs."""
        return (
            f"GaussianDiffusion(num_timesteps={self.original_num_timesteps}, beta_schedule={self.beta_schedule!r}, "
            f"learn_sigma={self.learn_sigma}, respacing={self.respacing!r}, sigma_small={self.sigma_small}, "
            f"min_snr_gamma={self.min_snr_gamma})"
        )

    def respaced(self, respacing: str | int | Sequence[int] | None) -> GaussianDiffusion:
        """The same base process (schedule, T, Σ choice) respaced to `respacing` (None: all original steps)."""
        return GaussianDiffusion(
            self.original_num_timesteps, self.beta_schedule, self.learn_sigma, respacing, self.sigma_small,
            self.min_snr_gamma,
        )

    # ----- helpers -------------------------------------------------------------------------
    @staticmethod
    def extract(arr: Tensor, t: Tensor, x: Tensor) -> Tensor:
        """arr[t] (float64 table, t (B,) int64) cast to x's dtype/device and shaped (B, 1, ..., 1) to broadcast on x."""
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        values = arr.to(t.device)[t].to(x.dtype)  # (B,)
        return values.reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, ..., 1)

    def net_timesteps(self, t: Tensor) -> Tensor:
        """Original step indices the network sees for respaced indices t (B,) (improved DDPM's _WrappedModel)."""
        return self.timestep_map.to(t.device)[t]  # (B,) int64

    def sample_timesteps(
        self, batch: int, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Training steps t ~ U{0, ..., T' − 1} (B,) int64, as improved DDPM's UniformSampler (DiT's choice)."""
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=device)  # (B,)

    def split_output(self, out: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Split the net output into ε̂ (B, C, ...) and the Σ interpolation values v (B, C, ...) or None."""
        channels = x.shape[1]
        expected = 2 * channels if self.learn_sigma else channels
        if out.shape[0] != x.shape[0] or out.shape[2:] != x.shape[2:] or out.shape[1] != expected:
            raise ValueError(
                f"network output {tuple(out.shape)} does not fit input {tuple(x.shape)}: expected {expected} channels "
                f"along dim 1 (learn_sigma={self.learn_sigma}); set the net's learn_sigma to match the diffusion's"
            )
        if not self.learn_sigma:
            return out, None
        eps, var_values = out.split(channels, dim=1)  # (B, C, ...) each
        return eps, var_values

    # ----- forward process and posterior ---------------------------------------------------
    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Draw x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε from q(x_t | x_0) (DDPM Eq. 4)."""
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must equal data shape {tuple(x_start.shape)}")
        return (
            self.extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + self.extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )  # (B, ...)

    def q_posterior_mean_variance(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean μ̃_t (B, ...), variance β̃_t and clipped log β̃_t (B, 1, ...) of q(x_{t−1} | x_t, x_0) (DDPM Eqs. 6–7)."""
        mean = (
            self.extract(self.posterior_mean_coef1, t, x_t) * x_start
            + self.extract(self.posterior_mean_coef2, t, x_t) * x_t
        )  # (B, ...)
        variance = self.extract(self.posterior_variance, t, x_t)  # (B, 1, ...)
        log_variance = self.extract(self.posterior_log_variance_clipped, t, x_t)  # (B, 1, ...)
        return mean, variance, log_variance

    def predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x̂_0 = x_t / √ᾱ_t − √(1/ᾱ_t − 1) ε̂."""
        return (
            self.extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self.extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )  # (B, ...)

    def predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
        """ε̂ = (x_t / √ᾱ_t − x̂_0) / √(1/ᾱ_t − 1) (used by DDIM after clipping x̂_0)."""
        return (self.extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart) / self.extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )  # (B, ...)

    # ----- reverse process -----------------------------------------------------------------
    def p_mean_variance(self, out: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool = False) -> dict[str, Tensor]:
        """Mean, variance, log-variance, x̂_0 and ε̂ of p_θ(x_{t−1} | x_t) from a net output `out` at respaced t.

        Learned Σ interpolates the logs of β_t and (clipped) β̃_t with frac = (v + 1) / 2 (improved DDPM Eq. 15);
        v is used as the net returns it, unclamped, as the original.
        """
        eps, var_values = self.split_output(out, x_t)  # (B, C, ...), (B, C, ...) or None
        if var_values is None:
            log_variance = self.extract(self.fixed_log_variance, t, x_t).expand_as(x_t)  # (B, ...)
        else:
            min_log = self.extract(self.posterior_log_variance_clipped, t, x_t)  # (B, 1, ...)
            max_log = self.extract(self.log_betas, t, x_t)  # (B, 1, ...)
            frac = (var_values + 1.0) / 2.0  # (B, C, ...)
            log_variance = frac * max_log + (1.0 - frac) * min_log  # (B, C, ...)
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)  # (B, ...)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)  # (B, ...)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)  # (B, ...)
        return {
            "mean": mean,
            "variance": torch.exp(log_variance),
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "eps": eps,
        }

    def vb_terms_bpd(self, out: Tensor, x_start: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """L_vb per sample (B,) in bits/dim: KL(q ‖ p_θ) for t > 0, decoder NLL −log p_θ(x_0 | x_1) at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)  # (B, ...), (B, 1, ...)
        p = self.p_mean_variance(out, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"])) / math.log(2.0)  # (B,)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=p["mean"], log_scales=0.5 * p["log_variance"]
        )  # (B, ...)
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)  # (B,)
        return torch.where(t == 0, decoder_nll, kl)  # (B,)

    def training_losses(
        self,
        net: Net,
        x_start: Tensor,
        y: Tensor,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample hybrid loss terms {"loss", "mse", "vb"}, each (B,), at respaced steps t (drawn if None).

        t and then the noise are drawn with `generator` on x_start's device when not given. Without learned Σ
        "vb" is zero and the loss is the ε-MSE (DDPM's L_simple). "mse" is unweighted; "loss" carries the
        Min-SNR weight when `min_snr_gamma` is set.
        """
        if t is None:
            t = self.sample_timesteps(x_start.shape[0], x_start.device, generator)  # (B,)
        if noise is None:
            noise = torch.randn(
                x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype
            )  # (B, ...)
        x_t = self.q_sample(x_start, t, noise)  # (B, ...)
        out = net(x_t, self.net_timesteps(t), y).to(x_start.dtype)  # (B, C_out, ...)
        eps, var_values = self.split_output(out, x_t)  # (B, C, ...), (B, C, ...) or None
        mse = mean_flat((noise - eps) ** 2)  # (B,)
        weighted_mse = mse
        if self.min_snr_gamma is not None:
            snr = self.extract(self.snr, t, mse)  # (B,)
            weighted_mse = mse * snr.clamp(max=self.min_snr_gamma) / snr  # (B,)
        if var_values is None:
            vb = torch.zeros_like(mse)  # (B,)
        else:
            # Stop-gradient on the mean (improved DDPM Sec. 3.1): L_vb trains only Σ, L_simple only ε.
            frozen = torch.cat([eps.detach(), var_values], dim=1)  # (B, 2C, ...)
            # Added UNSCALED, as DiT (loss_type MSE). The per-step term estimates L_vb / T, so at T = 1000 this is
            # improved DDPM's λ = 0.001; its RESCALED_MSE (T / 1000 factor, for other T) is not used by DiT.
            vb = self.vb_terms_bpd(frozen, x_start, x_t, t)  # (B,)
        return {"loss": weighted_mse + vb, "mse": mse, "vb": vb}
