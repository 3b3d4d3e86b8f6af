"""Tests for the linear (SiT) interpolant: path endpoints, velocity target, time sampling and the loss."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from visgen.diffusion.interpolants import LinearInterpolant, velocity_channels


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
