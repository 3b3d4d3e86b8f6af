"""Autoguidance: guide + w (net - guide) on the guided channels, the net's own output elsewhere."""

import pytest
import torch
from torch import Tensor, nn

from visgen.diffusion.guidance import Autoguided


class AffineNet(nn.Module):
    """out = a * x + b * t + c * y, 2C output channels (an ε and a Σ half), counting calls."""

    def __init__(self, a: float, b: float, c: float, num_classes: int = 10) -> None:
        super().__init__()
        self.a, self.b, self.c, self.num_classes, self.calls = a, b, c, num_classes, 0

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        self.calls += 1
        shape = (-1, *([1] * (x.ndim - 1)))
        out = self.a * x + self.b * t.reshape(shape) + self.c * y.reshape(shape).float()  # (B, C, ...)
        return torch.cat([out, -out], dim=1)  # (B, 2C, ...)


@pytest.mark.parametrize("guided_channels", [None, 2])
def test_autoguided_output_equals_the_formula(guided_channels: int | None) -> None:
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))  # (B, C, H, W)
    t, y = torch.tensor([0.1, 0.4, 0.7, 1.0]), torch.tensor([0, 3, 5, 9])
    good, bad = AffineNet(1.0, 2.0, 0.5), AffineNet(0.5, -1.0, 0.1)
    out = Autoguided(good, bad, 2.5, guided_channels)(x, t, y)  # (B, 2C, H, W)
    g = 3 if guided_channels is None else guided_channels
    want = good(x, t, y).clone()
    want[:, :g] = bad(x, t, y)[:, :g] + 2.5 * (good(x, t, y)[:, :g] - bad(x, t, y)[:, :g])
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[:, g:], good(x, t, y)[:, g:])  # Σ half (and unguided channels) from the net


def test_scale_one_is_the_net_alone_and_bad_settings_are_refused() -> None:
    x, t, y = torch.randn(2, 3, 4), torch.tensor([0.2, 0.8]), torch.tensor([1, 2])
    good, bad = AffineNet(1.0, 2.0, 0.5), AffineNet(0.5, -1.0, 0.1)
    assert torch.equal(Autoguided(good, bad, 1.0)(x, t, y), good(x, t, y)) and bad.calls == 0
    assert Autoguided(good, bad, 2.0).num_classes == 10  # samplers read it for CFG's null label
    with pytest.raises(ValueError, match="same task"):
        Autoguided(good, AffineNet(1.0, 1.0, 1.0, num_classes=5), 2.0)
    with pytest.raises(ValueError, match=">= 1"):
        Autoguided(good, bad, 0.5)
