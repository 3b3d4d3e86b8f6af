"""Tests for the ODE samplers and CFG: exact Gaussian-mixture flows on every path, broken samplers, CFG algebra."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from tests.diffusion.gmm import (
    COVS,
    MEANS,
    NUM_SAMPLES,
    WEIGHTS,
    GMMNet,
    PathGMMNet,
    check_gmm_samples,
    gmm_log_density,
    gmm_marginal_terms,
    gmm_path_terms,
    gmm_velocity,
    iid_mixture_samples,
    path_coefficients,
)
from visgen.diffusion.interpolants import GVPInterpolant, Interpolant, LinearInterpolant, VPInterpolant
from visgen.diffusion.samplers import ODESampler, guided_velocity

# The Gaussian-mixture helpers live in tests/diffusion/gmm.py; they are re-exported here for older imports.
__all__ = [
    "COVS",
    "GMMNet",
    "MEANS",
    "NUM_SAMPLES",
    "PathGMMNet",
    "WEIGHTS",
    "check_gmm_samples",
    "gmm_log_density",
    "gmm_marginal_terms",
    "gmm_path_terms",
    "gmm_velocity",
    "iid_mixture_samples",
    "path_coefficients",
    "sample_mixture",
]


def short_id(value: object) -> str:
    """Readable test id: 'GVP-noise' for an interpolant, str(value) otherwise."""
    if isinstance(value, Interpolant):
        return f"{type(value).__name__.removesuffix('Interpolant')}-{value.prediction}"
    return str(value)


def sample_mixture(sampler: ODESampler, net: GMMNet | PathGMMNet | None = None, seed: int = 0) -> Tensor:
    """Draw NUM_SAMPLES float64 points from the mixture flow with the given sampler."""
    labels = torch.zeros(NUM_SAMPLES, dtype=torch.int64)  # (N,)
    gen = torch.Generator().manual_seed(seed)
    return sampler(net or GMMNet(), labels, (2,), generator=gen, dtype=torch.float64)  # (N, 2)


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    """Run on one intra-op thread: the tensors are tiny and shared CPUs make extra threads slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------ exact velocity field
@pytest.mark.parametrize("t", [0.05, 0.3, 0.5, 0.8, 1.0])
def test_gmm_velocity_matches_score_identity(t: float) -> None:
    """Closed-form v equals (x + (1 - t) grad log p_t(x)) / t (Tweedie); score by finite differences."""
    gen = torch.Generator().manual_seed(1)
    x = 4.0 * torch.randn(256, 2, generator=gen, dtype=torch.float64)  # (B, 2), spans all modes and gaps
    tt = torch.full((256,), t, dtype=torch.float64)  # (B,)
    h = 1e-5
    grad = torch.stack(
        [
            (gmm_log_density(x + h * e, tt) - gmm_log_density(x - h * e, tt)) / (2 * h)
            for e in torch.eye(2, dtype=torch.float64)
        ],
        dim=1,
    )  # (B, 2)
    expected = (x + (1.0 - t) * grad) / t  # (B, 2)
    torch.testing.assert_close(gmm_velocity(x, tt), expected, rtol=1e-6, atol=1e-6)


def test_gmm_velocity_endpoints() -> None:
    """At t = 0 the velocity is E[x] - x_0 (x_0 is pure noise); at t = 1 it is x itself."""
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)  # (B, 2)
    zeros, ones = torch.zeros(64, dtype=torch.float64), torch.ones(64, dtype=torch.float64)
    torch.testing.assert_close(gmm_velocity(x, zeros), (WEIGHTS @ MEANS) - x)
    torch.testing.assert_close(gmm_velocity(x, ones), x)


def test_check_accepts_exact_samples_and_rejects_perturbed_ones() -> None:
    """The check passes i.i.d. mixture draws and flags 10% inflated covariances or slightly shifted means."""
    ok, reason = check_gmm_samples(iid_mixture_samples(NUM_SAMPLES, 3), WEIGHTS, MEANS, COVS)
    assert ok, reason
    assert not check_gmm_samples(iid_mixture_samples(NUM_SAMPLES, 3, cov_scale=1.1), WEIGHTS, MEANS, COVS)[0]
    assert not check_gmm_samples(iid_mixture_samples(NUM_SAMPLES, 3, shift=0.1), WEIGHTS, MEANS, COVS)[0]


def path_log_density(interpolant: Interpolant, x: Tensor, t: Tensor) -> Tensor:
    """log p_t(x) of the mixture under any interpolant, shape (B,)."""
    return torch.logsumexp(gmm_path_terms(x, *path_coefficients(interpolant, t), WEIGHTS, MEANS, COVS)[0], dim=0)


@pytest.mark.parametrize("path", [GVPInterpolant, VPInterpolant, LinearInterpolant])
@pytest.mark.parametrize("t", [0.05, 0.5, 0.95])
def test_path_gmm_score_and_velocity_match_finite_differences(path: type[Interpolant], t: float) -> None:
    """The closed-form score is grad log p_t (central differences) and v = (alpha'/alpha) x + g s on every path."""
    gen = torch.Generator().manual_seed(11)
    x = 4.0 * torch.randn(128, 2, generator=gen, dtype=torch.float64)  # (B, 2)
    tt = torch.full((128,), t, dtype=torch.float64)  # (B,)
    h, eye, y = 1e-5, torch.eye(2, dtype=torch.float64), torch.zeros(128, dtype=torch.int64)
    grad = torch.stack(
        [(path_log_density(path(), x + h * e, tt) - path_log_density(path(), x - h * e, tt)) / (2 * h) for e in eye],
        dim=1,
    )  # (B, 2)
    score = PathGMMNet(path(prediction="score"))(x, tt, y)  # (B, 2)
    torch.testing.assert_close(score, grad, rtol=1e-6, atol=1e-6)
    velocity = PathGMMNet(path())(x, tt, y)  # (B, 2)
    torch.testing.assert_close(velocity, path().velocity_from_score(score, x, tt), rtol=1e-9, atol=1e-9)
    noise = PathGMMNet(path(prediction="noise"))(x, tt, y)  # (B, 2)
    torch.testing.assert_close(noise, -path().sigma(tt)[:, None] * score, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------- samplers
def test_heun_sampler_matches_gaussian_mixture() -> None:
    """Heun with 50 steps (100 NFE) on the exact flow reproduces weights, means and covariances."""
    ok, reason = check_gmm_samples(sample_mixture(ODESampler("heun", 50)), WEIGHTS, MEANS, COVS)
    assert ok, reason


def test_euler_sampler_matches_gaussian_mixture() -> None:
    """Euler with 200 steps reproduces the mixture with the same tolerances (50 steps fails: see below)."""
    ok, reason = check_gmm_samples(sample_mixture(ODESampler("euler", 200)), WEIGHTS, MEANS, COVS)
    assert ok, reason


class FlippedCorrectorHeun(ODESampler):
    """Broken Heun: the corrector subtracts the end-point velocity instead of adding it."""

    def step(self, net: GMMNet, x: Tensor, t: float, t_next: float, labels: Tensor, last: bool = False) -> Tensor:
        dt = t_next - t
        v = self.velocity(net, x, t, labels)
        return x + 0.5 * dt * (v - self.velocity(net, x + dt * v, t_next, labels))


class StaleTimeHeun(ODESampler):
    """Broken Heun: the corrector evaluates the velocity at the old time t instead of t_next."""

    def step(self, net: GMMNet, x: Tensor, t: float, t_next: float, labels: Tensor, last: bool = False) -> Tensor:
        dt = t_next - t
        v = self.velocity(net, x, t, labels)
        return x + 0.5 * dt * (v + self.velocity(net, x + dt * v, t, labels))


class ReversedTimeSampler(ODESampler):
    """Broken sampler: integrates from t = 1 to t = 0 (the opposite direction of the convention)."""

    def timesteps(self, device: torch.device | str | None = None) -> Tensor:
        return super().timesteps(device).flip(0)


@pytest.mark.parametrize(
    ("name", "sampler", "net", "should_pass"),
    [
        ("correct heun", ODESampler("heun", 20), GMMNet(), True),
        ("flipped corrector", FlippedCorrectorHeun("heun", 20), GMMNet(), False),
        ("stale corrector time", StaleTimeHeun("heun", 20), GMMNet(), False),
        ("reversed time", ReversedTimeSampler("heun", 20), GMMNet(), False),
        ("(1-t) instead of (1-t)^2 noise variance", ODESampler("heun", 20), GMMNet(noise_power=1.0), False),
        ("coarse euler (50 steps)", ODESampler("euler", 50), GMMNet(), False),
    ],
)
def test_broken_samplers_fail_the_check(
    name: str, sampler: ODESampler, net: GMMNet, should_pass: bool
) -> None:
    """The check is sensitive: broken integrators/fields fail it, the correct one (same NFE) passes."""
    ok, reason = check_gmm_samples(sample_mixture(sampler, net), WEIGHTS, MEANS, COVS)
    assert ok == should_pass, f"{name}: {reason}"


def test_cfg_scale_one_reproduces_class_conditionals() -> None:
    """With cfg_scale = 1, class c samples follow component c, and the null label is never queried."""
    net = GMMNet(conditional=True)
    seen: list[Tensor] = []

    def recording_net(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        seen.append(y)
        return net(x, t, y)

    recording_net.num_classes = net.num_classes  # type: ignore[attr-defined]
    per_class = 8000
    labels = torch.arange(3).repeat_interleave(per_class)  # (3 * n,)
    gen = torch.Generator().manual_seed(5)
    sampler = ODESampler("heun", 50, cfg_scale=1.0)
    samples = sampler(recording_net, labels, (2,), gen, torch.float64)  # (3n, 2)
    assert all(torch.equal(y, labels) for y in seen) and len(seen) == 100
    for k in range(3):
        one = slice(k, k + 1)
        ok, reason = check_gmm_samples(
            samples[labels == k], torch.ones(1, dtype=torch.float64), MEANS[one], COVS[one]
        )
        assert ok, f"class {k}: {reason}"


# ------------------------------------------------------------------------------------- CFG algebra (exact)
class StubNet:
    """Deterministic label-dependent field returning 2C channels (learned-Sigma layout); records calls."""

    def __init__(self, num_classes: int = 5) -> None:
        """Start with an empty call log."""
        self.num_classes = num_classes
        self.calls: list[tuple[int, Tensor]] = []

    def field(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """First C output channels; only exactly rounded elementwise ops, so batching is bit-exact."""
        yb = y.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, ..., 1)
        tb = t.reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, ..., 1)
        return x * (yb + 1.0) + 0.3 * tb - 0.1 * x * x  # (B, C, ...)

    def __call__(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        self.calls.append((x.shape[0], y.clone()))
        v = self.field(x, t, y)  # (B, C, ...)
        return torch.cat([v, 7.0 * v + 1.0], dim=1)  # (B, 2C, ...)


def reference_cfg(
    net: StubNet,
    x: Tensor,
    t: Tensor,
    y: Tensor,
    scale: float,
    interval: tuple[float, float],
    channels: int | None,
) -> Tensor:
    """Guidance written out directly from its definition, with separate conditional/unconditional calls."""
    v_c = net.field(x, t, y)
    v_u = net.field(x, t, torch.full_like(y, net.num_classes))
    out = v_c.clone()
    for i in range(x.shape[0]):
        if interval[0] <= float(t[i]) <= interval[1]:
            g = channels or x.shape[1]
            out[i, :g] = v_u[i, :g] + scale * (v_c[i, :g] - v_u[i, :g])
    return out


@pytest.mark.parametrize("guided_channels", [None, 2, 3])
def test_guided_velocity_equals_reference_formula(guided_channels: int | None) -> None:
    """v_u + s (v_c - v_u) inside the interval on the guided channels, v_c elsewhere; one batched call."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 3, 4, 4, generator=gen)  # (B, C, H, W)
    t = torch.tensor([0.1, 0.2, 0.45, 0.9])  # (B,): outside, on the boundary, inside, outside
    y = torch.tensor([0, 3, 1, 4])  # (B,)
    net = StubNet()
    out = guided_velocity(net, x, t, y, 2.5, (0.2, 0.6), guided_channels)  # (B, C, H, W)
    assert torch.equal(out, reference_cfg(net, x, t, y, 2.5, (0.2, 0.6), guided_channels))
    assert len(net.calls) == 1 and net.calls[0][0] == 8
    assert torch.equal(net.calls[0][1], torch.tensor([0, 3, 1, 4, 5, 5, 5, 5]))
    assert torch.equal(out[0], net.field(x, t, y)[0]) and torch.equal(out[3], net.field(x, t, y)[3])


def test_guided_velocity_skips_the_unconditional_half_when_unused() -> None:
    """cfg_scale = 1, t outside the interval, or an unconditional net: one plain call, output v_c."""
    x, t, y = torch.randn(3, 2, 5), torch.full((3,), 0.5), torch.tensor([0, 1, 2])
    for scale, interval, num_classes in [(1.0, (0.0, 1.0), 5), (3.0, (0.6, 1.0), 5), (3.0, (0.0, 1.0), 0)]:
        net = StubNet(num_classes)
        out = guided_velocity(net, x, t, y, scale, interval)
        assert torch.equal(out, net.field(x, t, y))
        assert len(net.calls) == 1 and net.calls[0][0] == 3 and torch.equal(net.calls[0][1], y)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_one_step_sampler_matches_hand_computation(method: str) -> None:
    """One guided step from the generator's x_0 equals the update written out by hand, bit for bit."""
    net, labels = StubNet(), torch.tensor([0, 2, 4])
    sampler = ODESampler(method, 1, cfg_scale=4.0, guidance_interval=[0.0, 1.0], guided_channels=1)
    out = sampler(net, labels, (2, 3), generator=torch.Generator().manual_seed(3))  # (B, 2, 3)
    x0 = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(3))  # (B, 2, 3)
    v0 = reference_cfg(net, x0, torch.zeros(3), labels, 4.0, (0.0, 1.0), 1)
    if method == "euler":
        expected = x0 + 1.0 * v0
    else:
        v1 = reference_cfg(net, x0 + 1.0 * v0, torch.ones(3), labels, 4.0, (0.0, 1.0), 1)
        expected = x0 + 0.5 * (v0 + v1)
    assert out.shape == (3, 2, 3) and out.dtype == torch.float32
    assert torch.equal(out, expected)


@pytest.mark.parametrize(
    ("method", "cfg_scale", "nfe"), [("euler", 1.0, 7), ("heun", 1.0, 14), ("heun", 2.0, 14)]
)
def test_nfe_counts_batched_calls(method: str, cfg_scale: float, nfe: int) -> None:
    """nfe equals the number of network calls; with CFG each call carries a doubled batch."""
    net, sampler = StubNet(), ODESampler(method, 7, cfg_scale=cfg_scale)
    sampler(net, torch.tensor([1, 2]), (3,), generator=torch.Generator().manual_seed(0))
    assert sampler.nfe == nfe == len(net.calls)
    assert {size for size, _ in net.calls} == {4 if cfg_scale != 1.0 else 2}


def test_sampler_reproducible_with_generator_and_global_rng() -> None:
    """The same seed gives the same samples, through an explicit generator or the global RNG."""
    sampler, labels = ODESampler("heun", 3, cfg_scale=2.0), torch.tensor([0, 1])
    a = sampler(StubNet(), labels, (2, 2), generator=torch.Generator().manual_seed(9))
    b = sampler(StubNet(), labels, (2, 2), generator=torch.Generator().manual_seed(9))
    torch.manual_seed(9)
    c = sampler(StubNet(), labels, (2, 2))
    assert torch.equal(a, b) and torch.equal(a, c)


def test_invalid_arguments_raise_clear_errors() -> None:
    """Bad constructor or call arguments fail early with messages naming the problem."""
    with pytest.raises(ValueError, match="allowed: euler, heun"):
        ODESampler("rk4")
    for kwargs in [
        {"num_steps": 0},
        {"cfg_scale": -1.0},
        {"cfg_scale": float("nan")},
        {"guidance_interval": (0.7, 0.2)},
        {"guidance_interval": (0.0, 1.5)},
        {"guidance_interval": (0.1, 0.5, 0.9)},
        {"guided_channels": 0},
    ]:
        with pytest.raises(ValueError):
            ODESampler(**kwargs)
    with pytest.raises(ValueError, match="guided_channels"):
        ODESampler(cfg_scale=2.0, guided_channels=3)(StubNet(), torch.tensor([0]), (2, 4))
    with pytest.raises(ValueError, match="int64"):
        ODESampler()(StubNet(), torch.tensor([0.0]), (2,))
    with pytest.raises(ValueError, match="labels must lie"):
        ODESampler()(StubNet(), torch.tensor([6]), (2,))
    with pytest.raises(AttributeError, match="num_classes"):
        ODESampler()(lambda x, t, y: x, torch.tensor([0]), (2,))
    assert ODESampler("euler", 1)(StubNet(), torch.tensor([5]), (2,)).shape == (1, 2)  # null label is allowed


# ------------------------------------------------------------------------------ other paths and predictions
@pytest.mark.parametrize(
    ("interpolant", "method", "steps"),
    [
        (GVPInterpolant(), "heun", 50),
        (VPInterpolant(), "heun", 50),
        (LinearInterpolant(prediction="noise"), "heun", 50),
        (GVPInterpolant(prediction="score"), "heun", 50),
        (VPInterpolant(prediction="noise"), "euler", 250),
        (LinearInterpolant(prediction="data"), "heun", 20),  # JiT's floor 0.05 = sigma at the last Heun time
        (LinearInterpolant(prediction="data", sigma_floor=1e-3), "heun", 50),
        (GVPInterpolant(prediction="data", sigma_floor=1e-3), "heun", 50),
    ],
    ids=short_id,
)
def test_ode_sampler_matches_gaussian_mixture_on_every_path(interpolant: Interpolant, method: str, steps: int) -> None:
    """GVP and VP paths, noise, score and data nets: the exact field sampled on the interpolant's interval
    matches (data nets end with an Euler step; their conversions are exact wherever sigma >= sigma_floor)."""
    sampler = ODESampler(method, steps, interpolant=interpolant)
    ok, reason = check_gmm_samples(sample_mixture(sampler, PathGMMNet(interpolant)), WEIGHTS, MEANS, COVS)
    assert ok, reason


@pytest.mark.parametrize(
    ("net_path", "sampler_path"),
    [
        (GVPInterpolant(prediction="noise"), LinearInterpolant(prediction="noise")),
        (LinearInterpolant(prediction="noise"), LinearInterpolant()),
        (VPInterpolant(prediction="score"), VPInterpolant(prediction="noise")),
    ],
    ids=["GVP noise net, linear conversion", "noise read as velocity", "score read as noise"],
)
def test_path_or_prediction_mismatch_fails_the_check(net_path: Interpolant, sampler_path: Interpolant) -> None:
    """Converting a net's output with the wrong path or prediction type does not give the mixture.

    (A velocity net needs no conversion, so on [0, 1] its ODE does not depend on the path at all.)
    """
    samples = sample_mixture(ODESampler("heun", 50, interpolant=sampler_path), PathGMMNet(net_path))
    assert not check_gmm_samples(samples, WEIGHTS, MEANS, COVS)[0]


@pytest.mark.parametrize("interpolant", [LinearInterpolant(), VPInterpolant()], ids=short_id)
def test_dopri5_matches_gaussian_mixture(interpolant: Interpolant) -> None:
    """SiT's published ODE (torchdiffeq dopri5, atol 1e-6, rtol 1e-3) reproduces the mixture, NFE recorded."""
    pytest.importorskip("torchdiffeq")
    sampler = ODESampler("dopri5", interpolant=interpolant, atol=1e-6, rtol=1e-3)
    ok, reason = check_gmm_samples(sample_mixture(sampler, PathGMMNet(interpolant)), WEIGHTS, MEANS, COVS)
    assert ok, reason
    assert sampler.nfe is None and sampler.last_nfe is not None and 6 < sampler.last_nfe < 1000


@pytest.mark.parametrize("prediction", ["noise", "score"])
def test_guiding_noise_or_score_outputs_equals_guiding_the_velocity(prediction: str) -> None:
    """CFG on a noise/score net's output, converted, equals CFG on the converted velocities (affine map)."""
    path = GVPInterpolant(prediction=prediction)
    net = StubNet()
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(4, 3, 2, generator=gen, dtype=torch.float64)  # (B, C, L)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9], dtype=torch.float64)  # (B,)
    y = torch.tensor([0, 1, 2, 3])  # (B,)
    out = guided_velocity(net, x, t, y, 3.0, (0.2, 0.7), 2, interpolant=path)  # (B, C, L)
    v_c = path.velocity_from_output(net.field(x, t, y), x, t)  # (B, C, L)
    v_u = path.velocity_from_output(net.field(x, t, torch.full_like(y, net.num_classes)), x, t)  # (B, C, L)
    expected = v_c.clone()
    expected[1:3, :2] = v_u[1:3, :2] + 3.0 * (v_c[1:3, :2] - v_u[1:3, :2])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_ode_grid_follows_the_interpolant_interval() -> None:
    """Velocity nets integrate over [0, 1]; noise nets over [1e-3, 1 - 1e-3]; VP over [0, 1 - 1e-3] (SiT)."""
    assert ODESampler("euler", 4).timesteps().tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    noise_grid = ODESampler("euler", 2, interpolant=LinearInterpolant(prediction="noise")).timesteps()
    torch.testing.assert_close(noise_grid, torch.tensor([1e-3, 0.5, 1 - 1e-3], dtype=torch.float64))
    assert ODESampler("euler", 2, interpolant=VPInterpolant()).timesteps()[[0, -1]].tolist() == [0.0, 1 - 1e-3]


def test_data_prediction_heun_ends_with_an_euler_step_onto_the_prediction() -> None:
    """Data nets: Heun's last step is Euler (2N - 1 calls), landing exactly on the net's last data prediction on
    the linear path (x + (1 - t) (x_pred - x) / (1 - t)); dopri5, which needs v at t = 1, is refused."""
    path = LinearInterpolant(prediction="data")
    net, sampler = StubNet(), ODESampler("heun", 4, interpolant=path)
    labels = torch.tensor([1, 2])
    out = sampler(net, labels, (3,), generator=torch.Generator().manual_seed(0))  # (B, 3)
    assert sampler.nfe == 7 == len(net.calls)
    replay, x = StubNet(), torch.randn(2, 3, generator=torch.Generator().manual_seed(0))  # (B, 3)
    replay_sampler = ODESampler("heun", 1, interpolant=path)
    for t, t_next in zip([0.0, 0.25, 0.5], [0.25, 0.5, 0.75], strict=True):
        x = replay_sampler.step(replay, x, t, t_next, labels)  # (B, 3): Heun
    torch.testing.assert_close(out, replay.field(x, torch.full((2,), 0.75), labels), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="dopri5"):
        ODESampler("dopri5", interpolant=path)


def test_time_shift_is_sd3s_shift_and_still_samples_the_mixture() -> None:
    """time_shift s maps the uniform grid to SD3's shifted one (sigma' = s sigma / (1 + (s - 1) sigma) with
    sigma = 1 - t), keeps both ends, spends more steps at high noise, and Heun on it matches the mixture."""
    uniform = ODESampler("heun", 10).timesteps()  # (N+1,)
    shifted = ODESampler("heun", 10, time_shift=3.0).timesteps()  # (N+1,)
    sigma = 1.0 - uniform  # (N+1,)
    torch.testing.assert_close(1.0 - shifted, 3.0 * sigma / (1.0 + 2.0 * sigma), rtol=0, atol=1e-15)
    assert shifted[0] == 0.0 and shifted[-1] == 1.0 and bool((shifted.diff() > 0).all())
    assert bool((shifted[1:-1] < uniform[1:-1]).all())
    sampler = ODESampler("heun", 20, time_shift=3.0)
    ok, reason = check_gmm_samples(sample_mixture(sampler), WEIGHTS, MEANS, COVS)
    assert ok, reason
    with pytest.raises(ValueError, match="time_shift"):
        ODESampler(time_shift=0.0)
