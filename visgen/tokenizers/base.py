"""One small interface for every tokenizer: pixels (identity), KL autoencoders and VQ models.

Generators never touch images directly: training encodes a batch of images in [-1, 1] into
`encode` moments (KL: mean and log-variance; VQ: integer codes; pixels: the pixels), draws
latents with `sample`, and sampling maps generated latents back with `decode`. Latents are
normalised as `(z - shift) * scale` (SD-VAE: shift 0, scale 0.18215), so generator code never
sees the autoencoder's raw range. `id` names the tokenizer and its weights; it is recorded in
cached-latent sidecars and checkpoints so latents of one tokenizer are never read with another.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from visgen.nn.frozen import FrozenHolder


class Tokenizer(nn.Module, ABC):
    """Images in [-1, 1] <-> normalised latents (continuous) or codes (discrete)."""

    #: Normalisation of continuous latents: z_normalised = (z - shift) * scale.
    scale: float = 1.0
    shift: float = 0.0
    #: Codebook size of a discrete tokenizer; None for continuous latents.
    vocab_size: int | None = None

    @property
    @abstractmethod
    def id(self) -> str:
        """Identifies tokenizer and weights, e.g. 'pixel', 'sd-vae-ft-ema'."""

    @abstractmethod
    def latent_shape(self, image_size: int) -> tuple[int, ...]:
        """Shape of one image's latent (C, h, w) or code grid (h, w)."""

    @abstractmethod
    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) images in [-1, 1] -> posterior moments or codes (cacheable, pre-sampling)."""

    @abstractmethod
    def sample(self, moments: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Encoder moments -> normalised latents (a posterior draw for KL, identity otherwise)."""

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents or codes -> (B, 3, H, W) images in [-1, 1]."""


class PixelTokenizer(Tokenizer):
    """The identity: generators run directly on pixels in [-1, 1] (the built-in 32×32 digits)."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.channels = channels

    @property
    def id(self) -> str:
        return "pixel"

    def latent_shape(self, image_size: int) -> tuple[int, ...]:
        return (self.channels, image_size, image_size)

    def encode(self, images: Tensor) -> Tensor:
        return images

    def sample(self, moments: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return moments

    def decode(self, latents: Tensor) -> Tensor:
        return latents.clamp(-1, 1)


class FrozenNetTokenizer(FrozenHolder, Tokenizer):
    """Base for tokenizers around a frozen network that checkpoints must not carry (`visgen.nn.frozen`): the
    autoencoder is reloaded from its file and `id` records which weights were used."""

    @staticmethod
    def own_precision(x: Tensor) -> torch.autocast | nullcontext:
        """Autocast off around the held network: codes and latents must not depend on the trainer's precision."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.autocast(x.device.type, enabled=False)
        return nullcontext()
