"""ODE samplers (Euler, Heun, adaptive dopri5) for interpolant flow models, with classifier-free guidance.

Convention (SiT, Ma et al. 2024; see ``interpolants.py``): ``t = 0`` is Gaussian noise, ``t = 1`` is data. The
network ``net(x, t, y)`` predicts the velocity, the noise, the score or the data (the interpolant's
``prediction``); every output is converted to the velocity ``v(x, t)`` by the interpolant, so one integrator
serves all four. Sampling draws ``x ~ N(0, I)`` at ``t0`` and integrates the probability-flow ODE
``dx/dt = v(x, t)`` up to ``t1``, where ``(t0, t1) = interpolant.time_interval(sampling=True)``: ``(0, 1)`` for
velocity and data nets on the linear/GVP paths, ``(1e-3, 1 - 1e-3)`` for noise/score nets there and
``(0, 1 - 1e-3)`` on VP (SiT's ``check_interval``).

* Euler on the uniform grid ``t_i = t0 + (t1 - t0) i / N`` (or, with ``time_shift = s``, SD3's shifted one,
  ``u_i = i / N`` mapped to ``u_i / (s - (s - 1) u_i)``): ``x_{i+1} = x_i + dt v(x_i, t_i)`` (``N`` NFE).
* Heun (explicit trapezoid, 2nd order): predictor ``x~ = x_i + dt v(x_i, t_i)``, corrector
  ``x_{i+1} = x_i + dt / 2 (v(x_i, t_i) + v(x~, t_{i+1}))`` (``2N`` NFE). EDM (Karras et al. 2022) falls back to
  Euler on its last step because its correction would need the denoiser at sigma = 0; for velocity, noise and
  score nets ``t1`` is in the training range (the exact linear-path field at ``t = 1`` is ``v(x, 1) = x - E[eps]
  = x``), so Heun is applied on every step including the last. A data-predicting net's velocity is undefined at
  ``sigma = 0``, so there the last step is Euler, as in JiT and EDM (``2N - 1`` NFE); on the linear path it lands
  exactly on the net's data prediction.
* dopri5 (SiT's published ODE sampler: ``torchdiffeq.odeint``, ``atol=1e-6``, ``rtol=1e-3``): adaptive
  Dormand-Prince 5(4); ``num_steps`` is ignored and the NFE of the last call is in ``last_nfe``. The step-size
  control uses torchdiffeq's RMS norm over the whole batch, as SiT does.

SiT's fixed-step ODEs call torchdiffeq on ``linspace(t0, t1, num_steps)`` (``num_steps - 1`` steps); here
``num_steps`` is the number of steps.

Classifier-free guidance (Ho & Salimans 2022) goes through ``guidance.guided_output``: the label
``net.num_classes`` is the null class, the conditional and unconditional halves run in one batched forward and
the output is ``out_u + s (out_c - out_u)``. It is applied to the raw network output (velocity, noise or score);
each conversion to the velocity is affine in the output and guidance is an affine combination (weights 1 - s
and s), so this equals guiding the velocity (as SiT's ``forward_with_cfg`` guides whatever the net predicts).
Guidance applies only when ``t`` lies in the closed ``guidance_interval`` (Kynkaenniemi et al. 2024; in
visgen's time, so REPA's interval ``[a, b]`` in its t = 1 noise time is ``[1 - b, 1 - a]`` here) and, when
``guided_channels`` is given, only to the first ``guided_channels`` channels. Networks with ``num_classes == 0``
are unconditional and never guided. Labels may include the null label to draw unconditional samples. Networks
returning ``2C`` channels (learned Sigma) have only their first ``C = x.shape[1]`` output channels read.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from visgen.diffusion.guidance import draw_prior, guided_output, net_num_classes
from visgen.diffusion.interpolants import Interpolant, LinearInterpolant, velocity_channels
from visgen.sampling import Sampler

__all__ = ["FlowSampler", "ODESampler", "guided_velocity", "net_num_classes"]

Net = Callable[[Tensor, Tensor, Tensor], Tensor]

METHODS = ("euler", "heun", "dopri5")


def _check_interval(interval: Sequence[float]) -> tuple[float, float]:
    """Validate a guidance interval (lo, hi) with 0 <= lo <= hi <= 1 and return it as floats."""
    if len(interval) != 2:
        raise ValueError(f"guidance_interval must be a pair (lo, hi), got {interval!r}")
    lo, hi = float(interval[0]), float(interval[1])
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"guidance_interval must satisfy 0 <= lo <= hi <= 1, got ({lo}, {hi})")
    return lo, hi


def _check_positive_int(name: str, value: int) -> int:
    """Reject bools, non-ints and values < 1 with a message naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def guided_output_channels(
    net: Net,
    x: Tensor,
    t: Tensor,
    y: Tensor,
    cfg_scale: float = 1.0,
    guidance_interval: Sequence[float] = (0.0, 1.0),
    guided_channels: int | None = None,
) -> Tensor:
    """The net's first C output channels (B, C, ...) with CFG inside `guidance_interval`, one batched call."""
    lo, hi = _check_interval(guidance_interval)
    in_interval = (t >= lo) & (t <= hi)  # (B,)
    return velocity_channels(guided_output(net, x, t, y, cfg_scale, in_interval, guided_channels), x)  # (B, C, ...)


def guided_velocity(
    net: Net,
    x: Tensor,
    t: Tensor,
    y: Tensor,
    cfg_scale: float = 1.0,
    guidance_interval: Sequence[float] = (0.0, 1.0),
    guided_channels: int | None = None,
    interpolant: Interpolant | None = None,
) -> Tensor:
    """Velocity v(x, t | y) with CFG inside `guidance_interval`; `interpolant` converts noise/score outputs."""
    out = guided_output_channels(net, x, t, y, cfg_scale, guidance_interval, guided_channels)  # (B, C, ...)
    if interpolant is None or interpolant.prediction == "velocity":
        return out
    return interpolant.velocity_from_output(out, x, t)  # (B, C, ...)


class FlowSampler(Sampler):
    """Shared settings and checks of the flow samplers: guidance, interpolant, label validation, x ~ N(0, I)."""

    def __init__(
        self,
        cfg_scale: float = 1.0,
        guidance_interval: Sequence[float] = (0.0, 1.0),
        guided_channels: int | None = None,
        interpolant: Interpolant | None = None,
    ) -> None:
        """Validate and store the guidance settings and the path (default: linear path, velocity nets)."""
        cfg_scale = float(cfg_scale)
        if not math.isfinite(cfg_scale) or cfg_scale < 0:
            raise ValueError(f"cfg_scale must be a finite number >= 0, got {cfg_scale}")
        if guided_channels is not None:
            _check_positive_int("guided_channels", guided_channels)
        if interpolant is not None and not isinstance(interpolant, Interpolant):
            raise ValueError(f"interpolant must be a visgen Interpolant, got {type(interpolant).__name__}")
        self.cfg_scale = cfg_scale
        self.guidance_interval = _check_interval(guidance_interval)
        self.guided_channels = guided_channels
        self.interpolant = interpolant if interpolant is not None else LinearInterpolant()

    def output(self, net: Net, x: Tensor, t: float, labels: Tensor) -> Tensor:
        """Guided raw network output (B, C, ...) at a scalar time t for the whole batch x."""
        t_vec = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)  # (B,)
        return guided_output_channels(
            net, x, t_vec, labels, self.cfg_scale, self.guidance_interval, self.guided_channels
        )  # (B, C, ...)

    def velocity(self, net: Net, x: Tensor, t: float, labels: Tensor) -> Tensor:
        """Guided velocity at a scalar time t for the whole batch x (B, C, ...)."""
        out = self.output(net, x, t, labels)  # (B, C, ...)
        if self.interpolant.prediction == "velocity":
            return out
        t_vec = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)  # (B,)
        return self.interpolant.velocity_from_output(out, x, t_vec)  # (B, C, ...)

    def prior(
        self,
        net: Net,
        labels: Tensor,
        latent_shape: Sequence[int],
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Check labels and shapes, then draw x ~ N(0, I) of shape (B, *latent_shape) with `generator`."""
        return draw_prior(net, labels, latent_shape, self.guided_channels, generator, dtype)  # (B, *latent_shape)


class ODESampler(FlowSampler):
    """Integrator of dx/dt = v(x, t) from noise (t0 ~ 0) to data (t1 ~ 1): uniform Euler/Heun or dopri5."""

    def __init__(
        self,
        method: str = "heun",
        num_steps: int = 50,
        cfg_scale: float = 1.0,
        guidance_interval: Sequence[float] = (0.0, 1.0),
        guided_channels: int | None = None,
        interpolant: Interpolant | None = None,
        atol: float = 1e-6,
        rtol: float = 1e-3,
        time_shift: float = 1.0,
    ) -> None:
        """Store and validate the integration and guidance settings (Hydra-instantiable)."""
        if method not in METHODS:
            raise ValueError(f"unknown ODE method {method!r}; allowed: {', '.join(METHODS)}")
        _check_positive_int("num_steps", num_steps)
        time_shift = float(time_shift)
        if not (math.isfinite(time_shift) and time_shift > 0):
            raise ValueError(f"time_shift must be a finite number > 0 (1 = uniform grid), got {time_shift}")
        if not (float(atol) > 0 and float(rtol) > 0):
            raise ValueError(f"atol and rtol must be > 0, got atol={atol}, rtol={rtol}")
        super().__init__(cfg_scale, guidance_interval, guided_channels, interpolant)
        if method == "dopri5" and self.euler_last_step:
            raise ValueError(
                "method='dopri5' evaluates the velocity at t = 1, where a data-predicting net's velocity is undefined "
                "(sigma = 0); use method=heun (its last step is Euler) or euler"
            )
        self.method = method
        self.num_steps = num_steps
        self.time_shift = time_shift
        self.atol, self.rtol = float(atol), float(rtol)
        self.last_nfe: int | None = None

    def __repr__(self) -> str:
        """Readable summary for logs."""
        tolerances = f", atol={self.atol}, rtol={self.rtol}" if self.method == "dopri5" else ""
        return (
            f"ODESampler(method={self.method!r}, num_steps={self.num_steps}, time_shift={self.time_shift}, "
            f"cfg_scale={self.cfg_scale}, "
            f"guidance_interval={self.guidance_interval}, guided_channels={self.guided_channels}, "
            f"interpolant={self.interpolant!r}{tolerances})"
        )

    @property
    def nfe(self) -> int | None:
        """Network evaluations per sample (a batched CFG call counts as one); None for adaptive dopri5."""
        if self.method == "dopri5":
            return None
        if self.method == "euler":
            return self.num_steps
        return 2 * self.num_steps - (1 if self.euler_last_step else 0)

    @property
    def euler_last_step(self) -> bool:
        """True when Heun's last corrector would need the velocity at sigma = 0: a data-predicting net."""
        return self.interpolant.prediction == "data"

    def timesteps(self, device: torch.device | str | None = None) -> Tensor:
        """Integration grid t0 < ... < t1 over the interpolant's sampling interval, (N + 1,), float64: uniform,
        or with `time_shift` s > 1 SD3's shift u -> u / (s - (s - 1) u) of the uniform fraction u, which spends
        more steps at high noise (t near 0 here; SD3 writes it for t = 1 noise)."""
        t0, t1 = self.interpolant.time_interval(sampling=True)
        u = torch.linspace(0.0, 1.0, self.num_steps + 1, dtype=torch.float64, device=device)  # (N+1,)
        u = u / (self.time_shift - (self.time_shift - 1.0) * u)  # (N+1,): ends stay 0 and 1; s = 1 leaves u exact
        return t0 + (t1 - t0) * u  # (N+1,)

    def step(self, net: Net, x: Tensor, t: float, t_next: float, labels: Tensor, last: bool = False) -> Tensor:
        """Advance x (B, C, ...) from t to t_next with one Euler or Heun step (Euler for a data net's `last`)."""
        dt = t_next - t
        v = self.velocity(net, x, t, labels)  # (B, C, ...)
        x_pred = x + dt * v  # (B, C, ...)
        if self.method == "euler" or (last and self.euler_last_step):
            return x_pred
        v_next = self.velocity(net, x_pred, t_next, labels)  # (B, C, ...)
        return x + (0.5 * dt) * (v + v_next)  # (B, C, ...)

    def integrate_adaptive(self, net: Net, x: Tensor, labels: Tensor) -> Tensor:
        """dopri5 from t0 to t1 with torchdiffeq (atol, rtol); records the NFE in `last_nfe`."""
        try:
            from torchdiffeq import odeint
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("method='dopri5' needs torchdiffeq: pip install torchdiffeq") from err
        t0, t1 = self.interpolant.time_interval(sampling=True)
        calls = 0

        def drift(t: Tensor, state: Tensor) -> Tensor:
            nonlocal calls
            calls += 1
            return self.velocity(net, state, float(t), labels)  # (B, C, ...)

        times = torch.tensor([t0, t1], dtype=torch.float64, device=x.device)  # (2,)
        # deviation: step_t=[t1] makes the last step land on t1 instead of overshooting it and interpolating
        # back (torchdiffeq's default, used by SiT) because VP and noise/score nets are undefined beyond t1.
        out = odeint(
            drift, x, times, method="dopri5", atol=self.atol, rtol=self.rtol, options={"step_t": times[1:]}
        )  # (2, B, C, ...)
        self.last_nfe = calls
        return out[-1]  # (B, C, ...)

    @torch.no_grad()
    def __call__(
        self,
        net: Net,
        labels: Tensor,
        latent_shape: Sequence[int],
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Sample (B, *latent_shape) from x ~ N(0, I) drawn with `generator` on labels' device."""
        x = self.prior(net, labels, latent_shape, generator, dtype)  # (B, *latent_shape)
        if self.method == "dopri5":
            return self.integrate_adaptive(net, x, labels)  # (B, *latent_shape)
        times = self.timesteps().tolist()
        for i, (t, t_next) in enumerate(itertools.pairwise(times)):
            x = self.step(net, x, t, t_next, labels, last=i == len(times) - 2)  # (B, *latent_shape)
        self.last_nfe = self.nfe
        return x
