"""DINOv2 features for FD-DINOv2 (Stein et al. 2023), as edm2's `calculate_metrics.py` computes them.

edm2's detector: uint8 images, `F.interpolate(x.float(), (224, 224), mode="bicubic", antialias=True)` (its fast
"torch" resize, no clamping), / 255, ImageNet mean/std, `dinov2_vitl14` from torch.hub; the feature is the forward
output, the final-norm CLS token (1024-d). Here the same network is timm's `vit_large_patch14_dinov2` built at 224
px from a local weights file (clusters are offline): the official `dinov2_vitl14_pretrain.pth` (what torch.hub
downloads) or timm's `model.safetensors`. The released 37 × 37 position table is resized to 16 × 16 once, with the
hub model's own rule (`interpolate_pos_encoding`: bicubic, scale factor (16 + 0.1) / 37, no antialias), so the
features match the hub model's, not timm's resampling.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visgen.data.cached import file_sha256
from visgen.eval.inception import check_uint8_images, exact_float32
from visgen.official import read_checkpoint

__all__ = ["DINOv2Features", "DINOV2_MODEL", "hub_position_table"]

DINOV2_MODEL = "vit_large_patch14_dinov2"  # edm2: torch.hub dinov2_vitl14
IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HUB_INTERPOLATE_OFFSET = 0.1  # dinov2 hub models: interpolate_offset=0.1, interpolate_antialias=False


def hub_position_table(pos_embed: Tensor, grid_size: int) -> Tensor:
    """(1, 1 + M², D) position table -> (1, 1 + grid², D) exactly as DINOv2's `interpolate_pos_encoding` does."""
    num_patches = pos_embed.shape[1] - 1
    side = int(math.sqrt(num_patches))
    if side * side != num_patches:
        raise ValueError(f"DINOv2 position table has {num_patches} patch entries, not a square grid")
    if side == grid_size:
        return pos_embed
    dim = pos_embed.shape[-1]
    table = pos_embed.float()
    patches = table[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, D, M, M)
    scale = (grid_size + HUB_INTERPOLATE_OFFSET) / side
    patches = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic", antialias=False)  # (1, D, g, g)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid_size * grid_size, dim)
    return torch.cat([table[:, :1], patches], dim=1).to(pos_embed.dtype)


class DINOv2Features(nn.Module):
    """edm2's FD-DINOv2 feature: the CLS token of DINOv2 at 224 px, from a local weights file."""

    def __init__(self, weights_path: str | Path, model_name: str = DINOV2_MODEL) -> None:
        super().__init__()
        import timm

        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"DINOv2 weights {path} do not exist; set metrics.dinov2_weights to the official "
                                    "dinov2_vitl14_pretrain.pth or timm's vit_large_patch14_dinov2 model.safetensors")
        self.net = timm.create_model(model_name, pretrained=False, img_size=IMAGE_SIZE, num_classes=0)
        state = {k: v for k, v in read_checkpoint(path).items() if isinstance(v, Tensor)}  # safetensors or weights-only
        state.pop("mask_token", None)  # the hub model's masked-image-modelling token: unused at inference
        grid = IMAGE_SIZE // self.net.patch_embed.patch_size[0]
        if "pos_embed" in state:
            state["pos_embed"] = hub_position_table(state["pos_embed"], grid)
        self.net.load_state_dict(state, strict=True)
        self.net.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.sha256 = file_sha256(path)
        self.id = f"timm {model_name} at {IMAGE_SIZE} px (hub position table), {path.name} (sha256 {self.sha256})"

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """uint8 (B, 3, H, W) -> {"dinov2": (B, D)} float32."""
        check_uint8_images(images, "DINOv2Features")
        device = self.mean.device
        with exact_float32(device.type):
            x = F.interpolate(images.to(device).float(), size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic",
                              antialias=True)  # (B, 3, 224, 224), edm2's resize: no clamp
            x = (x / 255 - self.mean) / self.std
            return {"dinov2": self.net(x).float()}  # (B, D)
