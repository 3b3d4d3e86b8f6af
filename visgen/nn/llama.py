"""Llama transformer blocks (Touvron et al., 2023), as LlamaGen uses them: defined once for every paradigm.

Pre-norm blocks with RMSNorm, rotary position embeddings on queries and keys, SwiGLU feed-forward
and no biases anywhere. Parameter names follow LlamaGen / gpt-fast (`attention.wqkv`, `attention.wo`,
`feed_forward.w1/w2/w3`, `attention_norm`, `ffn_norm`) so released checkpoints map one to one.

Attention is causal by default and then takes an optional static KV cache (`KVCache`: keys and
values preallocated for the whole sequence, written in place at `input_pos`, attended under a mask
over the full cache length) so that a decoding step has fixed shapes: torch.compile builds one graph
for every position. `causal=False` gives the bidirectional block a masked-token model needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from visgen.nn.rope import apply_rope

__all__ = ["RMSNorm", "SwiGLU", "llama_ffn_hidden", "LlamaAttention", "LlamaBlock", "KVCache"]


def llama_ffn_hidden(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """Llama's SwiGLU width: 2/3 of 4 * dim (same FLOPs as a 4x GELU MLP), rounded up to `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return hidden if hidden % multiple_of == 0 else hidden + multiple_of - hidden % multiple_of


class RMSNorm(nn.Module):
    """x / rms(x) * weight, the normalisation computed in fp32 and cast back before the weight (Llama)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., D)."""
        x32 = x.float()
        normed = x32 * torch.rsqrt(torch.mean(x32 * x32, dim=-1, keepdim=True) + self.eps)  # (..., D)
        return normed.type_as(x) * self.weight


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x) with dropout on the output (Shazeer, 2020; Llama's FeedForward)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, L, D) -> (B, L, D)."""
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class KVCache:
    """Static keys and values of every layer, preallocated for `max_len` positions: a sampler owns it.

    Held outside the net (not buffers), so checkpoints, the EMA copy and FSDP never see it. Shapes:
    keys[layer] and values[layer] are (B, H_kv, max_len, Dh). `mask(input_pos)` is the boolean mask
    over the whole cache (True: may attend): position p sees cache slots 0 .. p.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.slots = torch.arange(max_len, device=device)  # (S,)

    def mask(self, input_pos: Tensor) -> Tensor:
        """(L,) positions being written -> (1, 1, L, S) causal mask over the cache."""
        return (self.slots[None, :] <= input_pos[:, None])[None, None]  # (1, 1, L, S)

    def layer(self, index: int) -> tuple[Tensor, Tensor]:
        """The (keys, values) buffers of one layer, each (B, H_kv, S, Dh)."""
        return self.keys[index], self.values[index]


class LlamaAttention(nn.Module):
    """Multi-head (or grouped-query) self-attention without biases, RoPE on q and k, SDPA kernels."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, attn_dropout: float = 0.0,
                 resid_dropout: float = 0.0, causal: bool = True):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if dim % num_heads or num_heads % num_kv_heads:
            raise ValueError(f"attention width {dim} must be divisible by num_heads={num_heads}, and num_heads by "
                             f"num_kv_heads={num_kv_heads}")
        self.dim, self.num_heads, self.num_kv_heads = dim, num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.causal = causal
        self.attn_dropout = attn_dropout
        self.wqkv = nn.Linear(dim, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.resid_dropout = nn.Dropout(resid_dropout)

    def forward(self, x: Tensor, rope: Tensor | None = None, cache: tuple[Tensor, Tensor] | None = None,
                input_pos: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """(B, L, D) -> (B, L, D). `rope`: (L, Dh/2, 2) rows for these positions. With `cache` (one layer's
        buffers) the new keys/values are written at `input_pos` (L,) and attention runs over the whole
        cache under `mask` (1, 1, L, S)."""
        batch, length, _ = x.shape
        kv_dim = self.num_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([self.dim, kv_dim, kv_dim], dim=-1)
        q = q.view(batch, length, self.num_heads, self.head_dim)  # (B, L, H, Dh)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim)  # (B, L, Hkv, Dh)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim)  # (B, L, Hkv, Dh)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, Dh)
        if cache is not None:
            keys, values = cache  # (B, Hkv, S, Dh) each
            keys[:, :, input_pos] = k.to(keys.dtype)
            values[:, :, input_pos] = v.to(values.dtype)
            k, v = keys, values  # (B, Hkv, S, Dh)
        if self.num_kv_heads != self.num_heads:
            k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)  # (B, H, S, Dh)
            v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        out = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=self.causal and mask is None,
            dropout_p=self.attn_dropout if self.training else 0.0)  # (B, H, L, Dh)
        out = out.transpose(1, 2).reshape(batch, length, self.dim)  # (B, L, D)
        return self.resid_dropout(self.wo(out))


class LlamaBlock(nn.Module):
    """x + attention(RMSNorm(x)), then + SwiGLU(RMSNorm(x)); optional stochastic depth on both branches."""

    def __init__(self, dim: int, num_heads: int, ffn_hidden: int, num_kv_heads: int | None = None,
                 norm_eps: float = 1e-5, attn_dropout: float = 0.0, resid_dropout: float = 0.0,
                 ffn_dropout: float = 0.0, drop_path: float = 0.0, causal: bool = True):
        super().__init__()
        self.attention = LlamaAttention(dim, num_heads, num_kv_heads, attn_dropout, resid_dropout, causal)
        self.feed_forward = SwiGLU(dim, ffn_hidden, ffn_dropout)
        self.attention_norm = RMSNorm(dim, eps=norm_eps)
        self.ffn_norm = RMSNorm(dim, eps=norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, rope: Tensor | None = None, cache: tuple[Tensor, Tensor] | None = None,
                input_pos: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """(B, L, D) -> (B, L, D); the arguments after x go to the attention."""
        h = x + self.drop_path(self.attention(self.attention_norm(x), rope, cache, input_pos, mask))
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h)))
