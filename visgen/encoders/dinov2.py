"""DINOv2 (Oquab et al., 2024) through timm, from a local weights file: REPA's default alignment encoder.

REPA (`utils.load_encoders`, `train.preprocess_raw_image`) loads `torch.hub` DINOv2 ViT-{S,B,L,G}/14, drops the
head, resamples the position table to the token grid (timm's `resample_abs_pos_embed`: bicubic, antialiased,
class token kept), and feeds it images scaled to [0, 1], normalised with ImageNet's mean/std and resized
bicubically to 224 px for 256 px data (448 for 512): 16 × 16 (32 × 32) patch tokens, the generator's grid. The
features are `x_norm_patchtokens`: the final LayerNorm's output without the class (and register) tokens.

Here the same network is timm's `vit_{size}_patch14[_reg4]_dinov2` built for that input size, and the weights
come from a local file (clusters are offline): either timm's release (`model.safetensors` of
timm/vit_base_patch14_dinov2.lvd142m) or the torch.hub one (`dinov2_vitb14_pretrain.pth`); timm's
`checkpoint_filter_fn` maps the hub names (it drops `mask_token`, which only DINOv2's own training uses) and
resamples the position table exactly as REPA does. Loading is strict.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import Tensor

from visgen.data.cached import file_sha256
from visgen.encoders.base import AlignmentEncoder

log = logging.getLogger(__name__)

__all__ = ["DINOV2_SIZES", "DINOv2Encoder", "dinov2_input_size"]

#: REPA's --enc-type dinov2-vit-{s,b,l,g} -> timm architecture (patch 14); feature widths 384/768/1024/1536.
DINOV2_SIZES = {"s": "small", "b": "base", "l": "large", "g": "giant"}
PATCH_SIZE = 14
#: Pixels of the generator's image per encoder token: SD-VAE's 8 × SiT's patch 2 (256 px -> 16 × 16 tokens).
PIXELS_PER_TOKEN = 16


def dinov2_input_size(image_size: int) -> int:
    """REPA's encoder resolution 224 · (image_size / 256): one 14-px DINOv2 patch per 16 px of the image."""
    if image_size % PIXELS_PER_TOKEN:
        raise ValueError(f"image_size={image_size} is not a multiple of {PIXELS_PER_TOKEN}: DINOv2's token grid "
                         f"(image_size / {PIXELS_PER_TOKEN}) must equal SiT-*/2's on SD-VAE latents")
    return image_size // PIXELS_PER_TOKEN * PATCH_SIZE


class DINOv2Encoder(AlignmentEncoder):
    """Frozen DINOv2 ViT-{S,B,L,G}/14 from `weights`; images (B, 3, S, S) -> (B, (S/16)², D) patch features."""

    def __init__(
        self,
        weights: str,
        size: str = "b",
        registers: bool = False,
        image_size: int = 256,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        """`weights`: a local timm or torch.hub DINOv2 file, or a directory holding model.safetensors; `size`: s, b,
        l or g (REPA's dinov2-vit-b is "b"); `registers`: the reg4 variants (REPA's dinov2reg); `model_kwargs`: timm
        overrides (tests build tiny nets)."""
        if size not in DINOV2_SIZES:
            raise ValueError(f"DINOv2 size {size!r}; allowed: {', '.join(DINOV2_SIZES)} (REPA's dinov2-vit-<size>)")
        path = Path(weights) if weights else None
        if path is not None and path.is_dir():  # an `hf download --local-dir` directory
            path = path / "model.safetensors"
        if path is None or not path.is_file():
            raise FileNotFoundError(
                f"DINOv2 weights {weights!r} not found (model.encoders[*].weights). Download them where there is "
                f"internet: https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{size}14/dinov2_vit{size}14_pretrain.pth "
                f"(torch.hub's file), or `hf download timm/vit_{DINOV2_SIZES[size]}_patch14_dinov2.lvd142m "
                "--local-dir <dir>` and pass <dir>")
        arch = f"vit_{DINOV2_SIZES[size]}_patch14_{'reg4_' if registers else ''}dinov2"
        input_size = dinov2_input_size(image_size)
        model = timm.create_model(arch, pretrained=False, img_size=input_size, num_classes=0, **(model_kwargs or {}))
        state = _read_state_dict(path)
        # Hub names -> timm's, mask_token dropped, pos_embed resampled to the grid (bicubic, antialias: REPA's).
        state = checkpoint_filter_fn(dict(state), model)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{path} is not a DINOv2 ViT-{size.upper()}/14{' (reg4)' if registers else ''} file: "
                             f"{err}\nCheck model.encoders[*].size and .registers against the file") from err
        super().__init__(model, model.embed_dim, f"dinov2-vit{size}14{'-reg4' if registers else ''}",
                         file_sha256(path), image_size)
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1), persistent=False)
        log.info("alignment encoder %s (%s), %d px input, %d x %d tokens", self.id, path, input_size,
                 self.token_grid, self.token_grid)

    @property
    def token_grid(self) -> int:
        """image_size / 16 (224 px / 14 for 256 px images)."""
        return self.input_size // PATCH_SIZE

    def preprocess(self, images: Tensor) -> Tensor:
        """REPA's dinov2 branch: x / 255 (here (x + 1) / 2), ImageNet mean/std, then bicubic resize to input_size."""
        x = ((images.float() + 1.0) / 2.0 - self.mean) / self.std  # (B, 3, S, S)
        return F.interpolate(x, size=self.input_size, mode="bicubic")  # (B, 3, 14 g, 14 g), REPA: no antialias

    def patch_tokens(self, inputs: Tensor) -> Tensor:
        """DINOv2's `x_norm_patchtokens`: the normed tokens without class and register tokens."""
        tokens = self.frozen_net.forward_features(inputs)  # (B, prefix + N, D)
        return tokens[:, self.frozen_net.num_prefix_tokens:]  # (B, N, D)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """A DINOv2 state dict from safetensors or a torch file (weights_only)."""
    from visgen.official import read_checkpoint

    obj = read_checkpoint(path)
    for entry in ("model", "state_dict"):  # wrappers some re-saved files use; the releases are flat
        if isinstance(obj.get(entry), Mapping):
            obj = obj[entry]
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}
