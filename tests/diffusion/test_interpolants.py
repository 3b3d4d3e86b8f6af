"""Tests for SiT's interpolants (linear, GVP, VP): paths, targets, conversions, time intervals and losses."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from visgen.diffusion.interpolants import (
    GVPInterpolant,
    Interpolant,
    LinearInterpolant,
    VPInterpolant,
    velocity_channels,
)


def test_path_endpoints_are_noise_and_data() -> None:
    """x_t is exactly the noise at t = 0 and exactly the data at t = 1; the target is always x - eps."""
    gen = torch.Generator().manual_seed(0)
    x, noise = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)  # (B, C, H, W)
    path = LinearInterpolant()
    x_0, v_0 = path.path(x, noise, torch.zeros(2))
    x_1, v_1 = path.path(x, noise, torch.ones(2))
    assert torch.equal(x_0, noise) and torch.equal(x_1, x)
    assert torch.equal(v_0, x - noise) and torch.equal(v_1, x - noise)


def test_path_broadcasts_per_sample_time_and_target_is_time_derivative() -> None:
    """Each sample uses its own t over all trailing dims, and (x_{t+h} - x_{t-h}) / 2h equals the target."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 5, generator=gen, dtype=torch.float64)  # (B, C, L)
    noise = torch.randn(3, 2, 5, generator=gen, dtype=torch.float64)  # (B, C, L)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)  # (B,)
    path = LinearInterpolant()
    x_t, target = path.path(x, noise, t)
    for i in range(3):
        torch.testing.assert_close(x_t[i], t[i] * x[i] + (1 - t[i]) * noise[i])
    h = 1e-6
    numeric = (path.path(x, noise, t + h)[0] - path.path(x, noise, t - h)[0]) / (2 * h)  # (B, C, L)
    torch.testing.assert_close(numeric, target, rtol=1e-7, atol=1e-7)


def test_path_rejects_bad_shapes() -> None:
    """Mismatched noise or time shapes raise instead of silently broadcasting."""
    path, x = LinearInterpolant(), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="noise shape"):
        path.path(x, torch.zeros(2, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="t must have shape"):
        path.path(x, torch.zeros(2, 3), torch.zeros(2, 1))


def test_sample_time_range_dtype_and_reproducibility() -> None:
    """Times are U[0, 1) of shape (B,), reproducible through a generator or the global seed."""
    path = LinearInterpolant()
    t = path.sample_time(10_000, "cpu", torch.Generator().manual_seed(2))
    assert t.shape == (10_000,) and t.dtype == torch.float32
    assert float(t.min()) >= 0.0 and float(t.max()) < 1.0 and abs(float(t.mean()) - 0.5) < 0.02
    assert torch.equal(t, path.sample_time(10_000, "cpu", torch.Generator().manual_seed(2)))
    assert path.sample_time(4, "cpu", dtype=torch.float64).dtype == torch.float64
    torch.manual_seed(3)
    a = path.sample_time(5)
    torch.manual_seed(3)
    assert torch.equal(a, path.sample_time(5))


class OracleNet:
    """Returns the true velocity for the (t, noise) a same-seeded generator draws, checking its inputs."""

    def __init__(self, x: Tensor, seed: int, extra_channels: int = 0, offset: float = 0.0) -> None:
        """Replay the interpolant's draws to know the noise; optionally append learned-Sigma channels."""
        self.num_classes = 10
        self.x, self.extra, self.offset = x, extra_channels, offset
        self.t, self.noise = LinearInterpolant().draw(x, torch.Generator().manual_seed(seed))

    def __call__(self, x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        assert torch.equal(t, self.t)
        torch.testing.assert_close(x_t, LinearInterpolant().path(self.x, self.noise, t)[0], rtol=0, atol=0)
        v = self.x - self.noise + self.offset  # (B, C, H, W)
        sigma = torch.full_like(v[:, : self.extra], 123.0)  # (B, extra, H, W): ignored learned-Sigma channels
        return torch.cat([v, sigma], dim=1)  # (B, C + extra, H, W)


@pytest.mark.parametrize("extra_channels", [0, 3])
def test_training_loss_is_zero_for_the_true_velocity(extra_channels: int) -> None:
    """A net returning x - eps for the drawn noise gets exactly zero loss, learned-Sigma channels ignored."""
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(4))  # (B, C, H, W)
    y = torch.arange(4)  # (B,)
    net = OracleNet(x, seed=5, extra_channels=extra_channels)
    loss = LinearInterpolant().training_loss(net, x, y, generator=torch.Generator().manual_seed(5))
    assert loss.shape == (4,) and torch.equal(loss, torch.zeros(4))


def test_training_loss_is_per_sample_mse() -> None:
    """A constant velocity error of 0.5 gives a per-sample loss of 0.25."""
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    net = OracleNet(x, seed=7, offset=0.5)
    gen = torch.Generator().manual_seed(7)
    loss = LinearInterpolant().training_loss(net, x, torch.arange(4), generator=gen)
    torch.testing.assert_close(loss, torch.full((4,), 0.25, dtype=torch.float64))


def test_training_loss_global_rng_reproducible_and_differentiable() -> None:
    """Without a generator the global RNG is used (seedable), and gradients reach the net's parameters."""
    lin = nn.Linear(2, 2)

    def net(x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return lin(x_t) * t[:, None]  # (B, 2)

    x = torch.randn(8, 2)  # (B, 2)
    torch.manual_seed(11)
    a = LinearInterpolant().training_loss(net, x, torch.zeros(8, dtype=torch.int64))
    torch.manual_seed(11)
    b = LinearInterpolant().training_loss(net, x, torch.zeros(8, dtype=torch.int64))
    assert torch.equal(a, b) and a.shape == (8,)
    a.mean().backward()
    assert lin.weight.grad is not None and bool(lin.weight.grad.abs().sum() > 0)


def test_velocity_channels_rejects_incompatible_outputs() -> None:
    """Outputs with fewer channels or other spatial sizes than the input are an error."""
    x = torch.zeros(2, 4, 3, 3)
    assert velocity_channels(torch.zeros(2, 8, 3, 3), x).shape == x.shape
    with pytest.raises(ValueError, match="incompatible"):
        velocity_channels(torch.zeros(2, 3, 3, 3), x)
    with pytest.raises(ValueError, match="incompatible"):
        velocity_channels(torch.zeros(2, 4, 2, 3), x)


# ------------------------------------------------------------------------------------------- GVP and VP paths
PATHS = [LinearInterpolant, GVPInterpolant, VPInterpolant]
PREDICTIONS = ["velocity", "noise", "score", "data"]


def short_id(value: object) -> str:
    """Readable test id: 'GVP-noise' for an interpolant, str(value) otherwise."""
    if isinstance(value, Interpolant):
        return f"{type(value).__name__.removesuffix('Interpolant')}-{value.prediction}"
    return str(value)


def test_gvp_and_vp_coefficients_match_sit() -> None:
    """GVP is (sin, cos)(pi t / 2); VP is SiT's VPCPlan with beta in [0.1, 20], both variance preserving."""
    t = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)  # (T,)
    gvp, vp = GVPInterpolant(), VPInterpolant()
    torch.testing.assert_close(gvp.alpha(t), torch.sin(math.pi * t / 2))
    torch.testing.assert_close(gvp.sigma(t), torch.cos(math.pi * t / 2))
    log_mean = -0.25 * (1 - t) ** 2 * (20.0 - 0.1) - 0.5 * (1 - t) * 0.1  # (T,): SiT's log_mean_coeff
    torch.testing.assert_close(vp.alpha(t), torch.exp(log_mean))
    torch.testing.assert_close(vp.sigma(t), torch.sqrt(1 - torch.exp(2 * log_mean)))
    for path in (gvp, vp):
        torch.testing.assert_close(path.alpha(t) ** 2 + path.sigma(t) ** 2, torch.ones_like(t))
        assert float(path.alpha(t[-1:])) == 1.0 and abs(float(path.sigma(t[-1:]))) < 1e-15
    assert float(gvp.alpha(t[:1])) == 0.0 and float(gvp.sigma(t[:1])) == 1.0
    assert abs(float(vp.alpha(t[:1])) - math.exp(-(20.0 + 0.1) / 4)) < 1e-15  # 6.6e-3: t = 0 is ~N(0, I)
    torch.testing.assert_close(vp.beta(t), 0.1 + (1 - t) * 19.9)


@pytest.mark.parametrize("path", PATHS)
def test_derivatives_log_ratio_and_score_coefficient_are_consistent(path: type[Interpolant]) -> None:
    """alpha', sigma' match central differences; d log alpha = alpha'/alpha; g = d sigma^2 - sigma sigma'."""
    interp, t, h = path(), torch.linspace(0.02, 0.98, 25, dtype=torch.float64), 1e-6  # (T,)
    for f, df in ((interp.alpha, interp.d_alpha), (interp.sigma, interp.d_sigma)):
        torch.testing.assert_close(df(t), (f(t + h) - f(t - h)) / (2 * h), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(interp.d_log_alpha(t), interp.d_alpha(t) / interp.alpha(t))
    sigma = interp.sigma(t)
    expected = interp.d_alpha(t) / interp.alpha(t) * sigma**2 - sigma * interp.d_sigma(t)  # (T,)
    torch.testing.assert_close(interp.score_coefficient(t), expected)


@pytest.mark.parametrize("path", PATHS)
def test_prediction_conversions_are_exact(path: type[Interpolant]) -> None:
    """On x_t = alpha x + sigma eps: v <-> eps <-> s = -eps / sigma <- x convert exactly, at every t in (0, 1)
    (data predictions: wherever sigma is above the floor)."""
    gen = torch.Generator().manual_seed(12)
    x, eps = torch.randn(6, 3, 4, generator=gen, dtype=torch.float64), torch.randn(6, 3, 4, generator=gen)
    eps = eps.to(torch.float64)  # (B, C, L)
    t = torch.tensor([0.01, 0.1, 0.35, 0.6, 0.9, 0.99], dtype=torch.float64)  # (B,)
    interp = path(sigma_floor=1e-3)
    x_t, v = interp.path(x, eps, t)  # (B, C, L) each
    score = -eps / interp.sigma(t)[:, None, None]  # (B, C, L)
    tight = {"rtol": 1e-9, "atol": 1e-9}
    torch.testing.assert_close(interp.noise_from_velocity(v, x_t, t), eps, **tight)
    torch.testing.assert_close(interp.score_from_velocity(v, x_t, t), score, **tight)
    torch.testing.assert_close(interp.velocity_from_noise(eps, x_t, t), v, **tight)
    torch.testing.assert_close(interp.velocity_from_score(score, x_t, t), v, **tight)
    torch.testing.assert_close(interp.score_from_noise(eps, x_t, t), score, **tight)
    for prediction, out in (("velocity", v), ("noise", eps), ("score", score), ("data", x)):
        typed = path(prediction=prediction, sigma_floor=1e-3)
        padded = torch.cat([out, torch.full_like(out, 99.0)], dim=1)  # (B, 2C, L): learned-Sigma channels ignored
        torch.testing.assert_close(typed.velocity_from_output(padded, x_t, t), v, **tight)
        torch.testing.assert_close(typed.score_from_output(padded, x_t, t), score, **tight)
        torch.testing.assert_close(typed.target(x, eps, t), out, rtol=0, atol=0)


def test_velocity_to_score_is_finite_where_alpha_vanishes() -> None:
    """SiT's form ((1/d) v - x) / (...) gives the prior score -x at t = 0 on the linear and GVP paths."""
    x, v = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)  # (B, C)
    for interp in (LinearInterpolant(), GVPInterpolant()):
        torch.testing.assert_close(interp.score_from_velocity(v, x, torch.zeros(3, dtype=torch.float64)), -x)


class TargetOracle:
    """Returns the interpolant's true target for the (t, noise) a same-seeded generator draws."""

    num_classes = 10

    def __init__(self, interp: Interpolant, x: Tensor, seed: int, offset: float = 0.0) -> None:
        """Replay the interpolant's draws; `offset` adds a constant prediction error."""
        self.interp, self.x, self.offset = interp, x, offset
        self.t, self.noise = interp.draw(x, torch.Generator().manual_seed(seed))

    def __call__(self, x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        assert torch.equal(t, self.t)
        return self.interp.target(self.x, self.noise, t) + self.offset  # (B, C, H, W)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("loss_weight", [None, "velocity", "likelihood"])
def test_training_loss_is_zero_for_the_true_target(path: type[Interpolant], prediction: str, loss_weight: str) -> None:
    """A net returning the true velocity, eps, -eps / sigma or data gets zero loss under any path and weighting
    (the likelihood weighting is not defined for data prediction, and is refused)."""
    x = torch.randn(8, 3, 2, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)  # (B, C, H, W)
    if (prediction, loss_weight) == ("data", "likelihood"):
        with pytest.raises(ValueError, match="likelihood"):
            path(prediction=prediction, loss_weight=loss_weight)
        return
    interp = path(prediction=prediction, loss_weight=loss_weight)
    net = TargetOracle(interp, x, seed=5)
    loss = interp.training_loss(net, x, torch.arange(8), generator=torch.Generator().manual_seed(5))
    assert loss.shape == (8,)
    torch.testing.assert_close(loss, torch.zeros(8, dtype=torch.float64), rtol=0, atol=1e-20)


@pytest.mark.parametrize("path", PATHS)
def test_noise_and_score_losses_follow_sit_weighting(path: type[Interpolant]) -> None:
    """Constant error delta: noise loss w delta^2; score loss w sigma^2 delta^2 (SiT: |sigma s + eps|^2)."""
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)  # (B, C)
    for loss_weight in (None, "velocity", "likelihood"):
        for prediction in ("noise", "score"):
            interp = path(prediction=prediction, loss_weight=loss_weight)
            net = TargetOracle(interp, x, seed=7, offset=0.5)
            loss = interp.training_loss(net, x, torch.arange(8), generator=torch.Generator().manual_seed(7))
            g, sigma = interp.score_coefficient(net.t), interp.sigma(net.t)  # (B,) each
            weight = {None: 1.0, "velocity": (g / sigma) ** 2, "likelihood": g / sigma**2}[loss_weight]
            scale = 1.0 if prediction == "noise" else sigma**2
            torch.testing.assert_close(loss, weight * scale * 0.25 * torch.ones(8, dtype=torch.float64))


@pytest.mark.parametrize(
    ("interp", "train", "sample", "sde"),
    [
        (LinearInterpolant(), (0.0, 1.0), (0.0, 1.0), (0.0, 0.96)),
        (GVPInterpolant(), (0.0, 1.0), (0.0, 1.0), (0.0, 0.96)),
        (LinearInterpolant(prediction="noise"), (1e-3, 1 - 1e-3), (1e-3, 1 - 1e-3), (1e-3, 0.96)),
        (GVPInterpolant(prediction="score"), (1e-3, 1 - 1e-3), (1e-3, 1 - 1e-3), (1e-3, 0.96)),
        (VPInterpolant(), (0.0, 1 - 1e-5), (0.0, 1 - 1e-3), (0.0, 0.96)),
        (VPInterpolant(prediction="noise"), (0.0, 1 - 1e-5), (0.0, 1 - 1e-3), (0.0, 0.96)),
    ],
    ids=short_id,
)
def test_time_intervals_follow_sit_check_interval(
    interp: Interpolant, train: tuple[float, float], sample: tuple[float, float], sde: tuple[float, float]
) -> None:
    """Training, ODE and SDE (last step 0.04) intervals are SiT's; training times are uniform on them."""
    torch.testing.assert_close(interp.time_interval(sampling=False), train, rtol=0, atol=1e-15)
    torch.testing.assert_close(interp.time_interval(sampling=True), sample, rtol=0, atol=1e-15)
    got = interp.time_interval(sampling=True, sde=True, last_step_size=0.04)
    torch.testing.assert_close(got, sde, rtol=0, atol=1e-15)
    t = interp.sample_time(20_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert train[0] <= float(t.min()) and float(t.max()) < train[1]
    assert abs(float(t.mean()) - sum(train) / 2) < 0.01


def test_sbdm_diffusion_starts_sde_at_eps_and_forms_match_sit() -> None:
    """SBDM-form SDEs start at sample_eps; w(t) forms: constant, SBDM = g, sigma, linear, (in/de)creasing."""
    interp = GVPInterpolant(sample_eps=0.01)
    assert interp.time_interval(sampling=True, sde=True, diffusion_form="SBDM", last_step_size=0.04) == (0.01, 0.96)
    t = torch.tensor([0.2, 0.7], dtype=torch.float64)  # (T,)
    expected = {
        "constant": torch.full_like(t, 2.0),
        "SBDM": 2.0 * interp.score_coefficient(t),
        "sigma": 2.0 * interp.sigma(t),
        "linear": 2.0 * (1 - t),
        "decreasing": 0.25 * (2.0 * torch.cos(math.pi * t) + 1) ** 2,
        "increasing-decreasing": 2.0 * torch.sin(math.pi * t) ** 2,
    }
    for form, value in expected.items():
        torch.testing.assert_close(interp.diffusion(t, form, norm=2.0), value)
    with pytest.raises(ValueError, match="diffusion form"):
        interp.diffusion(t, "cosine")


def test_invalid_interpolant_arguments_raise() -> None:
    """Unknown prediction or weighting, bad margins and bad beta schedules are errors naming the value."""
    with pytest.raises(ValueError, match="prediction"):
        LinearInterpolant(prediction="x0")
    with pytest.raises(ValueError, match="loss_weight"):
        GVPInterpolant(loss_weight="snr")
    with pytest.raises(ValueError, match="sample_eps"):
        LinearInterpolant(sample_eps=0.7)
    with pytest.raises(ValueError, match="beta_min"):
        VPInterpolant(beta_min=5.0, beta_max=1.0)


# ------------------------------------------------------------------------------- data prediction (JiT) and time law
def test_data_prediction_is_jit_on_the_linear_path() -> None:
    """Linear path, data prediction: v = (x_theta - x_t) / max(1 - t, 0.05) and the 'velocity' loss equals JiT's
    v-loss |v(x_theta) - v(x)|^2 computed directly, including above t = 0.95 where the floor acts."""
    gen = torch.Generator().manual_seed(20)
    x = torch.randn(8, 3, 2, 2, generator=gen, dtype=torch.float64)  # (B, C, H, W)
    x_pred = x + 0.1 * torch.randn(8, 3, 2, 2, generator=gen, dtype=torch.float64)  # (B, C, H, W)
    interp = LinearInterpolant(prediction="data", loss_weight="velocity")
    t, noise = interp.draw(x, torch.Generator().manual_seed(21))  # (B,), (B, C, H, W)
    t = torch.cat([t[:6], torch.tensor([0.97, 1.0], dtype=torch.float64)])  # (B,): two times under the floor
    x_t = interp.path(x, noise, t)[0]  # (B, C, H, W)
    floor = (1 - t).clamp_min(0.05)[:, None, None, None]  # (B, 1, 1, 1)
    torch.testing.assert_close(interp.velocity_from_data(x_pred, x_t, t), (x_pred - x_t) / floor, rtol=1e-12, atol=0)
    jit_loss = (((x_pred - x_t) / floor - (x - x_t) / floor) ** 2).flatten(1).mean(1)  # (B,)
    ours = interp.loss_weighting(t) * (x_pred - x).pow(2).flatten(1).mean(1)  # (B,)
    torch.testing.assert_close(ours, jit_loss, rtol=1e-12, atol=0)

    class Fixed:
        num_classes = 10

        def __call__(self, z: Tensor, time: Tensor, y: Tensor) -> Tensor:
            return x_pred  # (B, C, H, W)

    loss = interp.training_loss(Fixed(), x, torch.arange(8), generator=torch.Generator().manual_seed(21))
    t_drawn = interp.draw(x, torch.Generator().manual_seed(21))[0]  # (B,)
    expected = (x_pred - x).pow(2).flatten(1).mean(1) / (1 - t_drawn).clamp_min(0.05) ** 2  # (B,)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    assert LinearInterpolant(prediction="data").time_interval(sampling=True) == (0.0, 1.0)


def test_data_prediction_conversions_stay_finite_at_t_one() -> None:
    """At t = 1 (sigma = 0) the floored conversions are finite on the linear and GVP paths (VP's sigma' diverges
    there, so VP never reaches t = 1): v = (x_theta - x_t) / 0.05 on the linear path."""
    x_t, x_pred = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)  # (B, C)
    for path in (LinearInterpolant, GVPInterpolant):
        interp = path(prediction="data")
        t = torch.ones(2, dtype=torch.float64)  # (B,)
        assert torch.isfinite(interp.velocity_from_output(x_pred, x_t, t)).all()
        assert torch.isfinite(interp.score_from_output(x_pred, x_t, t)).all()
    torch.testing.assert_close(
        LinearInterpolant(prediction="data").velocity_from_output(x_pred, x_t, torch.ones(2, dtype=torch.float64)),
        (x_pred - x_t) / 0.05,
    )


def test_logit_normal_time_sampling_matches_its_law() -> None:
    """time_sampling='logit_normal': logit(t) ~ N(m, s) within 4 standard errors (20k draws), mapped to the
    training interval, reproducible with a generator; uniform stays the default."""
    n, m, s = 20_000, -0.8, 0.8
    interp = LinearInterpolant(time_sampling="logit_normal", time_logit_mean=m, time_logit_std=s)
    t = interp.sample_time(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # (N,)
    assert 0.0 < float(t.min()) and float(t.max()) < 1.0
    logits = torch.logit(t)  # (N,)
    assert abs(float(logits.mean()) - m) < 4 * s / math.sqrt(n)
    assert abs(float(logits.std()) - s) < 4 * s / math.sqrt(2 * n)
    assert float((t < 0.5).double().mean()) > 0.8  # m = -0.8: most training steps at high noise (t = 0 is noise)
    assert torch.equal(t, interp.sample_time(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    noisy = LinearInterpolant(prediction="noise", time_sampling="logit_normal")  # interval (1e-3, 1 - 1e-3)
    t = noisy.sample_time(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # (N,)
    torch.testing.assert_close(torch.logit((t - 1e-3) / (1 - 2e-3)).mean(), torch.tensor(0.0, dtype=torch.float64),
                               rtol=0, atol=4 / math.sqrt(n))
    assert LinearInterpolant().time_sampling == "uniform"


def test_invalid_data_prediction_and_time_law_arguments_raise() -> None:
    """Unknown time laws, non-positive std and floors outside (0, 1) are errors naming the argument."""
    with pytest.raises(ValueError, match="time_sampling"):
        LinearInterpolant(time_sampling="lognormal")
    with pytest.raises(ValueError, match="time_logit_std"):
        LinearInterpolant(time_sampling="logit_normal", time_logit_std=0.0)
    with pytest.raises(ValueError, match="sigma_floor"):
        LinearInterpolant(prediction="data", sigma_floor=0.0)
    assert "logit_normal(-0.8, 0.8)" in repr(
        VPInterpolant(prediction="data", time_sampling="logit_normal", time_logit_mean=-0.8, time_logit_std=0.8)
    )
