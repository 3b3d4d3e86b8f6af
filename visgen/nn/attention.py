"""Multi-head self-attention on PyTorch's fused SDPA kernels, and the transformer MLP.

Hand-written rather than timm's `Attention` because later paradigms need hooks timm's class does
not take (rotary position embeddings, QK-norm, KV caches); parameter names (`qkv`, `proj`) match
DiT/timm so official checkpoints load without renaming.
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from timm.layers import Mlp
from torch import Tensor, nn

__all__ = ["Attention", "Mlp", "ViTBlock"]


class Attention(nn.Module):
    """Bidirectional multi-head self-attention; optional per-head RMS QK-norm and attention-weight dropout."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False,
                 attn_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop  # dropout on the attention weights in training (nn.MultiheadAttention's dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, L, D) -> (B, L, D)."""
        qkv = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.num_heads)
        q, k, v = self.q_norm(qkv[0]), self.k_norm(qkv[1]), qkv[2]  # (B, H, L, Dh) each
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)  # (B, H, L, Dh)
        return self.proj(rearrange(x, "b h l d -> b l (h d)"))  # (B, L, D)


class ViTBlock(nn.Module):
    """Pre-norm ViT block x + Attn(LN(x)), then x + MLP(LN(x)), with timm `Block`'s names and dropouts.

    `attn_drop` drops attention weights; `proj_drop` follows the attention projection and both MLP layers, as
    timm's `Block(proj_drop=...)` (MAE, MAR). Keys: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop)
        self.attn_proj_drop = nn.Dropout(proj_drop)  # timm Attention.proj_drop (no parameters)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        """(B, L, D) -> (B, L, D)."""
        x = x + self.attn_proj_drop(self.attn(self.norm1(x)))
        return x + self.mlp(self.norm2(x))  # (B, L, D)
