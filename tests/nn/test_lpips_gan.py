"""LPIPS on random weights in the official file layouts (against a direct computation on torchvision's VGG16),
the PatchGAN's official size, the GAN loss values and VQGAN's adaptive weight."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from visgen.nn.discriminator import PatchGAN, adaptive_weight, discriminator_loss, generator_adversarial_loss
from visgen.nn.lpips import LPIPS, VGG_CHANNELS, VGG_TAPS


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """Random weights saved as torchvision's vgg16 file (features + a classifier tensor) and LPIPS' vgg.pth."""
    from torchvision.models import vgg16

    torch.manual_seed(0)
    with torch.device("meta"):
        layout = vgg16().features
    features = {f"features.{k}": torch.randn(v.shape) * 0.05 for k, v in layout.state_dict().items()}
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(VGG_CHANNELS)}
    root = tmp_path_factory.mktemp("lpips")
    torch.save({**features, "classifier.6.bias": torch.zeros(1000)}, root / "vgg16.pth")
    torch.save(heads, root / "vgg.pth")
    return root / "vgg.pth", root / "vgg16.pth", {**features, **heads}


def test_lpips_matches_a_direct_computation_on_torchvision_vgg(lpips_files):
    from torchvision.models import vgg16

    heads_path, vgg_path, state = lpips_files
    lpips = LPIPS(str(heads_path), str(vgg_path))
    with torch.device("meta"):
        ref = vgg16().features
    ref = ref.to_empty(device="cpu")
    ref.load_state_dict({k[len("features."):]: v for k, v in state.items() if k.startswith("features.")})
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)  # LPIPS' ScalingLayer
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    expected = torch.zeros(2)
    hx, hy = (x - shift) / scale, (y - shift) / scale
    level = 0
    for i, layer in enumerate(ref):
        hx, hy = layer(hx), layer(hy)
        if i in VGG_TAPS:
            nx, ny = F.normalize(hx, dim=1, eps=0), F.normalize(hy, dim=1, eps=0)
            w = state[f"lin{level}.model.1.weight"].view(1, -1, 1, 1)
            expected += (w * (nx - ny) ** 2).sum(1).mean(dim=(1, 2))
            level += 1
            if level == len(VGG_TAPS):
                break
    assert torch.allclose(lpips(x, y), expected, rtol=1e-4, atol=1e-6)
    assert lpips(x, x).abs().max() == 0 and torch.allclose(lpips(x, y), lpips(y, x))
    assert not any(p.requires_grad for p in lpips.parameters()) and not lpips.train().training


def test_lpips_refuses_files_of_the_wrong_layout(lpips_files):
    heads_path, vgg_path, _ = lpips_files
    with pytest.raises(ValueError, match="is not an LPIPS head"):
        LPIPS(weights=str(vgg_path), vgg_weights=str(vgg_path))
    with pytest.raises(ValueError, match="not a torchvision VGG16"):
        LPIPS(weights=str(heads_path), vgg_weights=str(heads_path))


def test_patchgan_has_taming_size_and_patch_output():
    disc = PatchGAN()  # taming NLayerDiscriminator(input_nc=3, ndf=64, n_layers=3)
    assert sum(p.numel() for p in disc.parameters()) == 2_765_633
    assert disc(torch.zeros(2, 3, 256, 256)).shape == (2, 1, 30, 30)  # one logit per 70x70 patch
    assert list(disc.state_dict())[0] == "main.0.weight"


def test_gan_losses_have_their_textbook_values():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(0.5 * (0.5 + 0.75))
    expected = 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    assert discriminator_loss(real, fake, "non_saturating").item() == pytest.approx(expected.item())
    assert generator_adversarial_loss(fake, "hinge").item() == pytest.approx(0.75)
    assert generator_adversarial_loss(fake, "non_saturating").item() == pytest.approx(-F.logsigmoid(fake).mean().item())
    with pytest.raises(ValueError, match="unknown GAN loss"):
        discriminator_loss(real, fake, "wgan")


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    last = torch.nn.Parameter(torch.ones(2, 2))
    a, b = torch.tensor([[3.0, 0.0], [0.0, 4.0]]), torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    weight = adaptive_weight((last * a).sum(), (last * b).sum(), last)
    assert weight.item() == pytest.approx(5.0 / (1.0 + 1e-4)) and not weight.requires_grad
    assert adaptive_weight((last * a).sum(), (last * 0).sum(), last).item() == 1e4  # clamped
