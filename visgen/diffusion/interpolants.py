"""Stochastic interpolants between Gaussian noise and data, their training losses and prediction conversions.

Convention (SiT, "Scalable Interpolant Transformers", Ma et al. 2024), used by every flow model in visgen:

* time ``t`` lies in ``[0, 1]``; ``t = 0`` is Gaussian noise ``eps ~ N(0, I)``, ``t = 1`` is data ``x``;
* an interpolant is ``x_t = alpha(t) * x + sigma(t) * eps`` with ``alpha(1) = 1, sigma(1) = 0`` (and
  ``alpha(0) = 0, sigma(0) = 1`` for the linear and GVP paths; VP only approaches it, see ``VPInterpolant``);
* the velocity is ``v = d x_t / dt = alpha'(t) * x + sigma'(t) * eps`` (``x - eps`` for the linear path); the
  network receives ``t`` unscaled, as a float tensor of shape ``(B,)``;
* sampling integrates from ``t = 0`` to ``t = 1`` (see ``samplers.py`` and ``sde.py``).
DiT's integer steps (0..999, t = 0 the data) and REPA's t = 1 noise with velocity ``eps - x`` are converted to
this convention at their edges, never inside this module.

Paths (SiT ``transport/path.py``): linear ``ICPlan`` (alpha = t, sigma = 1 - t), ``GVPCPlan`` (alpha =
sin(pi t / 2), sigma = cos(pi t / 2)) and ``VPCPlan`` (the VP-SDE of Song et al. 2021 run backwards in time).

Prediction (SiT's ``model_type``): the network outputs the velocity ``v``, the noise ``eps`` or the score
``s = grad log p_t(x_t)``; the conditional targets are ``alpha' x + sigma' eps``, ``eps`` and ``-eps / sigma``.
``"data"`` (JiT, Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise") has the network output
the clean data ``x`` itself; with ``eps = (x_t - alpha x) / sigma`` it converts to

    v = ((alpha' sigma - sigma' alpha) x + sigma' x_t) / sigma_f,   s = -(x_t - alpha x) / sigma_f^2,

where ``sigma_f = max(sigma, sigma_floor)`` (JiT's ``t_eps = 0.05``: on the linear path ``v = (x - x_t) /
max(1 - t, 0.05)``, exactly JiT's). Above the floor these are exact; the floor keeps them finite at ``t = 1``,
where a data-predicting net's velocity is undefined, so ODE samplers end with an Euler step (JiT, EDM). JiT
applies the floor when sampling too, and so does visgen: a Heun step evaluated under it (on the linear path,
more than 20 uniform steps) takes JiT's approximation; a smaller ``sigma_floor`` makes it exact.
Every prediction converts to the others through the identities (``d = alpha' / alpha``, Tweedie
``E[x | x_t] = (x_t + sigma^2 s) / alpha`` and ``E[eps | x_t] = -sigma s``)

    v = d x_t + g s,   g = d sigma^2 - sigma sigma'   (SiT's ``compute_drift``; g = beta_t / 2 on VP)
    s = ((1 / d) v - x_t) / (sigma^2 - (1 / d) sigma' sigma),   eps = -sigma s

so one set of samplers serves all three. The SDE sampler needs ``s`` and a diffusion coefficient
``w(t)`` (``diffusion``): ``dX = [v + w s] dt + sqrt(2 w) dW`` has the same marginals as ``dX = v dt``.

Losses (SiT ``Transport.training_losses``, ``loss_weight=None`` by default): velocity ``|v_theta - v|^2`` (never
weighted); noise ``w_l |eps_theta - eps|^2``; score ``w_l |sigma s_theta + eps|^2`` (the score error weighted
by ``sigma^2``), with ``w_l = 1`` (``None``), ``(g / sigma)^2`` (``"velocity"``) or ``g / sigma^2``
(``"likelihood"``). ``"velocity"`` makes each loss the velocity error its prediction implies. Data prediction:
``w_l |x_theta - x|^2`` with ``w_l = 1`` or, for ``"velocity"``, ``((alpha' sigma - sigma' alpha) / sigma_f)^2``:
JiT's v-loss ``|v(x_theta) - v(x)|^2`` (``1 / max(1 - t, 0.05)^2`` on the linear path).

Training times (``time_sampling``): SiT draws ``t ~ U[t0, t1]``; ``"logit_normal"`` draws ``t = t0 + (t1 - t0)
sigmoid(m + s n)``, ``n ~ N(0, 1)`` (SD3, Esser et al. 2024; JiT uses ``m = -0.8, s = 0.8``, which in this time
convention puts most steps at high noise).

Time intervals (SiT ``create_transport`` and ``Transport.check_interval``): velocity prediction on the linear or
GVP path is stable everywhere (train and sample on ``[0, 1]``); noise or score prediction on those paths divides
by ``alpha`` at ``t = 0`` and by ``sigma`` at ``t = 1``, so it uses ``[eps, 1 - eps]`` with ``eps = 1e-3``; VP
has ``sigma' -> inf`` at ``t = 1`` and uses ``[0, 1 - eps]`` with ``eps = 1e-5`` in training and ``1e-3`` in
sampling. SDE sampling stops at ``1 - last_step_size`` instead (see ``time_interval``).

A network is any callable ``net(x, t, y) -> Tensor`` with ``x`` of shape ``(B, C, ...)``, ``t`` of shape ``(B,)``
and int64 labels ``y`` of shape ``(B,)``. Networks with learned-variance heads return ``2C`` channels along dim
1; flow code only reads the first ``x.shape[1]`` channels of the output and ignores the rest.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DIFFUSION_FORMS",
    "GVPInterpolant",
    "Interpolant",
    "LOSS_WEIGHTS",
    "LinearInterpolant",
    "PREDICTIONS",
    "TIME_SAMPLINGS",
    "VPInterpolant",
    "broadcast_time",
    "velocity_channels",
]

Net = Callable[[Tensor, Tensor, Tensor], Tensor]

PREDICTIONS = ("velocity", "noise", "score", "data")
LOSS_WEIGHTS = (None, "velocity", "likelihood")
TIME_SAMPLINGS = ("uniform", "logit_normal")
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")


def broadcast_time(t: Tensor, x: Tensor) -> Tensor:
    """Reshape per-sample times (B,) to (B, 1, ..., 1) so they broadcast against x (B, ...)."""
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, ..., 1)


def velocity_channels(out: Tensor, x: Tensor) -> Tensor:
    """Keep the first x.shape[1] output channels, dropping learned-Sigma channels of 2C-channel networks."""
    if out.shape[0] != x.shape[0] or out.shape[2:] != x.shape[2:] or out.shape[1] < x.shape[1]:
        raise ValueError(
            f"network output {tuple(out.shape)} is incompatible with input {tuple(x.shape)}: expected the "
            "same batch and spatial sizes and at least as many channels along dim 1"
        )
    return out[:, : x.shape[1]]  # (B, C, ...)


class Interpolant:
    """Base class for paths x_t = alpha(t) x + sigma(t) eps; subclasses define the coefficients.

    `prediction` is what the network outputs, `loss_weight` SiT's weighting of the loss, `train_eps` /
    `sample_eps` the distances kept from singular end points (None: SiT's per-path defaults), `time_sampling`
    (with `time_logit_mean`, `time_logit_std`) how training draws t, and `sigma_floor` JiT's floor on sigma when
    a data prediction is converted (data prediction only).
    """

    def __init__(
        self,
        prediction: str = "velocity",
        loss_weight: str | None = None,
        train_eps: float | None = None,
        sample_eps: float | None = None,
        time_sampling: str = "uniform",
        time_logit_mean: float = 0.0,
        time_logit_std: float = 1.0,
        sigma_floor: float = 0.05,
    ) -> None:
        """Validate and store the prediction type, loss weighting, margins and time law (Hydra-instantiable)."""
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; allowed: {', '.join(PREDICTIONS)}")
        if loss_weight not in LOSS_WEIGHTS:
            raise ValueError(f"unknown loss_weight {loss_weight!r}; allowed: None, velocity, likelihood")
        if prediction == "data" and loss_weight == "likelihood":
            raise ValueError(
                "loss_weight='likelihood' is defined for noise/score predictions; a data prediction trains with "
                "loss_weight=None (x-MSE) or 'velocity' (JiT's v-loss)"
            )
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time_sampling {time_sampling!r}; allowed: {', '.join(TIME_SAMPLINGS)}")
        if not (math.isfinite(time_logit_mean) and math.isfinite(time_logit_std) and time_logit_std > 0):
            raise ValueError(
                f"time_logit_mean must be finite and time_logit_std > 0, got {time_logit_mean}, {time_logit_std}"
            )
        if not 0.0 < sigma_floor < 1.0:
            raise ValueError(f"sigma_floor must lie in (0, 1), got {sigma_floor} (JiT's t_eps: 0.05)")
        # SiT's create_transport forces eps = 0 for velocity nets on linear/GVP even when given; here an explicit
        # value wins (None keeps SiT's default).
        default_train, default_sample = self.default_eps(prediction)
        self.prediction = prediction
        self.loss_weight = loss_weight
        self.time_sampling = time_sampling
        self.time_logit_mean, self.time_logit_std = float(time_logit_mean), float(time_logit_std)
        self.sigma_floor = float(sigma_floor)
        self.train_eps = default_train if train_eps is None else float(train_eps)
        self.sample_eps = default_sample if sample_eps is None else float(sample_eps)
        for name, eps in (("train_eps", self.train_eps), ("sample_eps", self.sample_eps)):
            if not 0.0 <= eps < 0.5:
                raise ValueError(f"{name} must lie in [0, 0.5), got {eps}")

    def __repr__(self) -> str:
        """Readable summary for logs."""
        time = self.time_sampling
        if time == "logit_normal":
            time += f"({self.time_logit_mean}, {self.time_logit_std})"
        floor = f", sigma_floor={self.sigma_floor}" if self.prediction == "data" else ""
        return (
            f"{type(self).__name__}(prediction={self.prediction!r}, loss_weight={self.loss_weight!r}, "
            f"train_eps={self.train_eps}, sample_eps={self.sample_eps}, time_sampling={time}{floor})"
        )

    # ------------------------------------------------------------------------------------------ coefficients
    def alpha(self, t: Tensor) -> Tensor:
        """Data coefficient alpha(t)."""
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        """Noise coefficient sigma(t)."""
        raise NotImplementedError

    def d_alpha(self, t: Tensor) -> Tensor:
        """Time derivative of alpha(t)."""
        raise NotImplementedError

    def d_sigma(self, t: Tensor) -> Tensor:
        """Time derivative of sigma(t)."""
        raise NotImplementedError

    def d_log_alpha(self, t: Tensor) -> Tensor:
        """alpha'(t) / alpha(t); subclasses give a closed form that stays finite where alpha is tiny."""
        return self.d_alpha(t) / self.alpha(t)

    def score_coefficient(self, t: Tensor) -> Tensor:
        """g(t) = d log alpha * sigma^2 - sigma sigma', the score's weight in v = (alpha'/alpha) x + g s."""
        sigma = self.sigma(t)
        return self.d_log_alpha(t) * sigma**2 - sigma * self.d_sigma(t)

    @staticmethod
    def default_eps(prediction: str) -> tuple[float, float]:
        """SiT's (train_eps, sample_eps) for linear/GVP: 0 for velocity (and data), 1e-3 for noise or score."""
        return (0.0, 0.0) if prediction in ("velocity", "data") else (1e-3, 1e-3)

    # ------------------------------------------------------------------------------------------- intervals
    def time_interval(
        self, *, sampling: bool, sde: bool = False, diffusion_form: str = "sigma", last_step_size: float = 0.0
    ) -> tuple[float, float]:
        """(t0, t1) for training or sampling, as SiT's `check_interval` for the linear and GVP paths.

        Velocity (and data) ODEs run on [0, 1]. Noise/score nets start at eps; SDEs (and SBDM-form diffusion) too.
        With `sde` and last_step_size > 0 the interval ends at 1 - last_step_size, where the last step takes over.
        """
        eps = self.sample_eps if sampling else self.train_eps
        stable = self.prediction in ("velocity", "data")
        if stable and not sde:
            return 0.0, 1.0
        t0 = eps if (sde and diffusion_form == "SBDM") or not stable else 0.0
        return t0, 1.0 - (last_step_size if sde and last_step_size > 0 else eps)

    # ----------------------------------------------------------------------------------------- conversions
    def score_from_velocity(self, velocity: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Score s = ((1/d) v - x) / (sigma^2 - (1/d) sigma' sigma), finite at alpha = 0 (SiT's form)."""
        tb = broadcast_time(t, x_t).to(x_t.dtype)  # (B, 1, ..., 1)
        ratio = 1.0 / self.d_log_alpha(tb)  # (B, 1, ..., 1): alpha / alpha'
        sigma = self.sigma(tb)  # (B, 1, ..., 1)
        return (ratio * velocity - x_t) / (sigma**2 - ratio * self.d_sigma(tb) * sigma)  # (B, C, ...)

    def noise_from_velocity(self, velocity: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Noise eps = -sigma s from a velocity (E[eps | x_t] for the exact field)."""
        sigma = self.sigma(broadcast_time(t, x_t).to(x_t.dtype))  # (B, 1, ..., 1)
        return -sigma * self.score_from_velocity(velocity, x_t, t)  # (B, C, ...)

    def velocity_from_score(self, score: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Velocity v = (alpha'/alpha) x + g s (probability-flow drift, SiT's `get_velocity_from_score`)."""
        tb = broadcast_time(t, x_t).to(x_t.dtype)  # (B, 1, ..., 1)
        return self.d_log_alpha(tb) * x_t + self.score_coefficient(tb) * score  # (B, C, ...)

    def velocity_from_noise(self, noise: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Velocity from a noise prediction through s = -eps / sigma."""
        return self.velocity_from_score(self.score_from_noise(noise, x_t, t), x_t, t)  # (B, C, ...)

    def score_from_noise(self, noise: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Score s = -eps / sigma."""
        return noise / -self.sigma(broadcast_time(t, x_t).to(x_t.dtype))  # (B, C, ...)

    def floored_sigma(self, tb: Tensor) -> Tensor:
        """sigma_f = max(sigma(t), sigma_floor) for times shaped to broadcast (JiT's clamp of 1 - t)."""
        return self.sigma(tb).clamp_min(self.sigma_floor)

    def velocity_data_coefficient(self, tb: Tensor) -> Tensor:
        """alpha' sigma - sigma' alpha: v = (this * x + sigma' x_t) / sigma (1 on the linear path, pi/2 on GVP)."""
        return self.d_alpha(tb) * self.sigma(tb) - self.d_sigma(tb) * self.alpha(tb)

    def velocity_from_data(self, data: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Velocity ((alpha' sigma - sigma' alpha) x + sigma' x_t) / sigma_f from a data prediction x (JiT)."""
        tb = broadcast_time(t, x_t).to(x_t.dtype)  # (B, 1, ..., 1)
        return (self.velocity_data_coefficient(tb) * data + self.d_sigma(tb) * x_t) / self.floored_sigma(tb)

    def score_from_data(self, data: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Score -(x_t - alpha x) / sigma_f^2 from a data prediction x (Tweedie's formula solved for s)."""
        tb = broadcast_time(t, x_t).to(x_t.dtype)  # (B, 1, ..., 1)
        return (self.alpha(tb) * data - x_t) / self.floored_sigma(tb) ** 2  # (B, C, ...)

    def velocity_from_output(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The velocity a network output (B, >=C, ...) of this interpolant's `prediction` type implies."""
        pred = velocity_channels(out, x_t)  # (B, C, ...)
        if self.prediction == "velocity":
            return pred
        if self.prediction == "noise":
            return self.velocity_from_noise(pred, x_t, t)  # (B, C, ...)
        if self.prediction == "data":
            return self.velocity_from_data(pred, x_t, t)  # (B, C, ...)
        return self.velocity_from_score(pred, x_t, t)  # (B, C, ...)

    def score_from_output(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The score a network output (B, >=C, ...) of this interpolant's `prediction` type implies."""
        pred = velocity_channels(out, x_t)  # (B, C, ...)
        if self.prediction == "velocity":
            return self.score_from_velocity(pred, x_t, t)  # (B, C, ...)
        if self.prediction == "noise":
            return self.score_from_noise(pred, x_t, t)  # (B, C, ...)
        if self.prediction == "data":
            return self.score_from_data(pred, x_t, t)  # (B, C, ...)
        return pred

    def diffusion(self, t: Tensor, form: str = "sigma", norm: float = 1.0) -> Tensor:
        """SDE diffusion coefficient w(t) in dX = [v + w s] dt + sqrt(2 w) dW (SiT's `compute_diffusion`)."""
        if form == "constant":
            return torch.full_like(t, norm)
        if form == "SBDM":
            return norm * self.score_coefficient(t)
        if form == "sigma":
            return norm * self.sigma(t)
        if form == "linear":
            return norm * (1.0 - t)
        if form == "decreasing":
            return 0.25 * (norm * torch.cos(math.pi * t) + 1.0) ** 2
        if form == "increasing-decreasing":  # SiT's dict spells it "inccreasing-decreasing", so SiT cannot select it
            return norm * torch.sin(math.pi * t) ** 2
        raise ValueError(f"unknown diffusion form {form!r}; allowed: {', '.join(DIFFUSION_FORMS)}")

    # ------------------------------------------------------------------------------------------- training
    def path(self, x: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Return the interpolated point x_t and the velocity target dx_t/dt for times t of shape (B,)."""
        if noise.shape != x.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must equal data shape {tuple(x.shape)}")
        tb = broadcast_time(t, x).to(x.dtype)  # (B, 1, ..., 1)
        x_t = self.alpha(tb) * x + self.sigma(tb) * noise  # (B, ...)
        target = self.d_alpha(tb) * x + self.d_sigma(tb) * noise  # (B, ...)
        return x_t, target

    def target(self, x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The conditional target of this `prediction`: velocity, eps, the score -eps / sigma, or the data."""
        if self.prediction == "velocity":
            return self.path(x, noise, t)[1]  # (B, ...)
        if self.prediction == "noise":
            return noise
        if self.prediction == "data":
            return x
        return self.score_from_noise(noise, x, t)  # (B, ...)

    def sample_time(
        self,
        batch: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Draw training times (B,) on [t0, t1) (`time_interval`) by `time_sampling`; a generator must live on
        `device`."""
        if self.time_sampling == "uniform":
            u = torch.rand(batch, generator=generator, device=device, dtype=dtype)  # (B,)
        else:
            n = torch.randn(batch, generator=generator, device=device, dtype=dtype)  # (B,)
            u = torch.sigmoid(self.time_logit_mean + self.time_logit_std * n)  # (B,)
        t0, t1 = self.time_interval(sampling=False)
        return u if (t0, t1) == (0.0, 1.0) else t0 + (t1 - t0) * u  # (B,)

    def draw(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw (t, noise), in this order, on x's device and dtype so a seeded generator reproduces them."""
        t = self.sample_time(x.shape[0], x.device, generator, x.dtype)  # (B,)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)  # (B, ...)
        return t, noise

    def loss_weighting(self, t: Tensor) -> Tensor:
        """Per-time weight of noise/score/data losses: 1, (g / sigma)^2 ("velocity") or g / sigma^2; for data
        prediction "velocity" is ((alpha' sigma - sigma' alpha) / sigma_f)^2, JiT's v-loss."""
        if self.loss_weight is None:
            return torch.ones_like(t)
        if self.prediction == "data":
            return (self.velocity_data_coefficient(t) / self.floored_sigma(t)) ** 2
        g, sigma = self.score_coefficient(t), self.sigma(t)
        return (g / sigma) ** 2 if self.loss_weight == "velocity" else g / sigma**2

    def training_loss(
        self, net: Net, x: Tensor, y: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """Per-sample MSE (B,) between the net's output and this prediction's target, SiT's weighting."""
        t, noise = self.draw(x, generator)  # (B,), (B, ...)
        x_t, velocity = self.path(x, noise, t)  # (B, ...), (B, ...)
        pred = velocity_channels(net(x_t, t, y), x)  # (B, ...)
        if self.prediction == "velocity":
            return (pred - velocity).pow(2).flatten(1).mean(dim=1)  # (B,)
        if self.prediction == "data":
            err = pred - x  # (B, ...)
        elif self.prediction == "noise":
            err = pred - noise  # (B, ...)
        else:
            err = self.sigma(broadcast_time(t, x)) * pred + noise  # (B, ...): sigma (s_theta + eps / sigma)
        return self.loss_weighting(t) * err.pow(2).flatten(1).mean(dim=1)  # (B,)


class LinearInterpolant(Interpolant):
    """SiT's linear path x_t = t x + (1 - t) eps with velocity target x - eps."""

    def alpha(self, t: Tensor) -> Tensor:
        """alpha(t) = t."""
        return t

    def sigma(self, t: Tensor) -> Tensor:
        """sigma(t) = 1 - t."""
        return 1.0 - t

    def d_alpha(self, t: Tensor) -> Tensor:
        """alpha'(t) = 1."""
        return torch.ones_like(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        """sigma'(t) = -1."""
        return -torch.ones_like(t)

    def d_log_alpha(self, t: Tensor) -> Tensor:
        """alpha'/alpha = 1 / t."""
        return 1.0 / t


class GVPInterpolant(Interpolant):
    """SiT's generalized variance-preserving path x_t = sin(pi t / 2) x + cos(pi t / 2) eps."""

    def alpha(self, t: Tensor) -> Tensor:
        """alpha(t) = sin(pi t / 2)."""
        return torch.sin(0.5 * math.pi * t)

    def sigma(self, t: Tensor) -> Tensor:
        """sigma(t) = cos(pi t / 2)."""
        return torch.cos(0.5 * math.pi * t)

    def d_alpha(self, t: Tensor) -> Tensor:
        """alpha'(t) = pi / 2 cos(pi t / 2)."""
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)

    def d_sigma(self, t: Tensor) -> Tensor:
        """sigma'(t) = -pi / 2 sin(pi t / 2)."""
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def d_log_alpha(self, t: Tensor) -> Tensor:
        """alpha'/alpha = pi / (2 tan(pi t / 2))."""
        return 0.5 * math.pi / torch.tan(0.5 * math.pi * t)


class VPInterpolant(Interpolant):
    """SiT's VP path: the VP-SDE (linear beta from beta_min to beta_max) in SiT's time, t = 1 the data.

    With s = 1 - t (Song et al.'s time, s = 0 the data) and beta(s) = beta_min + s (beta_max - beta_min):
    log alpha_t = -1/2 int_0^s beta = -1/4 (1 - t)^2 (beta_max - beta_min) - 1/2 (1 - t) beta_min and
    sigma_t = sqrt(1 - alpha_t^2). alpha_0 = exp(-(beta_max + beta_min) / 4) = 6.6e-3 for SiT's (0.1, 20),
    so t = 0 is N(0, I) only approximately (samplers start there all the same, as SiT does), and
    sigma'_t = -alpha_t^2 beta_t / (2 sigma_t) diverges at t = 1, hence the eps margins at that end.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, **interpolant_args: Any) -> None:
        """Store the beta schedule's end points (SiT's `VPCPlan(sigma_min=0.1, sigma_max=20)`); the other
        arguments are `Interpolant`'s."""
        if not 0.0 < beta_min <= beta_max:
            raise ValueError(f"need 0 < beta_min <= beta_max, got beta_min={beta_min}, beta_max={beta_max}")
        super().__init__(**interpolant_args)
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    @staticmethod
    def default_eps(prediction: str) -> tuple[float, float]:
        """SiT's VP margins: train_eps 1e-5, sample_eps 1e-3, whatever the prediction."""
        return 1e-5, 1e-3

    def beta(self, t: Tensor) -> Tensor:
        """beta at SiT time t: beta_min + (1 - t) (beta_max - beta_min)."""
        return self.beta_min + (1.0 - t) * (self.beta_max - self.beta_min)

    def log_alpha(self, t: Tensor) -> Tensor:
        """log alpha_t = -1/4 (1 - t)^2 (beta_max - beta_min) - 1/2 (1 - t) beta_min."""
        s = 1.0 - t
        return -0.25 * s**2 * (self.beta_max - self.beta_min) - 0.5 * s * self.beta_min

    def alpha(self, t: Tensor) -> Tensor:
        """alpha_t = exp(log alpha_t)."""
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: Tensor) -> Tensor:
        """sigma_t = sqrt(1 - alpha_t^2), through expm1 for accuracy near t = 1."""
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def d_log_alpha(self, t: Tensor) -> Tensor:
        """alpha'/alpha = beta_t / 2."""
        return 0.5 * self.beta(t)

    def d_alpha(self, t: Tensor) -> Tensor:
        """alpha'_t = alpha_t beta_t / 2."""
        return self.alpha(t) * self.d_log_alpha(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        """sigma'_t = -alpha_t alpha'_t / sigma_t."""
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)

    def score_coefficient(self, t: Tensor) -> Tensor:
        """g(t) = beta_t / 2 (SiT's VP `compute_drift`; equals the general formula, finite at t = 1)."""
        return 0.5 * self.beta(t)

    def time_interval(
        self, *, sampling: bool, sde: bool = False, diffusion_form: str = "sigma", last_step_size: float = 0.0
    ) -> tuple[float, float]:
        """(0, 1 - eps), or (0, 1 - last_step_size) for an SDE with a last step (SiT's `check_interval`)."""
        eps = self.sample_eps if sampling else self.train_eps
        return 0.0, 1.0 - (last_step_size if sde and last_step_size > 0 else eps)

    def __repr__(self) -> str:
        """Readable summary for logs, with the beta schedule."""
        return super().__repr__()[:-1] + f", beta_min={self.beta_min}, beta_max={self.beta_max})"
