"""Input embeddings shared by every transformer generator: patches, positions, timesteps, labels.

Defined once here (DiT, SiT, REPA and MAR's diffusion head all reuse them). Parameter names follow
the official DiT repository (`x_embedder.proj`, `t_embedder.mlp`, `y_embedder.embedding_table`) so
published checkpoints map onto these modules one to one.
"""

from __future__ import annotations

import math

import torch
from timm.layers import PatchEmbed
from torch import Tensor, nn

__all__ = ["PatchEmbed", "TimestepEmbedder", "LabelEmbedder", "sincos_pos_embed_2d"]


def sincos_pos_embed_1d(dim: int, positions: Tensor) -> Tensor:
    """Fixed 1-D sin/cos table, [sin | cos] halves as in MAE/DiT: (N,) positions -> (N, dim)."""
    if dim % 2:
        raise ValueError(f"sincos position embedding needs an even dim, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    angles = positions.to(torch.float64)[:, None] * omega[None]  # (N, D/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (N, D)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> Tensor:
    """Fixed 2-D sin/cos position table of a square token grid: (grid_size**2, dim), row-major.

    Half the channels encode the column (w) and half the row (h), in that order, exactly as the
    MAE/DiT tables the released checkpoints store.
    """
    if dim % 4:
        raise ValueError(f"2-D sincos position embedding needs dim divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # (G, G) each; w varies along columns
    emb_w = sincos_pos_embed_1d(dim // 2, grid_w.reshape(-1))  # (G*G, D/2)
    emb_h = sincos_pos_embed_1d(dim // 2, grid_h.reshape(-1))  # (G*G, D/2)
    return torch.cat([emb_w, emb_h], dim=1).float()  # (G*G, D)


class TimestepEmbedder(nn.Module):
    """Scalar time -> vector: sinusoidal frequencies, then a 2-layer SiLU MLP (DiT/ADM)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period

    def timestep_embedding(self, t: Tensor) -> Tensor:
        """(B,) float times -> (B, F) features, [cos | sin] halves as in the official DiT code."""
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(
            -math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )  # (F/2,)
        args = t.float()[:, None] * freqs[None]  # (B, F/2)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, F) (F even)
        return embedding

    def forward(self, t: Tensor) -> Tensor:
        """(B,) times -> (B, hidden); the frequencies in fp32, the MLP in its weights' dtype (or autocast's), so a
        net cast to float64 or half runs too (as the official code, which casts them to t's dtype)."""
        return self.mlp(self.timestep_embedding(t).to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class label -> vector, with one extra "null" row for classifier-free guidance.

    During training labels are replaced by the null class `num_classes` with probability
    `dropout_prob` (0.1 in DiT/SiT), so one network learns both the conditional and the
    unconditional model.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        has_null_class = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(has_null_class), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        """Replace labels by the null class at random (training) or where force_drop_ids == 1."""
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob  # (B,)
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: Tensor, train: bool, force_drop_ids: Tensor | None = None) -> Tensor:
        """(B,) int labels -> (B, hidden)."""
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (B, D)
