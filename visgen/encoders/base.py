"""The interface of REPA's alignment encoders: frozen networks mapping images to patch features.

An `AlignmentEncoder` takes the batch's images in [-1, 1] (`batch["images"]`, README convention 7), applies its
own preprocessing (DINOv2: REPA's ImageNet normalisation and bicubic resize) and returns patch tokens
(B, N, D) without the class token, on a grid that must equal the generator's token grid. Its network is frozen,
kept in eval mode, never sees a gradient and is not a registered submodule: it stays out of `state_dict()`,
`parameters()` (so out of every optimizer and checkpoint) and is reloaded from its weights file; `id` (name and
the file's SHA-256) is what checkpoints record instead.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["AlignmentEncoder", "file_sha256"]


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes, read in 16 MiB blocks (a DINOv2-G file is 1.1 GB)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


class AlignmentEncoder(nn.Module, ABC):
    """A frozen encoder: (B, 3, H, W) images in [-1, 1] -> (B, N, embed_dim) patch features, no gradient."""

    def __init__(self, model: nn.Module, embed_dim: int, name: str, weights_sha256: str, image_size: int) -> None:
        super().__init__()
        # Not a registered submodule (as the SD-VAE tokenizer): invisible to state_dict(), parameters() and the
        # optimizer; `_apply` and `train` below keep it on the module's device and in eval mode.
        object.__setattr__(self, "_model", model.requires_grad_(False).eval())
        self.embed_dim = int(embed_dim)
        self.name = name
        self.weights_sha256 = weights_sha256
        self.image_size = int(image_size)

    @property
    def model(self) -> nn.Module:
        """The frozen network (not a registered submodule; see __init__)."""
        return self._model

    @property
    def id(self) -> str:
        """'<name>@sha256:<first 16 hex digits of the weights file>', recorded in checkpoints."""
        return f"{self.name}@sha256:{self.weights_sha256[:16]}"

    def extra_repr(self) -> str:
        return f"id={self.id!r}, embed_dim={self.embed_dim}, image_size={self.image_size}, grid={self.token_grid}"

    def _apply(self, fn: Any, recurse: bool = True) -> AlignmentEncoder:
        """Forward .to(device/dtype), .float(), ... to the unregistered network as to a child."""
        if recurse:
            self._model._apply(fn)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> AlignmentEncoder:
        """The network stays in eval mode whatever the parent does (REPA: encoder.eval())."""
        super().train(mode)
        self._model.eval()
        return self

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
