"""The interface of REPA's alignment encoders: frozen networks mapping images to patch features.

An `AlignmentEncoder` takes the batch's images in [-1, 1] (`batch["images"]`, README convention 7), applies its
own preprocessing (DINOv2: REPA's ImageNet normalisation and bicubic resize) and returns patch tokens
(B, N, D) without the class token, on a grid that must equal the generator's token grid. Its network is frozen,
kept in eval mode, never sees a gradient and is not a registered submodule: it stays out of `state_dict()`,
`parameters()` (so out of every optimizer and checkpoint) and is reloaded from its weights file; `id` (name and
the file's SHA-256) is what checkpoints record instead.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from visgen.nn.frozen import FrozenHolder

__all__ = ["AlignmentEncoder"]


class AlignmentEncoder(FrozenHolder, ABC):
    """A frozen encoder: (B, 3, H, W) images in [-1, 1] -> (B, N, embed_dim) patch features, no gradient."""

    def __init__(self, model: nn.Module, embed_dim: int, name: str, weights_sha256: str, image_size: int) -> None:
        super().__init__()
        self._hold(model)  # unregistered: out of state_dict(), parameters() and the optimizer (visgen.nn.frozen)
        self.embed_dim = int(embed_dim)
        self.name = name
        self.weights_sha256 = weights_sha256
        self.image_size = int(image_size)

    @property
    def id(self) -> str:
        """'<name>@sha256:<first 16 hex digits of the weights file>', recorded in checkpoints."""
        return f"{self.name}@sha256:{self.weights_sha256[:16]}"

    def extra_repr(self) -> str:
        return f"id={self.id!r}, embed_dim={self.embed_dim}, image_size={self.image_size}, grid={self.token_grid}"

    @property
    @abstractmethod
    def token_grid(self) -> int:
        """Side of the square patch grid returned for `image_size` images (N = token_grid ** 2)."""

    @abstractmethod
    def preprocess(self, images: Tensor) -> Tensor:
        """(B, 3, image_size, image_size) in [-1, 1] -> the network's input."""

    @abstractmethod
    def patch_tokens(self, inputs: Tensor) -> Tensor:
        """The network's input -> (B, N, embed_dim) patch features, class and register tokens dropped."""

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) images in [-1, 1] -> (B, N, embed_dim) features, computed without autograd."""
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (self.image_size,) * 2:
            raise ValueError(f"{self.name}: images of shape {tuple(images.shape)}; expected (B, 3, {self.image_size}, "
                             f"{self.image_size}) in [-1, 1] (set the encoder's image_size to data.image_size)")
        with torch.no_grad():
            return self.patch_tokens(self.preprocess(images))  # (B, N, D)
