"""MaskGIT's bidirectional transformer over VQ codes, as the PyTorch reproduction builds it (v1).

Chang et al., "MaskGIT: Masked Generative Image Transformer" (CVPR 2022) predict every masked code of a
(h, w) grid at once with a BERT-style encoder. This is the network of valeoai/Maskgit-pytorch v1 (commit
674ef1d, `Network/transformer.py`, FID 6.80 at 256 px), layer for layer:

* one embedding table holds the codes (0..V-1), the mask token (V), the classes (V+1..V+C) and the null
  class (V+C+1, the label-dropped input of classifier-free guidance); the class is one extra token
  appended after the h*w code tokens, with learned positions for all h*w+1;
* LayerNorm (eps 1e-12) / Linear / GELU / LayerNorm / Linear in front of pre-norm blocks (LayerNorm,
  attention with dropout on its weights, GELU MLP), and LayerNorm / Linear / GELU / LayerNorm after them;
* output logits are the features times the embedding table (weights shared with the input) plus a
  learned bias per position and class: `logits = x @ E[:V+1]^T + b`, over the V codes and the mask.

The official checkpoints name the blocks `transformer.layers.{i}.{0,1}` (attention through
`nn.MultiheadAttention`); `OfficialFormat` below renames them onto `blocks.{i}` (visgen's SDPA attention), and
the v1 code's own `load_state_dict(strict=False)` becomes a strict, tested rename here.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from visgen.nn.attention import Attention, Mlp
from visgen.official import OfficialFormat, StateDict, register_official

__all__ = ["MaskTransformer", "MASKGIT_V1_SIZES", "v1_key_map", "check_grid", "taming_vqgan_keys"]

#: The v1 sizes (`Trainer/vit.py` get_network): width, depth, heads, MLP width. Only base was released
#: (256 and 512 px); big and huge are defined by the same code.
MASKGIT_V1_SIZES: dict[str, dict[str, int]] = {
    "base": {"hidden_size": 768, "depth": 24, "num_heads": 16, "mlp_dim": 3072},
    "big": {"hidden_size": 1024, "depth": 32, "num_heads": 16, "mlp_dim": 3072},
    "huge": {"hidden_size": 1024, "depth": 48, "num_heads": 16, "mlp_dim": 3072},
}


def check_grid(net: nn.Module, codes: Tensor) -> None:
    """Refuse a code grid of another size than the net's positions were built for, naming the fix."""
    if codes[0].numel() != net.seq_len:
        raise ValueError(f"{type(net).__name__} built for {net.input_size}x{net.input_size} codes got a grid of "
                         f"{tuple(codes.shape[1:])}; set model.net.input_size to image_size / the tokenizer's "
                         "downsampling factor")


class PreNormBlock(nn.Module):
    """x + Attn(LN(x)), then x + MLP(LN(x)): the BERT/ViT block of the v1 reproduction."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=True, attn_drop=dropout)  # v1: dropout on the weights only
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=mlp_dim, act_layer=nn.GELU, drop=dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, L, D) -> (B, L, D)."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MaskTransformer(nn.Module):
    """Codes (B, h, w) with the mask id `codebook_size` where masked, labels (B,) -> logits (B, h*w, V+1).

    Labels equal to `num_classes` select the null class (classifier-free guidance's unconditional half).
    The last logit column is the mask token: the v1 loss is a cross-entropy over all V+1 columns, the
    sampler never draws it.
    """

    def __init__(
        self,
        input_size: int = 16,
        codebook_size: int = 1024,
        num_classes: int = 1000,
        hidden_size: int = 768,
        depth: int = 24,
        num_heads: int = 16,
        mlp_dim: int = 3072,
        dropout: float = 0.1,
        embed_init_std: float | None = None,
    ):
        super().__init__()
        self.input_size = input_size
        self.seq_len = input_size * input_size
        self.codebook_size = codebook_size
        self.mask_token_id = codebook_size
        self.num_classes = num_classes
        vocab = codebook_size + 1 + num_classes + 1  # codes, mask, classes, null class
        self.tok_emb = nn.Embedding(vocab, hidden_size)
        self.pos_emb = nn.Parameter(torch.zeros(1, self.seq_len + 1, hidden_size))
        self.first_layer = nn.Sequential(
            nn.LayerNorm(hidden_size, eps=1e-12), nn.Dropout(dropout), nn.Linear(hidden_size, hidden_size), nn.GELU(),
            nn.LayerNorm(hidden_size, eps=1e-12), nn.Dropout(dropout), nn.Linear(hidden_size, hidden_size),
        )
        self.blocks = nn.ModuleList([PreNormBlock(hidden_size, num_heads, mlp_dim, dropout) for _ in range(depth)])
        self.last_layer = nn.Sequential(
            nn.LayerNorm(hidden_size, eps=1e-12), nn.Dropout(dropout), nn.Linear(hidden_size, hidden_size), nn.GELU(),
            nn.LayerNorm(hidden_size, eps=1e-12),
        )
        self.bias = nn.Parameter(torch.zeros(self.seq_len + 1, vocab))  # per position and output class
        # v1 keeps torch's N(0, 1) embedding init (and default Linear init); pos_emb ~ trunc N(0, 0.02).
        # embed_init_std rescales the shared table, which sets the scale of the initial logits too.
        if embed_init_std is not None:
            nn.init.normal_(self.tok_emb.weight, std=embed_init_std)
        nn.init.trunc_normal_(self.pos_emb, std=0.02)

    def forward(self, codes: Tensor, labels: Tensor) -> Tensor:
        """codes (B, h, w) int64 (mask id where masked), labels (B,) -> logits (B, h*w, V+1)."""
        batch = codes.shape[0]
        check_grid(self, codes)
        class_token = labels.view(batch, 1) + self.codebook_size + 1  # classes follow the codes and the mask
        tokens = torch.cat([codes.reshape(batch, -1), class_token], dim=1)  # (B, N+1)
        x = self.tok_emb(tokens) + self.pos_emb  # (B, N+1, D)
        x = self.first_layer(x)
        for block in self.blocks:
            x = block(x)  # (B, N+1, D)
        x = self.last_layer(x)[:, : self.seq_len]  # (B, N, D): the class position's output is never read
        out = self.codebook_size + 1
        return x @ self.tok_emb.weight[:out].T + self.bias[: self.seq_len, :out]  # (B, N, V+1)


# ----- official checkpoints ------------------------------------------------------------------------------------
#: v1 name (inside `transformer.layers.{i}.`) -> visgen name (inside `blocks.{i}.`). nn.MultiheadAttention's
#: packed in_proj is [W_q; W_k; W_v] with heads contiguous inside each: exactly the layout of Attention.qkv.
_V1_BLOCK_KEYS = {
    "0.norm.weight": "norm1.weight",
    "0.norm.bias": "norm1.bias",
    "0.fn.mha.in_proj_weight": "attn.qkv.weight",
    "0.fn.mha.in_proj_bias": "attn.qkv.bias",
    "0.fn.mha.out_proj.weight": "attn.proj.weight",
    "0.fn.mha.out_proj.bias": "attn.proj.bias",
    "1.norm.weight": "norm2.weight",
    "1.norm.bias": "norm2.bias",
    "1.fn.net.0.weight": "mlp.fc1.weight",
    "1.fn.net.0.bias": "mlp.fc1.bias",
    "1.fn.net.3.weight": "mlp.fc2.weight",
    "1.fn.net.3.bias": "mlp.fc2.bias",
}
_V1_BLOCK = re.compile(r"transformer\.layers\.(\d+)\.(.+)")


def v1_key_map(state: StateDict) -> StateDict:
    """Rename a v1 `MaskTransformer` state dict onto visgen's; every other key (tok_emb, pos_emb, bias,
    first_layer, last_layer) keeps its name. A block key outside the table is an error, not a silent drop."""
    out = {}
    for key, value in state.items():
        match = _V1_BLOCK.fullmatch(key)
        if match is None:
            out[key] = value
            continue
        layer, rest = match.groups()
        if rest not in _V1_BLOCK_KEYS:
            raise KeyError(f"unknown key {key!r} in a Maskgit-pytorch v1 checkpoint; known block keys: "
                           f"{sorted(_V1_BLOCK_KEYS)}")
        out[f"blocks.{layer}.{_V1_BLOCK_KEYS[rest]}"] = value
    return out


# v1's Trainer saves {"iter", "global_epoch", "model_state_dict", "optimizer_state_dict"} and keeps no EMA:
# the released MaskGIT_ImageNet_{256,512}.pth hold the trained weights under "model_state_dict".
register_official(MaskTransformer, OfficialFormat(key_map=v1_key_map, ema_entries=("model_state_dict",),
                                                  raw_entries=("model_state_dict",)))


# ----- the tokenizer's release ---------------------------------------------------------------------------------
def taming_vqgan_keys(state: StateDict) -> StateDict:
    """MaskGIT's VQGAN release (taming's `last.ckpt` state_dict) -> visgen's diffusers-layout VQ names.

    Its `loss.*` tensors (taming's PatchGAN discriminator and LPIPS weights, kept in the training checkpoint)
    are not part of the tokenizer: dropped by name and logged, where the v1 code loads with strict=False.
    Every other key is renamed by `ldm_to_diffusers` or the conversion fails naming it.
    """
    from visgen.tokenizers.ldm_keys import ldm_to_diffusers

    return ldm_to_diffusers(state, ignore=("loss.",))
