"""Halton-MaskGIT's transformer (Besnier et al., "Halton Scheduler for Masked Generative Image Transformer",
ICLR 2025; valeoai/Halton-MaskGIT `Network/transformer.py`), the successor of the v1 reproduction.

A DiT-like encoder over VQ codes (LlamaGen's VQ-16, 16,384 codes): the class embedding conditions every
block through adaptive norms (shift, scale and gate regressed from it, zero-initialised), RMSNorm, attention
with an RMS QK-norm over the full width and no biases, a SwiGLU MLP, one learned register token appended to
the sequence, and an output head whose weight is the code embedding table (tied). The label of a
classifier-free-guidance null pass is `num_classes`, as in visgen's other nets.

Official names are kept inside each block; only `transformer.layers.{i}` becomes `blocks.{i}` (`halton_key_map`).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visgen.nn.adaln import modulate
from visgen.nn.llama import RMSNorm, SwiGLU
from visgen.nn.maskgit import check_grid
from visgen.official import OfficialFormat, StateDict, register_official

__all__ = ["HaltonTransformer", "HALTON_SIZES", "halton_key_map"]

#: Halton-MaskGIT `Trainer/abstract_trainer.py` transformer_size: width, depth, heads (MLP width 4x, as SwiGLU 2/3).
HALTON_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 384, "depth": 6, "num_heads": 6},
    "small": {"hidden_size": 512, "depth": 12, "num_heads": 6},
    "base": {"hidden_size": 768, "depth": 12, "num_heads": 12},
    "large": {"hidden_size": 1024, "depth": 24, "num_heads": 16},
    "xlarge": {"hidden_size": 1152, "depth": 28, "num_heads": 16},
}


class RMSNormWithBias(RMSNorm):
    """RMSNorm with a learned bias added after the scale (the final norm of Halton-MaskGIT)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__(dim, eps=eps)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + self.bias


def swiglu_hidden(mlp_dim: int, multiple_of: int = 256) -> int:
    """Halton-MaskGIT's SwiGLU width: 2/3 of `mlp_dim`, rounded up to a multiple of 256 (2,816 for 4 x 1024)."""
    return multiple_of * ((int(2 * mlp_dim / 3) + multiple_of - 1) // multiple_of)


class QKNormAttention(nn.Module):
    """Attention with separate bias-free q/k/v/o maps and a weightless RMS norm of q and k over the full width
    (before the head split), as Halton-MaskGIT; SDPA with dropout on the weights and after `wo` in training.
    (visgen.nn.llama.LlamaAttention fuses q/k/v and has no QK-norm: these files keep wq/wk/wv apart.)"""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        # heads * (dim // heads), as the official code: 510 for the small net's width 512 over 6 heads
        inner = num_heads * (dim // num_heads)
        self.wq, self.wk, self.wv = (nn.Linear(dim, inner, bias=False) for _ in range(3))
        self.wo = nn.Linear(inner, dim, bias=False)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        """(B, L, D) -> (B, L, D)."""
        b, length, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)  # (B, L, H*Dh) each
        # QK-norm: weightless RMS norm over the full width, in fp32 as the official RMSNorm (eps 1e-5)
        q, k = (F.rms_norm(t.float(), (t.shape[-1],), eps=1e-5).type_as(v) for t in (q, k))
        q, k, v = (t.view(b, length, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, H, L, Dh)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, H, L, Dh)
        return F.dropout(self.wo(out.transpose(1, 2).reshape(b, length, -1)), p)  # (B, L, D)


class HaltonBlock(nn.Module):
    """Pre-norm block modulated by the class embedding: x + g1 * attn(mod(ln1 x)), x + g2 * ff(mod(ln2 x))."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))  # the adaptive-norm regressor (official name)
        self.ln1 = RMSNorm(dim, eps=1e-5)
        self.attn = QKNormAttention(dim, num_heads, dropout)
        self.ln2 = RMSNorm(dim, eps=1e-5)
        # Llama's SwiGLU (names w1/w2/w3 as the official files); its dropout acts after w2 where Halton-MaskGIT's
        # acts before w2: a training-time difference only
        self.ff = SwiGLU(dim, swiglu_hidden(mlp_dim), dropout)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """x (B, L, D), cond (B, D) -> (B, L, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.mlp(cond).chunk(6, dim=1)  # (B, D) each
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.ln1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.ff(modulate(self.ln2(x), shift2, scale2))


class FinalAdaNorm(nn.Module):
    """RMSNorm (with bias) modulated by the class embedding, before the head."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm_final = RMSNormWithBias(dim, eps=1e-5)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        shift, scale = self.mlp(cond).chunk(2, dim=1)
        return modulate(self.norm_final(x), shift, scale)


class HaltonTransformer(nn.Module):
    """Codes (B, h, w) with the mask id `codebook_size` where masked, labels (B,) -> logits (B, h*w, V+1)."""

    def __init__(
        self,
        input_size: int = 24,
        codebook_size: int = 16384,
        num_classes: int = 1000,
        hidden_size: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_dim: int | None = None,
        dropout: float = 0.1,
        num_registers: int = 1,
        embed_init_std: float | None = None,
    ):
        """`mlp_dim` (None: 4 x hidden_size, as the official trainer passes) is the MLP width before SwiGLU's 2/3;
        `embed_init_std` (None: the official 0.02) the std of the embedding tables' initialisation."""
        super().__init__()
        self.input_size = input_size
        self.seq_len = input_size * input_size
        self.codebook_size = codebook_size
        self.mask_token_id = codebook_size
        self.num_classes = num_classes
        self.num_registers = num_registers
        self.cls_emb = nn.Embedding(num_classes + 1, hidden_size)  # + the null class
        self.tok_emb = nn.Embedding(codebook_size + 1, hidden_size)  # + the mask token
        self.pos_emb = nn.Embedding(self.seq_len, hidden_size)
        mlp_dim = mlp_dim or 4 * hidden_size
        self.blocks = nn.ModuleList([HaltonBlock(hidden_size, num_heads, mlp_dim, dropout) for _ in range(depth)])
        self.last_norm = FinalAdaNorm(hidden_size)
        self.head = nn.Linear(hidden_size, codebook_size + 1)
        self.reg_tokens = nn.Embedding(num_registers, hidden_size) if num_registers > 0 else None
        self.initialize_weights(0.02 if embed_init_std is None else embed_init_std)
        self.head.weight = self.tok_emb.weight  # tied (after init, which ends with the embedding's N(0, 0.02))
        # Loading with assign=True (meta-device builds) replaces both Parameters: tie them again afterwards.
        self.register_load_state_dict_post_hook(HaltonTransformer._retie)

    @staticmethod
    def _retie(module: HaltonTransformer, incompatible_keys: Any) -> None:
        module.head.weight = module.tok_emb.weight

    def initialize_weights(self, embed_init_std: float = 0.02) -> None:
        """Official init: Xavier linears with zero biases, N(0, 0.02) embeddings, zeroed block modulations."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for emb in (self.cls_emb, self.tok_emb, self.pos_emb, self.reg_tokens):
            if emb is not None:
                nn.init.normal_(emb.weight, std=embed_init_std)
        for block in self.blocks:
            nn.init.zeros_(block.mlp[1].weight)
            nn.init.zeros_(block.mlp[1].bias)

    def forward(self, codes: Tensor, labels: Tensor) -> Tensor:
        """codes (B, h, w) int64 (mask id where masked), labels (B,) (num_classes = null) -> (B, h*w, V+1)."""
        batch = codes.shape[0]
        check_grid(self, codes)
        cond = self.cls_emb(labels)  # (B, D)
        x = self.tok_emb(codes.reshape(batch, -1)) + self.pos_emb.weight  # (B, N, D)
        if self.reg_tokens is not None:
            x = torch.cat([x, self.reg_tokens.weight.expand(batch, -1, -1)], dim=1)  # (B, N+R, D)
        for block in self.blocks:
            x = block(x, cond)
        x = self.last_norm(x[:, : self.seq_len], cond)  # registers dropped
        return self.head(x)  # (B, N, V+1)


# ----- official checkpoints ------------------------------------------------------------------------------------
_HALTON_BLOCK = re.compile(r"transformer\.layers\.(\d+)\.(.+)")


def halton_key_map(state: StateDict) -> StateDict:
    """`transformer.layers.{i}.*` -> `blocks.{i}.*`, every other name unchanged. The files store the tied head
    twice (`head.weight` and `tok_emb.weight`); both must be equal, else the file is refused."""
    head, emb = state.get("head.weight"), state.get("tok_emb.weight")
    if head is not None and emb is not None and not head.is_meta and not torch.equal(head, emb):
        raise ValueError("head.weight differs from tok_emb.weight in this Halton-MaskGIT file, but the network ties "
                         "them; the file is not a checkpoint of the official Transformer")
    return {(_HALTON_BLOCK.sub(r"blocks.\1.\2", k) if k.startswith("transformer.") else k): v
            for k, v in state.items()}


# Halton-MaskGIT's Trainer saves {"iter", "global_epoch", "model_state_dict", "optimizer_state_dict"} (current.pth,
# and ema.pth with the EMA when --use-ema); the released ImageNet_*.pth files follow that layout.
register_official(HaltonTransformer, OfficialFormat(key_map=halton_key_map, ema_entries=("model_state_dict",),
                                                    raw_entries=("model_state_dict",)))
