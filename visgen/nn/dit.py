"""The DiT backbone: a ViT over latent patches conditioned by adaLN-Zero (Peebles & Xie, 2023).

One network serves DiT (ε prediction with learned Σ), SiT (velocity) and REPA: what it is trained
to predict is the paradigm's business, not the backbone's. The size presets are the paper's
Table 1 (S/B/L/XL) and combine with patch sizes 2, 4 and 8.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from visgen.nn.adaln import AdaLNFinalLayer, AdaLNZeroBlock
from visgen.nn.embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_pos_embed_2d

__all__ = ["DiT", "DIT_SIZES"]

# DiT paper, Table 1: depth, width and heads of each size.
DIT_SIZES: dict[str, dict[str, int]] = {
    "S": {"depth": 12, "hidden_size": 384, "num_heads": 6},
    "B": {"depth": 12, "hidden_size": 768, "num_heads": 12},
    "L": {"depth": 24, "hidden_size": 1024, "num_heads": 16},
    "XL": {"depth": 28, "hidden_size": 1152, "num_heads": 16},
}


class DiT(nn.Module):
    """Class-conditional diffusion transformer over a (C, H, W) input.

    `learn_sigma=True` doubles the output channels (ε and the Σ interpolation of improved DDPM), the
    layout of every released DiT and SiT checkpoint. `num_classes=0` builds an unconditional net.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        qk_norm: bool = False,
        time_scale: float = 1.0,
        label_init_std: float = 0.02,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}")
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.grid_size = input_size // patch_size
        # Multiplies t before the sinusoidal embedding. 1.0 for every published model (DiT feeds steps
        # 0..999, SiT feeds t in [0, 1]); small short runs on t in [0, 1] learn faster with 1000, because
        # the embedding's frequencies then span the whole time range.
        self.time_scale = time_scale
        # Std of the class-embedding table's initialisation: 0.02 in DiT. Short runs of small nets learn
        # the class far sooner from 1.0 (torch's nn.Embedding default): with 0.02 the label's share of
        # the conditioning vector stays small next to the time embedding for the first thousands of
        # steps (see conf/experiment/demo_sit.yaml for the measurement).
        self.label_init_std = label_init_std

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = (
            LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        )
        # A frozen nn.Parameter, not a buffer: the released checkpoints store it as `pos_embed`
        # and count it among the parameters.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size**2, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [AdaLNZeroBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, qk_norm=qk_norm) for _ in range(depth)]
        )
        self.final_layer = AdaLNFinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier linears, N(0, 0.02) embeddings, zeroed adaLN and output."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid_size).unsqueeze(0))
        # The patch projection is initialised like a linear layer (xavier over the flattened kernel).
        proj = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=self.label_init_std)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            block.zero_init()
        self.final_layer.zero_init()

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, L, p*p*C) tokens -> (B, C, H, W) image, patch-major as the official code."""
        return rearrange(
            x, "b (h w) (p q c) -> b c (h p) (w q)", h=self.grid_size, p=self.patch_size, q=self.patch_size
        )

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """x (B, C, H, W), t (B,) time as the paradigm defines it, y (B,) labels -> (B, C_out, H, W)."""
        return self.forward_with_hidden(x, t, y)[0]

    def forward_with_hidden(
        self, x: Tensor, t: Tensor, y: Tensor, hidden_depth: int | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """The output (B, C_out, H, W) and the tokens (B, L, D) after block `hidden_depth` (1-based; None: no
        tokens). REPA aligns those tokens with a frozen encoder's features, in the same forward pass."""
        tokens = self.x_embedder(x) + self.pos_embed  # (B, L, D)
        c = self.t_embedder(t * self.time_scale if self.time_scale != 1.0 else t)  # (B, D)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y, self.training)  # (B, D)
        hidden = None
        for depth, block in enumerate(self.blocks, start=1):
            tokens = block(tokens, c)  # (B, L, D)
            if depth == hidden_depth:
                hidden = tokens  # (B, L, D)
        return self.unpatchify(self.final_layer(tokens, c)), hidden  # (B, C_out, H, W), (B, L, D) | None
