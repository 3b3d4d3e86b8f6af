"""LPIPS (Zhang et al. 2018), the VGG16 variant VQGAN and LlamaGen train their tokenizers with.

d(x, y) = Σ_l mean_{h,w} w_l · (φ̂_l(x) − φ̂_l(y))², where φ̂_l are the relu1_2, relu2_2, relu3_3,
relu4_3 and relu5_3 activations of VGG16 (inputs shifted and scaled per channel as LPIPS does),
unit-normalised over channels, and w_l ≥ 0 the learned linear heads. The network is frozen: it is a
loss, never trained. Equal to LlamaGen's / taming's LPIPS in eval mode (max |diff| 0 on random weights). Their
training loops leave its Dropout(0.5) before each head on (the loss module's `.train()` reaches it); visgen
keeps LPIPS in eval mode: the same expected loss without the noise (measured: mean of 200 dropout draws
0.6152 vs 0.6150, per-draw std 0.0023).

Weights come from local files only (clusters are offline): `vgg_weights` in torchvision's VGG16
layout (`features.N.weight`, e.g. vgg16-397923af.pth; its `classifier.*` tensors are named and
dropped), `weights` the LPIPS heads (`lin{k}.model.1.weight`, the vgg.pth of the PerceptualSimilarity
repository / lpips package, also what taming and LlamaGen download). Both load strictly.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

__all__ = ["LPIPS", "VGG_CHANNELS", "VGG_TAPS"]

#: Channels of the tapped VGG16 activations, and the `features` indices of those ReLUs.
VGG_CHANNELS = (64, 128, 256, 512, 512)
VGG_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


def _vgg16_features() -> nn.Sequential:
    """torchvision's VGG16 `features` up to relu5_3, without building (and initialising) its 120M fc weights."""
    from torchvision.models import vgg16

    with torch.device("meta"):
        features = vgg16(weights=None).features[: VGG_TAPS[-1] + 1]
    features = features.to_empty(device="cpu")
    for layer in features:
        if isinstance(layer, nn.Conv2d):  # torchvision's VGG init, so an unloaded LPIPS is at least finite
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    return features


def _read(path: str | Path) -> dict[str, Tensor]:
    """A local state dict (torch or safetensors), read without executing code."""
    from visgen.official import read_checkpoint

    return dict(read_checkpoint(Path(path).expanduser()))


class LPIPS(nn.Module):
    """Frozen VGG16 LPIPS: `forward(x, y)` on images in [-1, 1] -> per-sample distance (B,)."""

    def __init__(self, weights: str | None = None, vgg_weights: str | None = None):
        """`weights`: LPIPS heads file; `vgg_weights`: torchvision VGG16 file. None leaves random weights
        (tests only: a random LPIPS is no perceptual loss, and a warning says so)."""
        super().__init__()
        self.features = _vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in VGG_CHANNELS)
        # LPIPS' ScalingLayer: inputs in [-1, 1] shifted and scaled per channel before VGG.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        if vgg_weights:
            self.load_vgg(vgg_weights)
        if weights:
            self.load_heads(weights)
        if not (weights and vgg_weights):
            log.warning("LPIPS built without %s: it is not a perceptual metric until both are loaded",
                        " and ".join(n for n, w in (("weights", weights), ("vgg_weights", vgg_weights)) if not w))
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> LPIPS:
        """Always in eval mode: a loss network."""
        return super().train(False)

    def load_vgg(self, path: str | Path) -> None:
        """torchvision VGG16 weights: `features.*` strictly; `classifier.*` (fc layers LPIPS does not use) dropped."""
        state = _read(path)
        unknown = [k for k in state if not k.startswith(("features.", "classifier."))]
        if unknown:
            raise ValueError(f"{path} is not a torchvision VGG16 state dict: unexpected keys {unknown[:5]}")
        features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        dropped = sorted(k for k in state if k.startswith("classifier."))
        if dropped:
            log.info("LPIPS: %s: dropped the VGG classifier tensors %s (not part of LPIPS)", path, dropped)
        self.features.load_state_dict(features, strict=True)

    def load_heads(self, path: str | Path) -> None:
        """LPIPS linear heads, `lin{k}.model.1.weight` (lpips/taming/LlamaGen vgg.pth) or `lins.{k}.weight`."""
        state = _read(path)
        renamed = {}
        for key, value in state.items():
            if key.startswith("lin") and key.endswith(".model.1.weight") and key[3:4].isdigit():
                renamed[f"lins.{key[3]}.weight"] = value  # PerceptualSimilarity's Sequential(Dropout, Conv)
            elif key.startswith("lins."):
                renamed[key] = value
            else:
                raise ValueError(f"{path}: key {key!r} is not an LPIPS head (lin<k>.model.1.weight); is this the "
                                 "VGG backbone? pass that as vgg_weights")
        self.lins.load_state_dict({k[len("lins."):]: v for k, v in renamed.items()}, strict=True)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """(B, 3, H, W) images in [-1, 1] -> LPIPS distance (B,)."""
        both = (torch.cat([x, y]) - self.shift) / self.scale  # (2B, 3, H, W): one VGG pass for both
        total = x.new_zeros(x.shape[0], dtype=torch.float32)
        h, taps = both, iter(VGG_TAPS)
        tap, level = next(taps), 0
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index != tap:
                continue
            feats = h.float()
            feats = feats / (feats.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)  # unit norm over channels
            fx, fy = feats.chunk(2)
            diff = (fx - fy).pow(2)  # (B, C, h, w)
            total = total + self.lins[level](diff.to(self.lins[level].weight.dtype)).float().mean(dim=(1, 2, 3))
            tap, level = next(taps, -1), level + 1
        return total
