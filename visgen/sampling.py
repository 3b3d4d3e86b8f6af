"""Sampling glue shared by training (sample grids) and evaluation: sampler -> tokenizer -> uint8.

Lives outside `visgen.training` so that evaluation never imports training code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.utils import make_grid, save_image

from visgen.tokenizers.base import Tokenizer

__all__ = ["Sampler", "generate", "gathered", "to_uint8", "from_uint8", "save_grid", "balanced_labels",
           "RESHARD_AFTER_FORWARD_ATTR"]

#: Set by visgen.training.fsdp.shard_net on every FSDP2 unit: the reshard_after_forward it was sharded with.
RESHARD_AFTER_FORWARD_ATTR = "visgen_reshard_after_forward"


class Sampler(ABC):
    """Base of every sampler the `sampling` config group builds (README convention 7).

    `sampler(net, labels, latent_shape, generator=...)` returns latents (B, *latent_shape) for continuous
    tokenizers or int64 codes (B, h, w) for VQ ones. Evaluation rebuilds samplers from a checkpoint's config
    only when the target subclasses this (`visgen.untrusted`), so every sampler class derives from it.
    """

    @abstractmethod
    def __call__(self, net: nn.Module, labels: Tensor, latent_shape: Sequence[int],
                 generator: torch.Generator | None = None) -> Tensor:
        """Sample latents or codes for `labels` (B,) from noise drawn with `generator`."""


def from_uint8(images: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) in 0..255 -> float in [-1, 1] (done on device: loaders ship uint8)."""
    return images.float() / 127.5 - 1.0


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] float -> uint8, as DiT's sample_ddp.py: clamp(127.5 x + 128) then truncate."""
    return (127.5 * images.float() + 128.0).clamp(0, 255).to(torch.uint8)


@contextmanager
def gathered(net: nn.Module) -> Iterator[nn.Module]:
    """Gather every FSDP2 shard of `net` for the duration of the block (a no-op for unsharded nets).

    FSDP2 gathers a module's parameters only inside its `forward`; samplers also call other methods (MAR's
    encoder and DiffLoss, a KV-cache step), and would meet sharded DTensors there. Sampling is rare and runs
    without gradients, so the whole net is gathered once and resharded afterwards.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in net.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield net
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(getattr(unit, RESHARD_AFTER_FORWARD_ATTR, True), recurse=False)


@torch.no_grad()
def generate(
    net: nn.Module,
    tokenizer: Tokenizer,
    sampler: Callable[..., Tensor],
    labels: Tensor,
    image_size: int,
    generator: torch.Generator | None = None,
    postprocess: Callable[[Tensor], Tensor] = to_uint8,
) -> Tensor:
    """Sample latents for `labels` (B,) with `sampler`, decode them, make uint8 (B, 3, H, W) images with
    `postprocess` (DiT's rounding by default; evaluation passes its recorded quantisation and resize)."""
    with gathered(net):
        latents = sampler(net, labels, tokenizer.latent_shape(image_size), generator=generator)  # (B, C, h, w)
    return postprocess(tokenizer.decode(latents))  # (B, 3, H, W)


def balanced_labels(num_samples: int, num_classes: int, device: torch.device | str = "cpu") -> Tensor:
    """Class-balanced labels 0, 1, ..., K-1, 0, 1, ... (all zeros for an unconditional model)."""
    return torch.arange(num_samples, device=device) % max(num_classes, 1)  # (N,)


def save_grid(images_uint8: Tensor, path: Path, nrow: int | None = None) -> Path:
    """Write a PNG grid of uint8 (B, 3, H, W) images; nrow defaults to a square-ish grid."""
    nrow = nrow or max(1, int(len(images_uint8) ** 0.5))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(images_uint8.cpu().float() / 255.0, nrow=nrow, padding=2, pad_value=1.0)
    save_image(grid, path)
    return path
