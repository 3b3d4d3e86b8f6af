"""Rotary position embeddings (RoPE; Su et al., 2021) as Llama and LlamaGen build them, 1-D and 2-D.

A table holds one (cos, sin) pair per position and per channel pair: (L, head_dim / 2, 2). It rotates
consecutive channels (x[2i], x[2i+1]) by angle_i ("interleaved" pairs, as Llama / gpt-fast), not the
two halves of the head (GPT-NeoX's layout): a released checkpoint only works with the layout it
was trained with.

LlamaGen's 2-D table (Sun et al., 2024; `precompute_freqs_cis_2d` in autoregressive/models/gpt.py)
splits the head in two: the first head_dim / 4 pairs rotate by the token's row, the last
head_dim / 4 by its column, both with the frequencies base^(-2j / (head_dim / 2)). Tokens are
row-major (raster order). The class prefix gets all-zero rows: cos = sin = 0, so its queries and
keys are zeroed (not left unrotated): the class token contributes to attention only through its
value, with a score of exactly 0 against every query. That is what the released weights were trained
with, so it is reproduced here, not "fixed".
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["rope_frequencies", "rope_table_1d", "rope_table_2d", "apply_rope", "RoPE"]

#: Tables are built on the CPU in fp32 (as the official code does), whatever device context is active,
#: so a net built on the meta device still holds real tables after strict loading.
_TABLE_DEVICE = torch.device("cpu")


def rope_frequencies(dim: int, base: float = 10000.0) -> Tensor:
    """The dim / 2 rotation frequencies base^(-2j / dim), j = 0 .. dim/2 - 1, fp32 as Llama computes them."""
    exponents = torch.arange(0, dim, 2, device=_TABLE_DEVICE)[: dim // 2].float() / dim  # (dim/2,)
    return 1.0 / (base**exponents)  # (dim/2,)


def _cos_sin(angles: Tensor) -> Tensor:
    """(..., P) angles -> (..., P, 2) [cos, sin] pairs."""
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def _check_head_dim(head_dim: int, multiple: int) -> None:
    if head_dim % multiple:
        raise ValueError(f"RoPE needs head_dim divisible by {multiple}, got {head_dim}; choose hidden_size and "
                         "num_heads so that hidden_size / num_heads is")


def rope_table_1d(seq_len: int, head_dim: int, base: float = 10000.0, prefix_len: int = 0) -> Tensor:
    """Llama's 1-D table for positions 0 .. seq_len - 1 after `prefix_len` zero rows: (prefix + L, head_dim/2, 2)."""
    _check_head_dim(head_dim, 2)
    positions = torch.arange(seq_len, device=_TABLE_DEVICE).float()  # (L,)
    table = _cos_sin(positions[:, None] * rope_frequencies(head_dim, base)[None])  # (L, Dh/2, 2)
    return torch.cat([torch.zeros(prefix_len, head_dim // 2, 2, device=_TABLE_DEVICE), table])


def rope_table_2d(grid_size: int, head_dim: int, base: float = 10000.0, prefix_len: int = 1) -> Tensor:
    """LlamaGen's 2-D table of a raster-ordered grid_size x grid_size token grid after `prefix_len` zero rows.

    Returns (prefix + G*G, head_dim / 2, 2): for the token at (row r, column c), pair i < head_dim/4
    rotates by r * f_i and pair head_dim/4 + i by c * f_i, with f = rope_frequencies(head_dim / 2, base).
    """
    _check_head_dim(head_dim, 4)
    freqs = rope_frequencies(head_dim // 2, base)  # (Dh/4,)
    coords = torch.arange(grid_size, device=_TABLE_DEVICE).float()  # (G,)
    angles = coords[:, None] * freqs[None]  # (G, Dh/4)
    grid = torch.cat([angles[:, None, :].expand(-1, grid_size, -1),  # row angle, constant along a row
                      angles[None, :, :].expand(grid_size, -1, -1)], dim=-1)  # (G, G, Dh/2)
    table = _cos_sin(grid).flatten(0, 1)  # (G*G, Dh/2, 2), row-major
    return torch.cat([torch.zeros(prefix_len, head_dim // 2, 2, device=_TABLE_DEVICE), table])


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate channel pairs of x (B, L, H, Dh) by a table (L, Dh/2, 2); computed in fp32, returned in x's dtype."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, L, H, Dh/2, 2)
    table = table.view(1, pairs.shape[1], 1, pairs.shape[3], 2)  # (1, L, 1, Dh/2, 2)
    cos, sin = table[..., 0], table[..., 1]
    rotated = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin,
                           pairs[..., 1] * cos + pairs[..., 0] * sin], dim=-1)  # (B, L, H, Dh/2, 2)
    return rotated.flatten(3).type_as(x)  # (B, L, H, Dh)


class RoPE(nn.Module):
    """A fixed RoPE table as a module: `rope(positions)` -> the rows (L, Dh/2, 2) for those positions.

    The table is a non-persistent buffer (not in checkpoints, as in every released LlamaGen file)
    that follows the module's device but stays fp32 under `.to(dtype)` / `.half()`: rounding cos and
    sin to bf16 would move every position.
    """

    table: Tensor

    def __init__(self, table: Tensor):
        super().__init__()
        self.register_buffer("table", table.float(), persistent=False)

    @classmethod
    def grid_2d(cls, grid_size: int, head_dim: int, base: float = 10000.0, prefix_len: int = 1) -> RoPE:
        """LlamaGen's 2-D table (`rope_table_2d`)."""
        return cls(rope_table_2d(grid_size, head_dim, base, prefix_len))

    @classmethod
    def sequence_1d(cls, seq_len: int, head_dim: int, base: float = 10000.0, prefix_len: int = 0) -> RoPE:
        """Llama's 1-D table (`rope_table_1d`)."""
        return cls(rope_table_1d(seq_len, head_dim, base, prefix_len))

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        table = self.table
        super()._apply(fn, recurse)
        moved = self.table
        # Follow device moves only; never a dtype cast, and never `to_empty`'s uninitialised memory.
        self.table = table.to(moved.device) if not table.is_meta else moved
        return self

    def forward(self, positions: Tensor | slice) -> Tensor:
        """Rows of the table: a slice (training: `slice(0, L)`) or a (L,) index tensor (KV-cache steps)."""
        return self.table[positions]  # (L, Dh/2, 2)
