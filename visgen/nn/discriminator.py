"""The PatchGAN discriminator of pix2pix (Isola et al. 2017) and the GAN losses VQGAN / LlamaGen use.

`PatchGAN` is taming's `NLayerDiscriminator` (LlamaGen's `discriminator_patchgan.py` copies it):
4×4 convolutions, stride 2 for the first `num_layers`, BatchNorm and LeakyReLU(0.2), one logit per
70×70 patch (for 3 layers). Its state-dict names (`main.N.*`) and initialisation (conv weights
N(0, 0.02), BatchNorm weights N(1, 0.02)) are the official ones.

Losses (mean over patches):
* discriminator: hinge ½(E relu(1 − D(x)) + E relu(1 + D(x̂))) or non-saturating / "vanilla"
  ½(E softplus(−D(x)) + E softplus(D(x̂)));
* generator: hinge −E D(x̂), or non-saturating E softplus(−D(x̂)) = −E log σ(D(x̂)) (LlamaGen's
  "non-saturating" passes binary_cross_entropy_with_logits its arguments swapped, which is not this loss:
  1.34 vs 0.86 on the same logits; its presets use hinge, as vq_f16 does);
* VQGAN's adaptive weight λ = ||∇_L L_rec|| / (||∇_L L_gan|| + 1e-4), clamped to [0, 1e4], with L the
  decoder's last layer (Esser et al. 2021, eq. 7): balances the two gradients at the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PatchGAN", "discriminator_loss", "generator_adversarial_loss", "adaptive_weight", "GAN_LOSSES"]

GAN_LOSSES = ("hinge", "non_saturating")


class PatchGAN(nn.Module):
    """pix2pix / taming NLayerDiscriminator: images (B, C, H, W) -> patch logits (B, 1, h, w)."""

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3):
        """taming's defaults: 64 base channels, 3 layers (LlamaGen: disc_dim 64, disc_num_layers 3)."""
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1),
                                   nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < num_layers else 1  # the last block keeps the resolution
            layers += [nn.Conv2d(base_channels * prev, base_channels * mult, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(base_channels * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(base_channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """taming's weights_init: conv N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> logits (B, 1, h, w)."""
        return self.main(images)


def _check(kind: str) -> None:
    if kind not in GAN_LOSSES:
        raise ValueError(f"unknown GAN loss {kind!r}; use one of {GAN_LOSSES}")


def discriminator_loss(logits_real: Tensor, logits_fake: Tensor, kind: str = "hinge") -> Tensor:
    """Scalar discriminator loss: hinge or non-saturating (taming's 'vanilla'), ½ (real term + fake term)."""
    _check(kind)
    real, fake = logits_real.float(), logits_fake.float()
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())


def generator_adversarial_loss(logits_fake: Tensor, kind: str = "hinge") -> Tensor:
    """Scalar generator loss: hinge −E D(x̂) or non-saturating −E log σ(D(x̂))."""
    _check(kind)
    fake = logits_fake.float()
    return -fake.mean() if kind == "hinge" else F.softplus(-fake).mean()


def adaptive_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """VQGAN's λ = ||∇_last rec|| / (||∇_last gan|| + 1e-4), clamped to [0, max_weight], detached."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.float().norm() / (gan_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
