"""SiT's SDE sampler: Euler-Maruyama on a marginal-preserving SDE, then one noise-free last step.

Convention as ``interpolants.py``: ``t = 0`` noise, ``t = 1`` data, integration runs forward in ``t``. For any
diffusion coefficient ``w(t) >= 0`` the SDE (SiT's SDE sampler, code ``transport.Sampler.sample_sde``)

    dX = [v(X, t) + w(t) s(X, t)] dt + sqrt(2 w(t)) dW

has the same marginals ``p_t`` as the probability-flow ODE ``dX = v dt``: in the Fokker-Planck equation the
extra drift contributes ``-div(p w grad log p) = -w lap p`` and the noise ``+w lap p``. ``v`` and the score ``s``
both come from one (guided) network output through the interpolant's conversions, so velocity, noise and score
nets all sample here. SiT's published SDE sampler (``python sample.py SDE`` defaults, ``train_utils.py``):
``diffusion_form="sigma"`` (``w(t) = sigma_t``), ``diffusion_norm=1``, Euler-Maruyama, ``num_steps=250``,
``last_step="Mean"``, ``last_step_size=0.04``.

Schedule, as SiT: ``(t0, t1) = interpolant.time_interval(sampling=True, sde=True, ...)`` (``(0, 0.96)`` for a
velocity net on the linear path); the grid ``linspace(t0, t1, num_steps)`` gives ``num_steps - 1``
Euler-Maruyama steps

    x_mean = x + [v + w s](x, t) dt,   x = x_mean + sqrt(2 w(t) dt) z,   z ~ N(0, I) drawn with the generator

and the last step from ``t1`` to ``t1 + last_step_size`` (``= 1``) is noise-free:

* ``"Mean"``: ``x + [v + w s](x, t1) * last_step_size`` (the Euler-Maruyama mean, no noise);
* ``"Euler"``: ``x + v(x, t1) * last_step_size`` (a probability-flow Euler step);
* ``"Tweedie"``: ``(x + sigma^2 s) / alpha`` at ``t1``, the posterior mean ``E[x_data | x_t1]``;
* ``None``: return ``x`` at ``t1`` unchanged (``last_step_size`` is then 0, so ``t1 = 1 - sample_eps``).

``num_steps`` NFE in all (``num_steps - 1`` with ``last_step=None``); a batched CFG call counts as one. The
``"Mean"`` step does not land exactly on the data distribution: for a Gaussian component it is an affine map of
``x_t1`` (see ``tests/diffusion/test_sde.py``, which checks samples against exactly that pushed-forward law).
Classifier-free guidance and the guidance interval work as in ``samplers.py``.

REPA's published sampler (sihyun-yu/REPA ``samplers.euler_maruyama_sampler``, ``generate.py --mode sde``) is this
one in visgen's time: its grid ``linspace(1, 0.04, 250)`` in its t = 1 noise time is ``1 - linspace(0, 0.96, 250)``,
its diffusion ``2 t`` and drift ``v - t s`` are ``w = sigma_t = 1 - t`` here (``diffusion_form="sigma"``), its last
step from 0.04 to 0 is ``"Mean"``, and its guidance interval ``t <= 0.7`` is ``[0.3, 1]`` here. It keeps the state
in float64 and calls the net in the net's dtype: ``state_dtype="float64"`` (``conf/sampling/repa_sde.yaml``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from visgen.diffusion.interpolants import DIFFUSION_FORMS, Interpolant, broadcast_time
from visgen.diffusion.samplers import FlowSampler, Net, _check_positive_int

__all__ = ["LAST_STEPS", "SDESampler"]

LAST_STEPS = ("Mean", "Euler", "Tweedie", None)


class SDESampler(FlowSampler):
    """Euler-Maruyama sampler of dX = [v + w s] dt + sqrt(2 w) dW from t0 ~ 0 to t1 = 1 - last_step_size."""

    def __init__(
        self,
        num_steps: int = 250,
        cfg_scale: float = 1.0,
        guidance_interval: Sequence[float] = (0.0, 1.0),
        guided_channels: int | None = None,
        interpolant: Interpolant | None = None,
        diffusion_form: str = "sigma",
        diffusion_norm: float = 1.0,
        last_step: str | None = "Mean",
        last_step_size: float = 0.04,
        state_dtype: str | None = None,
    ) -> None:
        """Store and validate SiT's SDE settings (Hydra-instantiable; defaults are SiT's published ones).

        `state_dtype` ("float64", REPA's) keeps x, the noise and the conversions in that dtype while the net runs
        in its parameters' dtype; None keeps everything in the prior's dtype (SiT)."""
        _check_positive_int("num_steps", num_steps)
        if num_steps < 2:
            raise ValueError(f"num_steps must be >= 2 (a grid of num_steps times from t0 to t1), got {num_steps}")
        if diffusion_form not in DIFFUSION_FORMS:
            raise ValueError(f"unknown diffusion_form {diffusion_form!r}; allowed: {', '.join(DIFFUSION_FORMS)}")
        diffusion_norm = float(diffusion_norm)
        if not math.isfinite(diffusion_norm) or diffusion_norm < 0:
            raise ValueError(f"diffusion_norm must be a finite number >= 0, got {diffusion_norm}")
        if last_step not in LAST_STEPS:
            raise ValueError(f"unknown last_step {last_step!r}; allowed: Mean, Euler, Tweedie, None")
        last_step_size = 0.0 if last_step is None else float(last_step_size)  # SiT: no last step, no gap
        if not 0.0 <= last_step_size < 1.0:
            raise ValueError(f"last_step_size must lie in [0, 1), got {last_step_size}")
        state = None if state_dtype is None else getattr(torch, str(state_dtype), None)
        if state_dtype is not None and not (isinstance(state, torch.dtype) and state.is_floating_point):
            raise ValueError(f"sampling.state_dtype={state_dtype!r} is not a torch floating dtype (e.g. float64)")
        super().__init__(cfg_scale, guidance_interval, guided_channels, interpolant)
        self.num_steps = num_steps
        self.diffusion_form = diffusion_form
        self.diffusion_norm = diffusion_norm
        self.last_step = last_step
        self.last_step_size = last_step_size
        self.state_dtype = state
        t0, t1 = self.interval()
        if not t0 < t1:
            raise ValueError(f"empty SDE interval ({t0}, {t1}): last_step_size or sample_eps is too large")

    def __repr__(self) -> str:
        """Readable summary for logs."""
        return (
            f"SDESampler(num_steps={self.num_steps}, cfg_scale={self.cfg_scale}, "
            f"guidance_interval={self.guidance_interval}, guided_channels={self.guided_channels}, "
            f"interpolant={self.interpolant!r}, diffusion_form={self.diffusion_form!r}, "
            f"diffusion_norm={self.diffusion_norm}, last_step={self.last_step!r}, "
            f"last_step_size={self.last_step_size}, state_dtype={self.state_dtype})"
        )

    @property
    def nfe(self) -> int:
        """Network evaluations per sample: num_steps - 1 stochastic steps plus the last step (if any)."""
        return self.num_steps - (1 if self.last_step is None else 0)

    def interval(self) -> tuple[float, float]:
        """(t0, t1) of the stochastic part, SiT's `check_interval(sde=True, eval=True)`."""
        return self.interpolant.time_interval(
            sampling=True, sde=True, diffusion_form=self.diffusion_form, last_step_size=self.last_step_size
        )

    def timesteps(self, device: torch.device | str | None = None) -> Tensor:
        """SiT's grid linspace(t0, t1, num_steps), shape (num_steps,), float64; steps start at all but the last."""
        t0, t1 = self.interval()
        return torch.linspace(t0, t1, self.num_steps, dtype=torch.float64, device=device)  # (N,)

    def diffusion(self, x: Tensor, t: float) -> Tensor:
        """w(t) of the configured form, shaped (B, 1, ..., 1) to broadcast against x (B, C, ...)."""
        t_vec = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)  # (B,)
        return self.interpolant.diffusion(broadcast_time(t_vec, x), self.diffusion_form, self.diffusion_norm)

    def output(self, net: Net, x: Tensor, t: float, labels: Tensor) -> Tensor:
        """Guided net output (B, C, ...) in x's dtype; a `state_dtype` state is cast to the net's dtype for the call
        (REPA: model(x.to(float32), t.to(float32)).to(float64))."""
        if self.state_dtype is None or x.dtype != self.state_dtype:
            return super().output(net, x, t, labels)
        net_dtype = next((p.dtype for p in getattr(net, "parameters", tuple)()), torch.get_default_dtype())
        return super().output(net, x.to(net_dtype), t, labels).to(x.dtype)  # (B, C, ...)

    def velocity_and_score(self, net: Net, x: Tensor, t: float, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Guided velocity and score at scalar time t from one (batched-CFG) network call, each (B, C, ...)."""
        out = self.output(net, x, t, labels)  # (B, C, ...)
        t_vec = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)  # (B,)
        velocity = self.interpolant.velocity_from_output(out, x, t_vec)  # (B, C, ...)
        return velocity, self.interpolant.score_from_output(out, x, t_vec)  # (B, C, ...) each

    def drift(self, net: Net, x: Tensor, t: float, labels: Tensor) -> Tensor:
        """SDE drift v + w s at scalar time t, (B, C, ...)."""
        velocity, score = self.velocity_and_score(net, x, t, labels)  # (B, C, ...) each
        return velocity + self.diffusion(x, t) * score  # (B, C, ...)

    def noise_scale(self, x: Tensor, t: float) -> Tensor:
        """Standard deviation per unit sqrt(dt) of the injected noise, sqrt(2 w(t)), (B, 1, ..., 1)."""
        return torch.sqrt(2.0 * self.diffusion(x, t))

    def step(
        self, net: Net, x: Tensor, t: float, dt: float, labels: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        """One Euler-Maruyama step of size dt from t: mean x + drift dt, plus sqrt(2 w dt) z."""
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)  # (B, C, ...)
        x_mean = x + dt * self.drift(net, x, t, labels)  # (B, C, ...)
        return x_mean + math.sqrt(dt) * self.noise_scale(x, t) * z  # (B, C, ...)

    def final_step(self, net: Net, x: Tensor, t: float, labels: Tensor) -> Tensor:
        """SiT's noise-free last step from t1 (Mean, Euler, Tweedie, or none)."""
        if self.last_step is None:
            return x
        if self.last_step == "Mean":
            return x + self.last_step_size * self.drift(net, x, t, labels)  # (B, C, ...)
        if self.last_step == "Euler":
            return x + self.last_step_size * self.velocity(net, x, t, labels)  # (B, C, ...)
        _, score = self.velocity_and_score(net, x, t, labels)  # (B, C, ...)
        t_vec = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)  # (B,)
        tb = broadcast_time(t_vec, x)  # (B, 1, ..., 1)
        return (x + self.interpolant.sigma(tb) ** 2 * score) / self.interpolant.alpha(tb)  # (B, C, ...): Tweedie

    @torch.no_grad()
    def __call__(
        self,
        net: Net,
        labels: Tensor,
        latent_shape: Sequence[int],
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Sample (B, *latent_shape): x ~ N(0, I), then all noise, drawn with `generator` on labels' device."""
        x = self.prior(net, labels, latent_shape, generator, dtype)  # (B, *latent_shape)
        out_dtype = x.dtype
        if self.state_dtype is not None:
            x = x.to(self.state_dtype)  # REPA: the float32 prior, then float64 from there on
        times = self.timesteps().tolist()
        dt = times[1] - times[0]
        for t in times[:-1]:
            x = self.step(net, x, t, dt, labels, generator)  # (B, *latent_shape)
        return self.final_step(net, x, times[-1], labels).to(out_dtype)  # (B, *latent_shape)
